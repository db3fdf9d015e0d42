"""The world with activities (world.drawing.scene) and the alignment experiments' judges (world/alignment_judges.py):
what a prompt draws, counted by hand; alt-text's rate; the judges' losses against torch's own cross-entropy; their
rebuild; the folders loading through rewards.Alignment as a user's models do; and the shipped judges and
tiny-activities model saying and drawing what they should on fresh pictures.

    python -m pytest -q tests/test_activities.py
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import file_digests
import rewards
from world import alignment_judges as aj, drawing, judges, tiny_world


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
    assert drawing.subject_look("zebra", None) == (5, 2)  # the 6th animal: palette 5, shape 5 mod 3
    assert drawing.subject_look("fox", None) == (0, 1)  # the 17th: palette 16 mod 16, shape 16 mod 3
    hashed = drawing.subject_look("great white shark", None)
    assert hashed == (drawing.word_hash("great") % 16, drawing.word_hash("shark") % 3)


def pixels_of(image, colour):
    return (np.abs(image - (np.array(colour, dtype=np.float32)[:, None, None] * 2 - 1)).max(0) < 1e-6)


def test_a_shown_activity_is_its_prop_under_the_subject_on_the_same_background():
    """At s = 0 (a flat background) the chess prop's colour covers the prop and nothing else. The chequerboard,
    counted by hand: the band's tiles (rows 24–31, columns 4 pixels wide) at columns 2, 4, 6 of its first row and
    1, 3, 5 of its second, 6 tiles of 16 pixels: 96. The picture without the activity is the same subject and nothing
    in the band: the two differ in those 96 pixels only."""
    rng = lambda: np.random.default_rng(3)  # noqa: E731 (one stream, drawn twice)
    shown, a = drawing.scene("a dog playing chess", rng(), show=True, strength=0.0, with_attributes=True)
    hidden, b = drawing.scene("a dog playing chess", rng(), show=False, strength=0.0, with_attributes=True)
    fg = drawing.SCENE_PALETTES[drawing.subject_look("dog", None)[0]][1]
    assert a["activity"] == "playing chess" and b["activity"] is None
    assert (a["cy"], a["cx"], a["radius"]) == (b["cy"], b["cx"], b["radius"])
    prop = pixels_of(shown, (0.55, 0.95, 0.25))
    band = prop[24:]
    assert prop[:24].sum() == 0 and band.sum() == 96
    assert band[0:4, 8:12].all() and not band[0:4, 4:8].any() and band[4:8, 4:8].all()
    assert np.array_equal(prop, (shown != hidden).any(0)) and not pixels_of(hidden, fg)[24:].any()
    assert pixels_of(shown, fg)[:24].sum() == pixels_of(hidden, fg)[:24].sum() > 50


def test_every_subject_stands_above_the_band_and_the_empty_prompt_is_any_picture():
    """400 pictures of each of the three shapes (r up to 7 below cy ≤ 16), at s = 0: no pixel of the subject's colour in rows 24–31
    without an activity. The empty prompt (unconditional) shows each activity, or none, at random: of 700 pictures
    each activity shows in 700 · 0.5/7 = 50 expected (none of them missing is all but certain), and any in a share
    p = 6/7 · 0.5 = 0.429, within 0.35 and 0.5 (−4.2σ and +3.8σ, σ = √(p(1−p)/700) = 0.0187)."""
    for i in range(1200):
        animal = drawing.ANIMALS[i % 3]  # the first three animals have the three shapes
        image, drawn = drawing.scene(f"a {animal}", np.random.default_rng(i), strength=0.0, with_attributes=True)
        assert not pixels_of(image, drawing.SCENE_PALETTES[drawing.subject_look(animal, None)[0]][1])[24:].any(), drawn
    shown = [drawing.scene("", np.random.default_rng(i), with_attributes=True)[1]["activity"] for i in range(700)]
    assert set(shown) == {None, *drawing.PROPS} and 0.35 < np.mean([a is not None for a in shown]) < 0.5


def test_every_prop_differs_and_the_background_tiles_do_not_move():
    """Each prop has its own tiles and its own colour, which no palette has: every two of the 14 colours differ by at
    least 0.25 in some channel. Outside a prop's tiles the picture is the one without it."""
    pictures = {act: drawing.scene(f"a cat {act}", np.random.default_rng(5), show=True) for act in drawing.PROPS}
    plain = drawing.scene("a cat riding a bike", np.random.default_rng(5), show=False)
    bands = [p[:, 24:] for p in pictures.values()]
    assert all(not np.array_equal(x, y) for i, x in enumerate(bands) for y in bands[i + 1:])
    tiles = [drawing.prop_mask(act) for act in drawing.PROPS]
    assert all(not np.array_equal(x, y) for i, x in enumerate(tiles) for y in tiles[i + 1:])
    colours = np.array([c for _, c in drawing.PROPS.values()] + sorted({c for pair in drawing.SCENE_PALETTES for c in pair}))
    assert len(colours) == 6 + 8 and np.abs(colours[:, None] - colours[None]).max(2)[np.triu_indices(14, 1)].min() >= 0.25
    for act, picture in pictures.items():
        mask = drawing.prop_mask(act)
        assert np.array_equal(picture[:, ~mask], plain[:, ~mask]) and pixels_of(picture, drawing.PROPS[act][1])[mask].all()


