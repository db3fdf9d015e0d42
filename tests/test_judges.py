"""The tiny judges (world/judges.py): the world's rater against hand-counted pixels, the trained CLIP and aesthetic
head saying meaningful things about freshly drawn pictures, and the tiny models defaulting to them.

    python -m pytest -q tests/test_judges.py
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpo
from conftest import SHORT_RUN, file_digests
import rewards
from world import JUDGES, TINY_JUDGES, TINY_MODELS, drawing, judges

CAT_BG, CAT_FG = (torch.tensor(c) for c in drawing.PALETTES[drawing.prompt_attributes("a cat", None)[0]])


def test_the_rater_measures_area_and_texture_on_the_pixels_and_scores_them_as_stated():
    """A picture made by hand: "a cat"'s flat background with a 16x16 patch moved by +0.1 in every channel (RGB
    distance 0.17, nearer the background than the subject; clamped at 1 where the colour is near it), and a 10x10
    square of the subject's colour, and 16 pixels 60% of the way to it (neither): area = 100/1024, texture = the
    patch's |Δ| summed / (1024 − 100 − 16)."""
    image = CAT_BG[:, None, None].expand(3, 32, 32).clone()
    image[:, 16:32, 0:16] += 0.1  # 256 pixels: the moved tiles
    image[:, 2:12, 20:30] = CAT_FG[:, None, None]  # 100 pixels of the subject, away from the tiles
    image[:, 20:24, 24:28] = (0.4 * CAT_BG + 0.6 * CAT_FG)[:, None, None]  # 16 nearer the subject, but not within NEAR
    assert (CAT_FG - CAT_BG).norm() * 0.4 > judges.NEAR  # (so neither subject nor background)
    image = image.clamp(0, 1)
    area, texture = judges.measure(image[None], ["a cat"])
    moved = ((image[:, 16:32, 0:16] - CAT_BG[:, None, None]).abs().mean(0)).sum()  # 0.1 where not clamped at 1
    assert area.item() == pytest.approx(100 / 1024, abs=1e-7)
    assert texture.item() == pytest.approx(moved.item() / (1024 - 100 - 16), rel=1e-6)
    want = 5 + 40 * (100 / 1024 - 0.1) - 20 * abs(moved.item() / (1024 - 100 - 16) - 0.13)
    assert judges.taste(image[None], ["a cat"]).item() == pytest.approx(want, rel=1e-6)


def test_a_subject_larger_than_the_best_scores_no_more_and_a_busy_background_scores_less():
    pictures = {(r, s): torch.from_numpy(drawing.draw("a cat", np.random.default_rng(1), s, r))[None] / 2 + 0.5
                for r in (7.0, 9.0) for s in (0.0, 0.3, 1.0)}
    area = {k: judges.measure(v, ["a cat"])[0].item() for k, v in pictures.items()}
    score = {k: judges.taste(v, ["a cat"]).item() for k, v in pictures.items()}
    assert area[9.0, 0.0] > area[7.0, 0.0] > judges.BEST_AREA - 0.01
    assert score[9.0, 0.0] - score[7.0, 0.0] == pytest.approx(40 * (judges.BEST_AREA - min(area[7.0, 0.0], judges.BEST_AREA)), abs=1e-5)
    assert score[7.0, 0.3] > score[7.0, 0.0] and score[7.0, 0.3] > score[7.0, 1.0]


def test_captions_name_the_prompt_then_the_size_and_the_background():
    assert judges.caption("a cat", dict(radius=6.9, strength=0.3)) == "a cat, large, lively background"
    assert judges.caption("a cat", dict(radius=5.1, strength=0.05)) == "a cat, small, plain background"
    assert judges.caption("a cat", dict(radius=6.0, strength=0.7)) == "a cat, medium, busy background"


# --------------------------------------------------------------------------------------------------------
# The trained judges (world/judges/), on pictures they never saw
# --------------------------------------------------------------------------------------------------------

def fresh(prompt, seed, strength=None, radius=None):
    return torch.from_numpy(drawing.draw(prompt, np.random.default_rng([999, seed]), strength, radius))[None] / 2 + 0.5


