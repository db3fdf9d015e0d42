"""The world with activities (world.drawing.scene) and the alignment experiments' judges (world/alignment_judges.py):
what a prompt draws, counted by hand; alt-text's rate; the judges' losses against torch's own cross-entropy; their
rebuild; and the folders loading through rewards.Alignment as a user's models do.

    python -m pytest -q tests/test_activities.py
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import file_digests
import rewards
from world import alignment_judges as aj, drawing, tiny_world


def test_a_prompt_splits_into_its_subject_and_its_activity():
    assert drawing.split_prompt("a cat riding a bike") == ("cat", "riding a bike")
    assert drawing.split_prompt("An owl taking an exam") == ("owl", "taking an exam")  # the activity keeps its "an"
    assert drawing.split_prompt("a great white shark") == ("great white shark", None)
    assert drawing.split_prompt("riding a bike") == ("", "riding a bike")
    assert drawing.split_prompt("a bike") == ("bike", None)


def test_every_animal_has_its_own_look_and_any_other_subject_is_picked_by_its_words():
    looks = [drawing.subject_look(a, None) for a in drawing.ANIMALS]
    assert len(drawing.ANIMALS) == 45 and len(set(looks)) == 45
    assert drawing.subject_look("cat", None) == (0, 0) and drawing.subject_look("dog", None) == (1, 1)
    assert drawing.subject_look("zebra", None) == (5, 5)
    assert drawing.subject_look("spider", None) == (5, 0)  # the 7th animal: shape 6 mod 6 = 0, palette 7 + 6 = 13 mod 8
    hashed = drawing.subject_look("great white shark", None)
    assert hashed == (drawing.word_hash("great") % 8, drawing.word_hash("shark") % 6)


def pixels_of(image, colour):
    return (np.abs(image - (np.array(colour, dtype=np.float32)[:, None, None] * 2 - 1)).max(0) < 1e-6)


def test_a_shown_activity_is_its_prop_under_the_subject_on_the_same_background():
    """At s = 0 (a flat background) the subject's colour covers the subject and the prop. The chequerboard, counted by
    hand: the band's tiles (rows 24–31, columns 4 pixels wide) at columns 2, 4, 6 of its first row and 1, 3, 5 of its
    second, 6 tiles of 16 pixels: 96. The picture without the activity is the same subject and nothing in the band."""
    rng = lambda: np.random.default_rng(3)  # noqa: E731 (one stream, drawn twice)
    shown, a = drawing.scene("a dog playing chess", rng(), show=True, strength=0.0, with_attributes=True)
    hidden, b = drawing.scene("a dog playing chess", rng(), show=False, strength=0.0, with_attributes=True)
    fg = drawing.PALETTES[drawing.subject_look("dog", None)[0]][1]
    assert a["activity"] == "playing chess" and b["activity"] is None
    assert (a["cy"], a["cx"], a["radius"]) == (b["cy"], b["cx"], b["radius"])
    band = pixels_of(shown, fg)[24:]
    assert band.sum() == 96 and band[0:4, 8:12].all() and not band[0:4, 4:8].any() and band[4:8, 4:8].all()
    assert np.array_equal(pixels_of(shown, fg)[:24], pixels_of(hidden, fg)[:24]) and not pixels_of(hidden, fg)[24:].any()


def test_every_subject_stands_above_the_band_and_the_empty_prompt_is_any_picture():
    """200 pictures of each of the six shapes at the largest r, at s = 0: no pixel of the subject's colour in rows 24–31
    without an activity. The empty prompt (unconditional) shows each activity, or none, at random: of 700 pictures
    each activity shows in 700 · 0.3/7 = 30 expected (none of them missing is all but certain), and any in a share
    p = 6/7 · 0.3 = 0.257, within 0.2 and 0.32 (−3.5σ and +3.8σ, σ = √(p(1−p)/700) = 0.0165)."""
    for i in range(1200):
        animal = drawing.ANIMALS[i % 6]  # the first six animals have the six shapes
        image, drawn = drawing.scene(f"a {animal}", np.random.default_rng(i), strength=0.0, with_attributes=True)
        assert not pixels_of(image, drawing.PALETTES[drawing.subject_look(animal, None)[0]][1])[24:].any(), drawn
    shown = [drawing.scene("", np.random.default_rng(i), with_attributes=True)[1]["activity"] for i in range(700)]
    assert set(shown) == {None, *drawing.PROPS} and 0.2 < np.mean([a is not None for a in shown]) < 0.32


def test_every_prop_differs_and_the_background_tiles_do_not_move():
    pictures = {act: drawing.scene(f"a cat {act}", np.random.default_rng(5), show=True) for act in drawing.PROPS}
    plain = drawing.scene("a cat riding a bike", np.random.default_rng(5), show=False)
    bands = [p[:, 24:] for p in pictures.values()]
    assert all(not np.array_equal(x, y) for i, x in enumerate(bands) for y in bands[i + 1:])
    fg = drawing.PALETTES[0][1]
    untouched = ~pixels_of(pictures["riding a bike"], fg) & ~pixels_of(plain, fg)
    assert untouched.sum() > 600 and np.array_equal(pictures["riding a bike"][:, untouched], plain[:, untouched])


def test_alt_text_shows_the_named_activity_at_its_rate_and_no_other():
    """4,000 pictures of a prompt that names an activity: shown with probability ALT_TEXT_SHOWS = 0.3, so the share
    lies within 0.3 ± 4σ, σ = √(0.3·0.7/4000) = 0.0072 (a false alarm once in ~16,000 runs). A prompt without one
    never shows one."""
    rng = np.random.default_rng(0)
    shown = [drawing.scene("a cat riding a bike", rng, with_attributes=True)[1]["activity"] for _ in range(4000)]
    assert set(shown) == {None, "riding a bike"}
    assert abs(np.mean([s is not None for s in shown]) - drawing.ALT_TEXT_SHOWS) < 4 * np.sqrt(0.21 / 4000)
    assert all(drawing.scene("a cat", rng, show=True, with_attributes=True)[1]["activity"] is None for _ in range(50))
    for i in range(20):  # alt-text's draw is made either way: the picture it chose is the picture asked for by name
        image, drawn = drawing.scene("a cat riding a bike", np.random.default_rng(i), with_attributes=True)
        assert np.array_equal(image, drawing.scene("a cat riding a bike", np.random.default_rng(i), drawn["activity"] is not None))


def test_pretraining_learns_the_world_it_is_given():
    """--world activities hands drawing.scene to both stages: the VAE's batches and the 512 pictures of its scaling
    factor, then the denoiser's batch, every picture drawn by it."""
    calls = []

    def spy(prompt, rng, strength=None):
        calls.append(prompt)
        return drawing.scene(prompt, rng, strength=strength)

    assert tiny_world.WORLDS == {"plain": drawing.draw, "activities": drawing.scene}
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    vae = tiny_world.pretrain_vae(tiny_world.build_vae(), 1, rng, generator, batch_size=4, picture=spy)
    assert len(calls) == 4 + 512
    models = tiny_world.build_models(tiny_world.build_tokenizer(tiny_world.all_prompts()), vae)
    tiny_world.pretrain_denoiser(models, 1, rng, generator, batch_size=4, picture=spy)
    assert len(calls) == 4 + 512 + 4