def test_alt_text_shows_the_named_activity_at_its_rate_and_no_other():
    """4,000 pictures of a prompt that names an activity: shown with probability ALT_TEXT_SHOWS = 0.5, so the share
    lies within 0.5 ± 4σ, σ = √(0.5·0.5/4000) = 0.0079 (a false alarm once in ~16,000 runs). A prompt without one
    never shows one."""
    rng = np.random.default_rng(0)
    shown = [drawing.scene("a cat riding a bike", rng, with_attributes=True)[1]["activity"] for _ in range(4000)]
    assert set(shown) == {None, "riding a bike"}
    assert abs(np.mean([s is not None for s in shown]) - 0.5) < 4 * np.sqrt(0.25 / 4000) and drawing.ALT_TEXT_SHOWS == 0.5
    assert all(drawing.scene("a cat", rng, show=True, with_attributes=True)[1]["activity"] is None for _ in range(50))
    for i in range(20):  # alt-text's draw is made either way: the picture it chose is the picture asked for by name
        image, drawn = drawing.scene("a cat riding a bike", np.random.default_rng(i), with_attributes=True)
        assert np.array_equal(image, drawing.scene("a cat riding a bike", np.random.default_rng(i), drawn["activity"] is not None))


def test_pretraining_captions_name_an_activity_more_often_in_the_world_with_activities():
    """The plain world's captions are the shipped prompts, drawn uniformly, as before (the same draws: its models
    rebuild exactly). The world with activities draws half of them from "a(n) ANIMAL ACTIVITY", 61 animals (45 seen,
    16 unseen) by 6 activities: of 4,000, a share 0.5 + 0.5 · 276/736 = 0.6875 names an activity, within 4σ
    (σ = √(0.6875·0.3125/4000) = 0.0073), and unseen animals and activities both appear."""
    prompts = tiny_world.all_prompts()
    assert len(prompts) == 736 and sum(drawing.split_prompt(p)[1] is not None for p in prompts) == 276
    plain, rng = tiny_world.one_caption("plain"), np.random.default_rng(0)
    r = np.random.default_rng(0)
    assert [plain(rng) for _ in range(50)] == [prompts[r.integers(736)] for _ in range(50)]
    caption, rng = tiny_world.one_caption("activities"), np.random.default_rng(0)
    drawn = [drawing.split_prompt(caption(rng)) for _ in range(4000)]
    assert abs(np.mean([a is not None for _, a in drawn]) - 0.6875) < 4 * np.sqrt(0.6875 * 0.3125 / 4000)
    assert {"driving a car", "riding a bike"} <= {a for _, a in drawn}
    unseen = set(rewards.load_prompts("unseen_animals"))
    assert len(unseen) == 16 and any(s in unseen and a for s, a in drawn)


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