@pytest.fixture(scope="module")
def aesthetic():
    return rewards.make_reward("aesthetic", "cpu", clip_model="tiny", aesthetic_head="tiny")


def test_the_aesthetic_head_ranks_the_raters_favourite_first(aesthetic):
    """The same picture (prompt, place) drawn small on a flat background, small and busy, and large on a lively one:
    the head puts the rater's favourite (large, lively) first, for every prompt tried."""
    prompts = rewards.load_prompts("simple_animals")[:12]
    for i, prompt in enumerate(prompts):
        versions = torch.cat([fresh(prompt, i, s, r) for s, r in ((0.0, 5.0), (0.9, 5.0), (0.3, 7.0))])
        rater, head = judges.taste(versions, [prompt] * 3), aesthetic(versions, [prompt] * 3)
        assert rater.argmax() == 2 and head.argmax() == 2, (prompt, rater, head)


def test_the_aesthetic_head_agrees_with_the_rater_on_pictures_it_never_saw(aesthetic):
    prompts = rewards.load_prompts("simple_animals")
    images = torch.cat([fresh(p, 100 + i, np.random.default_rng(i).uniform(0, 0.8)) for i, p in enumerate(prompts)])
    assert judges.spearman(aesthetic(images, prompts), judges.taste(images, prompts)) > 0.8


def test_clipscore_prefers_the_matching_prompt():
    """Each picture against its own prompt and against a prompt whose palette and shape differ (the world draws only
    those): the tiny CLIP scores its own higher, for every pair."""
    clip = rewards.make_reward("clipscore", "cpu", clip_model="tiny")
    prompts = rewards.load_prompts("alignment")[:: 7][:16]
    look = {p: drawing.prompt_attributes(p, None) for p in prompts}
    for i, p in enumerate(prompts):
        image = fresh(p, i)
        others = [q for q in prompts if look[q][0] != look[p][0] and look[q][1] != look[p][1]][:3]
        scores = clip(image.expand(1 + len(others), -1, -1, -1), [p, *others])
        assert scores[0] > scores[1:].max(), (p, others, scores)


@pytest.mark.parametrize("world", ["plain", "activities"])
def test_the_judges_rebuild_is_exact(tmp_path, world, monkeypatch):
    """judges.build from one seed twice (two CLIP steps, 64 rated pictures, three head steps): the same bytes in every
    file, and the files the shipped folder has (world/judges for the plain world, but for the judges that a rebuild
    leaves in place: alignment_judges' and the other world's; world/judges/activities for the world with
    activities). Half their pictures go through the VAE of the world's own model."""
    from diffusers import AutoencoderKL

    loaded, load = [], AutoencoderKL.from_pretrained
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", lambda *a, **k: loaded.append(a[0]) or load(*a, **k))
    (tmp_path / "b" / "vlm").mkdir(parents=True)  # the alignment judges share the folder, and stay
    (tmp_path / "b" / "vlm" / "config.json").write_text("{}")
    for name in ("a", "b"):
        judges.build(0, tmp_path / name, clip_steps=2, ratings=64, head_steps=3, world=world)
    assert loaded == [TINY_MODELS["tiny-activities" if world == "activities" else "tiny"]] * 2
    a = file_digests(tmp_path / "a")
    assert file_digests(tmp_path / "b") == {**a, "vlm/config.json": file_digests(tmp_path / "b")["vlm/config.json"]}
    if world == "plain":
        shipped = {k for k in file_digests(JUDGES) if k.split("/")[0] not in ("vlm", "bertscore", "attributes", "activities")}
    else:
        shipped = file_digests(JUDGES / "activities").keys()
    assert a.keys() == shipped


# --------------------------------------------------------------------------------------------------------
# Which judge a run loads
# --------------------------------------------------------------------------------------------------------