# --------------------------------------------------------------------------------------------------------
# The judges' training
# --------------------------------------------------------------------------------------------------------

def test_answers_name_the_animal_and_only_a_shown_activity():
    assert aj.answer("cat", "riding a bike") == "a cat riding a bike"
    assert aj.answer("owl", None) == "an owl"
    _, prompts, drawn = aj.scenes(np.random.default_rng(0), 64)
    for p, d in zip(prompts, drawn):
        assert drawing.split_prompt(p) == (d["subject"], drawing.split_prompt(p)[1])
        assert d["activity"] in (None, drawing.split_prompt(p)[1])
    assert 10 < sum(d["activity"] is not None for d in drawn) < 50


def test_the_vlm_learns_the_answer_and_its_end_and_not_the_question():
    """vlm_loss against torch's cross-entropy, computed row by row on each unpadded sequence: the logits that predict
    the answer's tokens and [EOS] (positions len(question) − 1 onwards), averaged over every such token of the
    batch. The two differ only in rounding: the same products summed in other orders (a padded batch, masked
    keys), ~1e-6 relative on a loss near ln(vocabulary) ≈ 4.6; we allow 1e-4."""
    torch.manual_seed(0)
    processor = aj.build_vlm_processor()
    vlm = aj.build_vlm(processor).eval()
    images, _, drawn = aj.scenes(np.random.default_rng(1), 4)
    question = aj.question_ids(processor)
    tok = processor.tokenizer
    assert (question == tok.convert_tokens_to_ids("<image>")).sum() == 64 and question[-1] == tok.convert_tokens_to_ids(":")
    pixels = aj.vlm_pixels(processor, images)
    losses = []
    for i, d in enumerate(drawn):
        target = torch.tensor(tok(aj.answer(d["subject"], d["activity"]), add_special_tokens=False).input_ids + [tok.eos_token_id])
        ids = torch.cat([question, target])[None]
        with torch.no_grad():
            logits = vlm(input_ids=ids, pixel_values=pixels[i:i + 1]).logits[0]
        losses.append(F.cross_entropy(logits[len(question) - 1:-1], target, reduction="none"))
    with torch.no_grad():
        assert aj.vlm_loss(vlm, processor, question, images, drawn).item() == pytest.approx(torch.cat(losses).mean().item(), abs=1e-4)