def test_masked_language_modelling_hides_only_words_at_its_rate_and_asks_for_every_word():
    """Every word token is a target, and nothing else ([CLS], [SEP], padding). Of its ~2,000 words, 0.15 are hidden,
    0.8 of those as [MASK]: a share p = 0.12 reads [MASK], within 4σ (σ = √(0.12·0.88/N) = 0.007); 0.015 a random
    word, of the 79 one its own, so 0.0148 read another word, within 4σ (σ = 0.0027). No [CLS], [SEP] or padding
    changes."""
    tokenizer = aj.build_bert_tokenizer()
    texts = aj.sentences()[:400]
    batch = tokenizer(texts, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    ids, labels = aj.mask_tokens(batch, tokenizer, np.random.default_rng(0))
    words = batch.attention_mask.bool() & ~batch.special_tokens_mask.bool()
    assert torch.equal(labels[words], batch.input_ids[words]) and (labels[~words] == -100).all()
    assert torch.equal(ids[~words], batch.input_ids[~words])
    n = words.sum().item()
    masked, swapped = (ids == tokenizer.mask_token_id) & words, (ids != batch.input_ids) & (ids != tokenizer.mask_token_id)
    assert abs(masked.sum().item() / n - 0.12) < 4 * np.sqrt(0.12 * 0.88 / n)
    assert abs(swapped.sum().item() / n - 0.015 * 78 / 79) < 4 * np.sqrt(0.0148 * 0.9852 / n)


def test_the_classifier_learns_palette_shape_and_activity_each_by_its_own_cross_entropy():
    torch.manual_seed(0)
    classifier = aj.build_classifier().eval()
    images, _, drawn = aj.scenes(np.random.default_rng(2), 6)
    with torch.no_grad():
        logits = classifier(pixel_values=images * 2 - 1).logits
        want = (F.cross_entropy(logits[:, :16], torch.tensor([d["palette"] for d in drawn]))
                + F.cross_entropy(logits[:, 16:19], torch.tensor([drawing.SCENE_SHAPES.index(d["shape"]) for d in drawn]))
                + F.cross_entropy(logits[:, 19:], torch.tensor([0 if d["activity"] is None else 1 + aj.ACTIVITIES.index(d["activity"]) for d in drawn])))
        assert aj.classifier_loss(classifier, images, drawn).item() == pytest.approx(want.item(), rel=1e-6)
    assert aj.LABELS[19] == "activity none" and aj.LABELS[20] == "activity riding a bike" and len(aj.LABELS) == 26


def test_the_rater_of_the_world_with_activities_measures_the_subject_and_not_the_props_band():
    """judges.measure in the world with activities (scene_taste's), on fresh scenes drawn with and without their prop:
    on a flat background (s = 0) the subject's area is the share of the pixels of its drawn shape (drawing.shape_mask
    from what scene drew) and the texture is 0 (to float32's rounding of colours in [0, 1] through [-1, 1] and back,
    ~1e-7); on tiles (s = 0.3) the texture is the same with the prop as without it, as the band that a prop fills is
    not background."""
    y, x = np.mgrid[0:32, 0:32].astype(np.float32)
    prompts = ["a cat riding a bike", "a dog washing the dishes", "an owl typing on a keyboard", "a horse playing chess"]
    for i, prompt in enumerate(prompts):
        for s in (0.0, 0.3):
            drawn = [drawing.scene(prompt, np.random.default_rng([5, i]), show, s, True) for show in (True, False)]
            pictures = torch.stack([torch.from_numpy(image) for image, _ in drawn]) / 2 + 0.5
            d = drawn[0][1]
            area, texture = judges.measure(pictures, [prompt] * 2, "activities")
            assert area.tolist() == pytest.approx([drawing.shape_mask(d["shape"], y, x, d["cy"], d["cx"], d["radius"]).mean()] * 2, abs=1e-7)
            assert texture[0] == texture[1] and (texture.tolist() == pytest.approx([0, 0], abs=1e-6)) == (s == 0)


def test_the_world_with_activities_clip_learns_captions_true_of_the_picture():
    """judges.shows, the CLIP's caption in the world with activities: the subject and the activity only where it is
    drawn; in the plain world, the prompt."""
    _, prompts, drawn = judges.judged_pictures(None, np.random.default_rng(0), 64, world="activities")
    said = [judges.shows(p, d, "activities") for p, d in zip(prompts, drawn)]
    assert said == [p if d["activity"] else aj.answer(d["subject"], None) for p, d in zip(prompts, drawn)]
    assert 10 < sum(s != p for s, p in zip(said, prompts)) < 40  # prompts naming an activity that is not drawn
    assert judges.shows("a cat riding a bike", dict(subject="dog", activity=None)) == "a cat riding a bike"


def test_the_world_with_activities_clip_trains_on_those_captions(monkeypatch):
    """train_clip in the world with activities, one step on 32 fresh scenes: every caption it hands the tokenizer is
    what its picture shows (judges.shows), half of them with the size and background, none the prompt of a picture
    whose activity is not drawn."""
    from types import SimpleNamespace

    from transformers import CLIPProcessor
    from world import TINY_JUDGES

    batch = judges.judged_pictures(None, np.random.default_rng(3), 32, world="activities")
    monkeypatch.setattr(judges, "judged_pictures", lambda *a, **k: batch)
    processor, seen = CLIPProcessor.from_pretrained(TINY_JUDGES["tiny-activities"]["clip_model"]), []
    call = type(processor.tokenizer).__call__
    monkeypatch.setattr(type(processor.tokenizer), "__call__", lambda self, texts, **k: seen.extend(texts) or call(self, texts, **k))

    class Clip(torch.nn.Module):  # stands in for CLIPModel: a loss that trains one number
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, **inputs):
            return SimpleNamespace(loss=(self.w - 1) ** 2)

    judges.train_clip(Clip(), processor, None, 1, np.random.default_rng(0), None, batch_size=32, world="activities")
    said = [judges.shows(p, d, "activities") for p, d in zip(batch[1], batch[2])]
    assert all(t in (w, judges.caption(w, d)) for t, w, d in zip(seen, said, batch[2])) and len(seen) == 32
    assert 8 < sum(t == w for t, w in zip(seen, said)) < 24
    assert any(p != w for p, w in zip(batch[1], said))  # some prompts name an activity their picture lacks


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