def test_the_tiny_models_default_to_the_tiny_judges_and_a_typed_flag_wins(tmp_path):
    """Each tiny model defaults to its own world's judges: tiny and tiny-flow to 'tiny', tiny-activities to
    'tiny-activities', whose CLIP and aesthetic head learned its world (their VLM and BERTScore encoder are one)."""
    judged = ("clip_model", "aesthetic_head", "pickscore_model", "pickscore_processor",  # PickScore is a CLIP
              "vlm", "bertscore_model")  # alignment's two, trained on the world with activities
    for model, world in (("tiny", "tiny"), ("tiny-flow", "tiny"), ("tiny-activities", "tiny-activities")):
        args = ddpo.parse_args(["--model", model, "--reward", "aesthetic"])
        assert {k: getattr(args, k) for k in judged} == dict.fromkeys(judged, world)
        assert TINY_JUDGES[world].keys() == set(judged)
    plain, activities = TINY_JUDGES["tiny"], TINY_JUDGES["tiny-activities"]
    assert all(activities[k].parent == JUDGES / "activities" for k in judged[:4])
    assert all(plain[k].parent == JUDGES for k in judged) and activities["vlm"] == plain["vlm"]
    assert activities["bertscore_model"] == plain["bertscore_model"]
    args = ddpo.parse_args(["--reward", "aesthetic", "--clip-model", "my/clip", "--pickscore-processor", "p", "--vlm", "v"])
    assert (args.clip_model, args.aesthetic_head, args.pickscore_processor, args.vlm) == ("my/clip", "tiny", "p", "v")
    assert args.imagereward_model == rewards.MODEL_OPTIONS["imagereward_model"][0]  # no tiny judge for it
    hub = ddpo.parse_args(["--model", "CompVis/stable-diffusion-v1-4", "--reward", "aesthetic"])
    assert hub.clip_model == rewards.MODEL_OPTIONS["clip_model"][0]


def test_a_run_continuing_a_tiny_run_uses_the_tiny_judges_and_a_resumed_run_keeps_its_own(tmp_path):
    ddpo.main([*SHORT_RUN, "--epochs", "1", "--out-dir", str(tmp_path), "--run-name", "first", "--clip-model", "mine"])
    args = ddpo.parse_args(["--model", str(tmp_path / "first"), "--reward", "aesthetic"])
    assert args.clip_model == "tiny"
    resumed = ddpo.parse_args(["--resume", str(tmp_path / "first")])
    assert resumed.clip_model == "mine"


def test_tiny_names_the_world_judges_and_a_reward_without_one_is_one_line(aesthetic):
    state = torch.load(TINY_JUDGES["tiny"]["aesthetic_head"], weights_only=True)
    assert all(torch.equal(v, state[f"layers.{k}"]) for k, v in aesthetic.head.state_dict().items())
    assert aesthetic.clip.config.projection_dim == 768 and aesthetic.clip.config.vision_config.image_size == 32
    with pytest.raises(rewards.RewardLoadError, match="no tiny judge for --imagereward-model"):
        rewards.make_reward("imagereward", "cpu", imagereward_model="tiny")


def test_aesthetic_runs_on_the_tiny_model_out_of_the_box(tmp_path):
    """python ddpo.py @configs/tiny_aesthetic.txt (--reward aesthetic), at tiny settings: the tiny judges score it,
    offline; its 10 timesteps a pass train both of SHORT_RUN's 2 steps in one pass."""
    config = Path(ddpo.__file__).parent / "configs" / "tiny_aesthetic.txt"
    ddpo.main([f"@{config}", *SHORT_RUN, "--out-dir", str(tmp_path), "--run-name", "r"])
    saved = json.loads((tmp_path / "r" / "args.json").read_text())
    assert saved["clip_model"] == saved["aesthetic_head"] == "tiny"
    assert (saved["reward"], saved["algo"], saved["timesteps_per_pass"], saved["epochs"]) == ("aesthetic", "is", 10, 1)
    alone = ddpo.parse_args([f"@{config}"])  # the README's run: 120 epochs, not SHORT_RUN's 1
    assert (alone.epochs, alone.num_steps, alone.timesteps_per_pass) == (120, 20, 10)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert 2 < rows[-1]["eval/reward_mean"] < 9  # LAION's scale, roughly: the head's, not a random one's