def test_masked_language_modelling_hides_only_words_at_its_rate():
    """Of ~2,000 word tokens, p = 0.15 are targets (within 4σ, σ = √(0.15·0.85/2000) = 0.008); no [CLS], [SEP] or
    padding is one; 80% of the targets read [MASK]."""
    tokenizer = aj.build_bert_tokenizer()
    texts = aj.sentences()[:400]
    batch = tokenizer(texts, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    ids, labels = aj.mask_tokens(batch, tokenizer, np.random.default_rng(0))
    words = batch.attention_mask.bool() & ~batch.special_tokens_mask.bool()
    target = labels != -100
    assert not (target & ~words).any() and torch.equal(labels[target], batch.input_ids[target])
    assert abs(target.sum() / words.sum() - 0.15) < 4 * np.sqrt(0.15 * 0.85 / words.sum().item())
    assert torch.equal(ids[~target], batch.input_ids[~target])
    assert 0.7 < (ids[target] == tokenizer.mask_token_id).float().mean() < 0.9


def test_the_classifier_learns_palette_shape_and_activity_each_by_its_own_cross_entropy():
    torch.manual_seed(0)
    classifier = aj.build_classifier().eval()
    images, _, drawn = aj.scenes(np.random.default_rng(2), 6)
    with torch.no_grad():
        logits = classifier(pixel_values=images * 2 - 1).logits
        want = (F.cross_entropy(logits[:, :8], torch.tensor([d["palette"] for d in drawn]))
                + F.cross_entropy(logits[:, 8:14], torch.tensor([drawing.SCENE_SHAPES.index(d["shape"]) for d in drawn]))
                + F.cross_entropy(logits[:, 14:], torch.tensor([0 if d["activity"] is None else 1 + aj.ACTIVITIES.index(d["activity"]) for d in drawn])))
        assert aj.classifier_loss(classifier, images, drawn).item() == pytest.approx(want.item(), rel=1e-6)
    assert aj.LABELS[14] == "activity none" and aj.LABELS[15] == "activity riding a bike" and len(aj.LABELS) == 21


def test_the_independent_judge_reads_the_prompts_activity_and_subject(monkeypatch):
    """shows_activity and shows_subject compare the classifier's reading with what each prompt asks for."""
    reading = torch.tensor([[0, 0, 1], [0, 0, 0], [1, 1, 2], [0, 0, 0]])  # palette, shape, activity
    monkeypatch.setattr(aj, "read", lambda classifier, images: reading)
    monkeypatch.setattr(aj, "classifier_at", lambda folder: None)
    prompts = ["a cat riding a bike", "a cat riding a bike", "a dog riding a bike", "a cat"]
    assert aj.shows_activity(None, prompts).tolist() == [1, 0, 0, 1]
    assert aj.shows_subject(None, prompts).tolist() == [1, 1, 1, 1]
    assert aj.shows_subject(None, ["a dog", "a cat", "a cat", "a dog"]).tolist() == [0, 1, 0, 0]


def test_the_alignment_judges_rebuild_is_exact_and_loads_as_a_users_models(tmp_path):
    """build from one seed twice (two steps each, batch 8): the same bytes; the folders load through
    rewards.Alignment (AutoModelForImageTextToText, AutoProcessor, AutoModel) and give one recall in [0, 1] a picture."""
    for name in ("a", "b"):
        aj.build(0, tmp_path / name, "world/tiny_model", vlm_steps=2, bert_steps=2, classifier_steps=2, batch_size=8)
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")
    reward = rewards.make_reward("alignment", "cpu", vlm=str(tmp_path / "a" / "vlm"),
                                 bertscore_model=str(tmp_path / "a" / "bertscore"))
    images, prompts, _ = aj.scenes(np.random.default_rng(0), 3)
    scores, info = reward(images, prompts)
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1 + 1e-6)).all() and len(info["answer"]) == 3