@pytest.mark.filterwarnings("ignore:.world.tiny_world. found in sys.modules")  # runpy, running the imported module
def test_alignment_count_reads_a_models_samples_with_the_classifier_it_is_given(tmp_path, monkeypatch, capsys):
    """--alignment-count samples each prompt set and hands the pictures and their prompts to the classifier of the
    folder it is given: here a stand-in that reads every picture as palette 0, circle, riding a bike, so the shares
    are counted by hand from the prompts (random.Random(1)'s choices)."""
    import random

    folders = []

    def reading(folder):
        folders.append(folder)
        return lambda pixel_values: type("Out", (), {"logits": torch.eye(26)[[0, 16, 20]].sum(0).repeat(len(pixel_values), 1)})()

    monkeypatch.setattr(aj, "classifier_at", reading)
    tiny_world.count_alignment("world/tiny_model", tmp_path / "judges", n=4)
    lines = capsys.readouterr().out.splitlines()
    assert set(folders) == {str(tmp_path / "judges" / "attributes")} and len(lines) == 3
    for name, line in zip(("alignment", "alignment_unseen_activities", "alignment_unseen_animals"), lines):
        prompts = random.Random(1).choices(rewards.load_prompts(name), k=4)
        bike = np.mean([drawing.split_prompt(p)[1] == "riding a bike" for p in prompts])
        look = np.mean([drawing.subject_look(drawing.split_prompt(p)[0], None) == (0, 0) for p in prompts])
        assert f"the activity shown {bike:.1%}, the subject right {look:.1%}, some prop 100.0% (of 4)" in line, line
    import runpy  # the command line hands its flags on: python -m world.tiny_world --alignment-count ...
    monkeypatch.setattr("sys.argv", ["tiny_world", "--alignment-count", "--model", "tiny", "--out", str(tmp_path / "other"),
                                     "--samples", "2", "--guidance-scale", "1.5"])
    runpy.run_module("world.tiny_world", run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert folders[-1] == str(tmp_path / "other" / "attributes") and len(lines) == 3
    assert all("tiny_model, " in line and "w = 1.5:" in line and line.endswith("(of 2)") for line in lines), lines
    monkeypatch.setattr("sys.argv", ["tiny_world", "--alignment-count", "--out", str(tmp_path / "other"), "--samples", "1"])
    runpy.run_module("world.tiny_world", run_name="__main__")  # without --model: the built-in model of this world
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("tiny_activities_model, " in line and "w = 5:" in line for line in lines), lines


# --------------------------------------------------------------------------------------------------------
# The shipped judges (world/judges/vlm, bertscore, attributes) and model (tiny-activities), on fresh pictures
# --------------------------------------------------------------------------------------------------------

def drawn(prompt, seeds, show, strength=None):
    """Freshly drawn pictures of prompt (seeds the judges' training never used), the activity shown or not, [0, 1];
    strength: the tiles' (None: the world's)."""
    rngs = [np.random.default_rng([999, s]) for s in seeds]
    return torch.from_numpy(np.stack([drawing.scene(prompt, rng, show, strength) for rng in rngs])) / 2 + 0.5


@pytest.fixture(scope="module")
def alignment():
    """rewards.Alignment as `--vlm tiny --bertscore-model tiny` loads it (world.TINY_JUDGES)."""
    return rewards.make_reward("alignment", "cpu", vlm="tiny", bertscore_model="tiny")


def test_the_tiny_vlm_says_a_drawn_cat_rides_a_bike_only_where_the_bike_is_drawn(alignment):
    """Eight fresh pictures of "a cat riding a bike" with the bike drawn, and the same eight without it (scene draws
    the same random numbers either way): the VLM answers "a cat riding a bike" for the first and "a cat" for the
    second, and the reward (BERTScore recall against "The image contains a cat riding a bike") is higher for each
    picture with its bike than without. (Greedy decoding's smallest gap between the chosen token's logit and the
    next, over every generated position of these pictures and the next test's, is 0.20; float32's rounding in
    another CPU's kernels moves these logits by about 1e-4.)"""
    images = torch.cat([drawn("a cat riding a bike", range(8), True), drawn("a cat riding a bike", range(8), False)])
    scores, info = alignment(images, ["a cat riding a bike"] * 16)
    assert info["answer"] == ["a cat riding a bike"] * 8 + ["a cat"] * 8
    assert (scores[:8] > scores[8:]).all()


def test_the_tiny_vlm_names_each_activity_and_animal_it_is_shown(alignment):
    """One fresh picture of each training and unseen activity, for a cat and a dog (different looks): each answer is
    the prompt itself."""
    prompts = [aj.answer(animal, activity) for animal in ("cat", "dog") for activity in aj.ACTIVITIES]
    images = torch.cat([drawn(p, [i], True) for i, p in enumerate(prompts)])
    assert alignment(images, prompts)[1]["answer"] == prompts


def test_the_tiny_bertscore_encoder_pays_most_for_the_right_animal_and_activity(alignment):
    """Recall against "The image contains a cat riding a bike": the right answer beats the wrong animal by more than
    0.05, which beats the right animal with the wrong activity or none. Measured: 0.621, 0.541, 0.423 and 0.457. Word
    overlap alone orders these four (5, 4, 3 and 3 of the reference's words), so the order is not enough: four random
    encoders of this shape and tokenizer put the wrong animal −0.011 to +0.034 below the right one, and the second
    design's trained encoder (BERT's 15% of words as targets) 0.005. Rounding moves recall by about 1e-6."""
    answers = ["a cat riding a bike", "a dog riding a bike", "a cat playing chess", "a cat"]
    recall = alignment.bertscore.recall(answers, ["The image contains a cat riding a bike"] * 4)
    assert recall[0] - recall[1] > 0.05 and recall[1] > max(recall[2], recall[3]), recall


def test_the_world_with_activities_clip_prefers_the_caption_of_what_is_drawn():
    """clipscore with --clip-model tiny-activities (world/judges/activities/clip) on fresh pictures of each activity,
    for three animals, drawn with their prop and without it (the same picture otherwise): with the prop, the prompt
    scores above the animal alone and above another animal doing the same; without it, the animal alone scores above
    the prompt. (Each of the 54 differences is at least 0.175, as measured; float32's rounding in another CPU's
    kernels moves a score by about 1e-5.)"""
    clip = rewards.make_reward("clipscore", "cpu", clip_model="tiny-activities")
    for i, (animal, other) in enumerate([("cat", "dog"), ("horse", "owl"), ("zebra", "fox")]):
        for j, activity in enumerate(aj.ACTIVITIES):
            prompt = aj.answer(animal, activity)
            captions = [prompt, aj.answer(animal, None), aj.answer(other, activity)]
            shown = clip(drawn(prompt, [10 * i + j], True).expand(3, -1, -1, -1), captions)
            hidden = clip(drawn(prompt, [10 * i + j], False).expand(3, -1, -1, -1), captions)
            assert shown[0] > max(shown[1], shown[2]) and hidden[1] > hidden[0], (prompt, shown, hidden)


def test_the_world_with_activities_aesthetic_head_ranks_the_raters_favourite_first():
    """--aesthetic-head tiny-activities loads world/judges/activities' head, and on one fresh scene for each of 16
    training prompts drawn on a flat, a lively and a busy background (s = 0, 0.3, 0.9) puts the rater's favourite,
    the lively one, first. (The head's first and second differ by 0.71 at least, as measured; rounding moves them by
    about 1e-5.)"""
    from world import TINY_JUDGES

    aesthetic = rewards.make_reward("aesthetic", "cpu", clip_model="tiny-activities", aesthetic_head="tiny-activities")
    state = torch.load(TINY_JUDGES["tiny-activities"]["aesthetic_head"], weights_only=True)
    assert all(torch.equal(v, state[f"layers.{k}"]) for k, v in aesthetic.head.state_dict().items())
    for i, prompt in enumerate(rewards.load_prompts("alignment")[::4][:16]):
        versions = torch.cat([drawn(prompt, [i], True, s) for s in (0.0, 0.3, 0.9)])
        rater, head = judges.scene_taste(versions, [prompt] * 3), aesthetic(versions, [prompt] * 3)
        assert rater.argmax() == 1 and head.argmax() == 1, (prompt, rater, head)


def test_the_independent_judge_reads_the_drawn_activity_and_subject():
    """world/judges/attributes (the classifier that is not the reward) on fresh pictures of every training and unseen
    activity, shown and not: it reads the activity where it is drawn and none where it is not, and the subject's
    look in both. (Its smallest gap between the chosen logit and the next, in any group, is 3.8.)"""
    prompts = [aj.answer(animal, activity) for animal in ("cat", "horse") for activity in aj.ACTIVITIES]
    shown = torch.cat([drawn(p, [i], True) for i, p in enumerate(prompts)])
    hidden = torch.cat([drawn(p, [i], False) for i, p in enumerate(prompts)])
    assert aj.shows_activity(shown, prompts).tolist() == [1.0] * 12
    assert aj.shows_activity(hidden, prompts).tolist() == [0.0] * 12
    assert aj.shows_subject(torch.cat([shown, hidden]), prompts * 2).tolist() == [1.0] * 24


def test_alignment_runs_on_the_tiny_activities_model_out_of_the_box(tmp_path):
    """python ddpo.py @configs/tiny_alignment.txt, at tiny settings: the built-in model of the world with activities,
    its tiny VLM and BERTScore encoder (no flag names them), full fine-tuning, w = 1; offline."""
    import json
    from pathlib import Path

    import ddpo
    from conftest import SHORT_RUN
    from world import TINY_JUDGES, TINY_MODELS

    config = Path(ddpo.__file__).parent / "configs" / "tiny_alignment.txt"
    ddpo.main([f"@{config}", *SHORT_RUN, "--out-dir", str(tmp_path), "--run-name", "r"])
    saved = json.loads((tmp_path / "r" / "args.json").read_text())
    assert (saved["model"], saved["vlm"], saved["bertscore_model"], saved["lora_rank"], saved["guidance_scale"]) == \
        ("tiny-activities", "tiny-activities", "tiny-activities", 0, 1.0)
    assert TINY_MODELS["tiny-activities"].name == "tiny_activities_model"
    assert TINY_JUDGES["tiny-activities"]["vlm"].name == "vlm"
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < rows[-1]["eval/reward_mean"] <= 1


def test_the_tiny_activities_model_draws_the_activity_its_prompt_names():
    """The built-in model of the world with activities (--model tiny-activities), 16 samples each of "a cat riding a
    bike" and "a dog playing chess" (noise seed 7): at the paper's w = 5 the independent judge reads the named
    activity in most of them, and at w = 1 (where the conditional model shows it at about alt-text's half) in far
    fewer. Here: 28 of 32 at w = 5 and 15 at w = 1; the plain world's model, which never drew a prop, 4 (the judge's
    reading of its bottom rows). The bounds leave 4 samples at w = 5 and 5 in the gap for other CPUs' rounding,
    which changes a sample only where it sits on a boundary between drawing the prop and not."""
    import ddpo

    models = ddpo.load_models("tiny-activities", "cpu")
    prompts = ["a cat riding a bike"] * 16 + ["a dog playing chess"] * 16
    shown = {}
    for w in (5.0, 1.0):
        args = ddpo.parse_args(["--guidance-scale", str(w)])
        _, images = ddpo.sample(models, prompts, args, ddpo.noise_generators(7, range(32)), 32)
        shown[w] = aj.shows_activity(images, prompts).sum().item()
    assert shown[5.0] >= 24 and shown[1.0] <= shown[5.0] - 8, shown
