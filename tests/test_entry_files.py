"""What the entry files write, and the one-line refusals the README promises on the error paths: evaluate.py's grids
and mean rewards against the images it sampled, export.py's saved weights against the run's checkpoint, a reward
that returns ±inf, and a full disk in the middle of an epoch. The tiny built-in model at tiny settings.

    python -m pytest -q tests/test_entry_files.py
"""
import errno
import io
import json
import random
import re
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from plumbing import checkpoints
import ddpo
import evaluate
import export
from plumbing import files
import rewards
from conftest import file_digests

TINY = ["--num-steps", "2", "--samples-per-epoch", "4", "--samples-per-prompt", "4", "--sample-batch-size", "4",
        "--num-minibatches", "1", "--prompts", "simple_animals"]


def train(out, name, *extra):
    ddpo.main([*TINY, "--epochs", "1", "--out-dir", str(out), "--run-name", name, *extra])
    return out / name


def minus_jpeg_kb(pixels):
    """The paper's compressibility, recomputed here from 8-bit pixels (H, W, 3): −(JPEG bytes at quality 95)/1000."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return -len(buffer.getvalue()) / 1000


# --------------------------------------------------------------------------------------------------------
# evaluate.py: which prompts, in which order, and the rewards it reports
# --------------------------------------------------------------------------------------------------------

def grid_tiles(path, n, side, columns=4, cell=128, caption=14):
    """The n pictures of a grid PNG at their own size (side), read back from its cells, and each cell's caption strip.
    A 32-pixel picture fills a 128-pixel cell by nearest-neighbour upscaling, 4x4 copies of each pixel."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    step = cell // side
    tiles, strips = [], []
    for i in range(n):
        x, y = (i % columns) * cell, (i // columns) * (cell + caption)
        block = grid[y:y + cell, x:x + cell]
        assert (block == block[::step, ::step].repeat(step, 0).repeat(step, 1)).all()  # whole pixels, not resampled
        tiles.append(block[::step, ::step])
        strips.append(grid[y + cell:y + cell + caption, x:x + cell])
    return tiles, strips


def caption_strip(text, cell=128, caption=14):
    """A caption as PIL's default font draws it, 2 pixels in and 1 down, on a white strip the width of a cell."""
    strip = Image.new("RGB", (cell, caption), "white")
    ImageDraw.Draw(strip).text((2, 1), text, fill="black")
    return np.asarray(strip)


def test_evaluate_captions_each_picture_with_the_vlms_answer_under_its_reward(tmp_path):
    """A reward that answers, as alignment's VLM does (its extras' "answer"): each cell's caption is its reward, then
    that picture's answer, wrapped at 21 characters over two more lines. The reward here knows which model drew the
    pictures by counting its calls (evaluate.py imports it afresh and scores base's two sets, then the run's): 0.5
    and "PROMPT, drawn by the base model" (two lines for every prompt) for base's, 0.25 and "... the run model" for
    the run's."""
    (tmp_path / "answering.py").write_text(
        "import torch\n"
        "CALLS = []\n"
        "def reward(images, prompts):\n"
        "    CALLS.append(1)\n"
        "    who = 'base' if len(CALLS) <= 2 else 'run'\n"
        "    return torch.full((len(prompts),), 0.5 if who == 'base' else 0.25), {'answer': [f'{p}, drawn by the {who} model' for p in prompts]}\n")
    run = train(tmp_path, "run", "--reward", f"{tmp_path / 'answering.py'}:reward")
    evaluate.main([str(run), "--seed", "3"])
    prompts = random.Random(3).choices(rewards.load_prompts("simple_animals"), k=16)
    _, strips = grid_tiles(run / "eval" / "train.png", 32, side=32, caption=42)
    for i, strip in enumerate(strips):
        who, v = ("base", 0.5) if i % 2 == 0 else ("run", 0.25)
        lines = [f"{('base', 'tuned')[i % 2]} {v:.3g}", *textwrap.wrap(f"{prompts[i // 2]}, drawn by the {who} model", 21)]
        assert len(lines) == 3
        for k, line in enumerate(lines):
            assert (strip[14 * k:14 * (k + 1)] == caption_strip(line)).all(), (i, k, line)


@pytest.mark.parametrize("lora_rank", ["0", "4"])
def test_evaluate_draws_each_prompt_base_then_tuned_in_order_and_reports_the_rewards_of_those_pictures(
        tmp_path, monkeypatch, lora_rank):
    """evaluate.py samples 16 prompts of each set, the same prompts and noise for both models, drawn by --seed; each
    grid holds base and fine-tuned side by side, prompt after prompt, each captioned with its own reward; eval.json's
    means are those of the pictures in the grids (recomputed here from the PNGs' pixels, by PIL's JPEG)."""
    run = train(tmp_path, "run", "--lr", "1e-2", "--lora-rank", lora_rank)
    real_sample, calls = ddpo.sample, []

    def recorded(models, prompts, args, noise, batch_size, desc="sampling"):
        states = [g.get_state() for g in noise]  # the noise as it reaches the sampler, before it is drawn
        traj, images = real_sample(models, prompts, args, noise, batch_size, desc)
        calls.append((list(prompts), states, images))
        return traj, images

    monkeypatch.setattr(ddpo, "sample", recorded)
    summary = evaluate.main([str(run), "--seed", "3"])
    (base_train, base_held, tuned_train, tuned_held) = calls  # both sets from one model, then the other
    train_set, held_set = rewards.load_prompts("simple_animals"), rewards.load_prompts("everyday_objects")
    assert base_train[0] == tuned_train[0] == random.Random(3).choices(train_set, k=16)  # --seed draws them
    assert base_held[0] == tuned_held[0] == random.Random(3).choices(held_set, k=16)  # jpeg's held-out set
    for base, tuned in ((base_train, tuned_train), (base_held, tuned_held)):
        assert all(torch.equal(a, b) for a, b in zip(base[1], tuned[1]))  # the same noise for both models
        assert not torch.equal(base[2], tuned[2])  # and the run did change the model
    own = {tuple(g.get_state().tolist()) for g in ddpo.noise_generators(3, range(16), stream=2)}
    assert {tuple(s.tolist()) for s in base_train[1]} == own  # evaluate.py's own stream …
    for stream, epoch in ((0, 0), (0, 1), (1, 0)):  # … never a training sample's or an epoch's eval sample's
        assert not own & {tuple(g.get_state().tolist()) for g in ddpo.noise_generators(3, range(16), epoch, stream)}

    saved = json.loads((run / "eval" / "eval.json").read_text())
    assert saved == summary and saved["heldout"]["prompts"] == "everyday_objects"
    for name, base, tuned in (("train", base_train, tuned_train), ("heldout", base_held, tuned_held)):
        tiles, strips = grid_tiles(run / "eval" / f"{name}.png", 32, side=32)
        pixels = [(im.clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()  # 8-bit, rounded
                  for im in (base[2], tuned[2])]
        for k in range(16):  # prompt k: base in cell 2k, fine-tuned in cell 2k + 1
            assert (tiles[2 * k] == pixels[0][k]).all() and (tiles[2 * k + 1] == pixels[1][k]).all()
        r = torch.tensor([minus_jpeg_kb(tile) for tile in tiles], dtype=torch.float32)  # a reward is a float32
        for i, (strip, v) in enumerate(zip(strips, r.tolist())):  # -1.405 in float32 is -1.40499997: "-1.4"
            assert (strip == caption_strip(f"{('base', 'tuned')[i % 2]} {v:.3g}")).all(), (name, i)
        # the float32 mean of the same float32 numbers, laid out alike (a strided view sums in another order): ==
        assert saved[name]["base_reward_mean"] == r[0::2].contiguous().mean().item()
        assert saved[name]["tuned_reward_mean"] == r[1::2].contiguous().mean().item()


# --------------------------------------------------------------------------------------------------------
# export.py: the run's own weights, unrounded, whatever precision it sampled in
# --------------------------------------------------------------------------------------------------------

def safetensors_file(path):
    """{name: tensor} and {name: dtype as the header names it}, read from the format itself (an 8-byte little-endian
    header length, a JSON header, the raw bytes), not through the safetensors package that wrote it."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = {k: v for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__"}
    data = raw[8 + n:]
    tensors = {k: torch.frombuffer(bytearray(data[slice(*h["data_offsets"])]), dtype=torch.float32).reshape(h["shape"])
               for k, h in header.items() if h["dtype"] == "F32"}
    return tensors, {k: h["dtype"] for k, h in header.items()}


@pytest.mark.parametrize("lora_rank", ["4", "0"])
@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
def test_export_writes_the_runs_trained_weights_unrounded_in_fp32_whatever_its_precision(tmp_path, precision, lora_rank):
    """A run trains fp32 weights under any --mixed-precision (fp16/bf16 only for the frozen base and the forward pass),
    and export.py writes those: every tensor F32 and equal bit for bit to the checkpoint's; with full fine-tuning the
    folder's other weights are the base model's own files' (tiny_model/, fp32)."""
    run = train(tmp_path, "run", "--lr", "1e-2", "--lora-rank", lora_rank, "--mixed-precision", precision,
                "--num-minibatches", "4")  # 4 steps: fp16's loss scaler skips its first (scale 2^16 overflows)
    export.main([str(run), str(tmp_path / "out")])
    trained, kinds = safetensors_file(checkpoints.latest_checkpoint(run) / "trainable.safetensors")
    assert set(kinds.values()) == {"F32"}
    base, _ = safetensors_file(ddpo.TINY_MODELS["tiny"] / "unet" / "diffusion_pytorch_model.safetensors")
    if lora_rank == "4":  # peft's lora_A / lora_B as diffusers names them: unet.….lora.down / .lora.up
        out, kinds = safetensors_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
        renamed = {"unet." + k.replace(".lora_A.default.", ".lora.down.").replace(".lora_B.default.", ".lora.up."): v
                   for k, v in trained.items()}
    else:
        out, kinds = safetensors_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
        renamed = trained
        assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)  # it trained
        for part in ("vae/diffusion_pytorch_model", "text_encoder/model"):
            copied, copied_kinds = safetensors_file(tmp_path / "out" / f"{part}.safetensors")
            original, _ = safetensors_file(ddpo.TINY_MODELS["tiny"] / f"{part}.safetensors")
            assert set(copied_kinds.values()) == {"F32"} and copied.keys() == original.keys()
            assert all(torch.equal(copied[k], original[k]) for k in original), part
    assert set(kinds.values()) == {"F32"} and out.keys() == renamed.keys()
    assert all(torch.equal(out[k], renamed[k]) for k in out)


# --------------------------------------------------------------------------------------------------------
# Error paths: ±inf from a reward, a full disk in the middle of an epoch; one line, nothing half-written
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_reward_of_plus_or_minus_inf_is_refused_as_nan_is(bad):
    """README: "an output that is not B finite numbers stops the run with one line"; ±inf as NaN, from a tensor,
    a list or an array, naming the sample and its prompt."""
    for kind in (torch.tensor, list, np.array):
        broken = lambda images, prompts: kind([0.5, 2.0, bad])  # noqa: E731
        with pytest.raises(files.RunError, match=rf"^reward 'broken' returned {bad} for sample 2 \(prompt 'cow'\)$"):
            rewards.compute_rewards(broken, "broken", torch.zeros(3, 3, 4, 4), ["cat", "dog", "cow"])


def failing_reward(monkeypatch, at_call, bad):
    """The jpeg reward, but its at_call-th call gives `bad` for its second sample."""
    calls = []

    def reward(images, prompts):
        calls.append(1)
        r = rewards.jpeg_compressibility(images, prompts)
        if len(calls) == at_call:
            r[1] = bad
        return r

    monkeypatch.setattr(ddpo, "load_reward", lambda args: reward)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_an_infinite_reward_in_an_epoch_is_one_line_naming_the_sample_and_the_last_good_checkpoint(
        tmp_path, monkeypatch, main_error, bad):
    failing_reward(monkeypatch, 4, bad)  # calls: eval 0, epoch 1, eval 1, epoch 2
    run = tmp_path / "r"
    line = main_error(*TINY, "--epochs", "3", "--save-every", "1", "--out-dir", str(tmp_path), "--run-name", "r")
    assert re.fullmatch(rf"error: reward 'jpeg' returned {bad} for sample 1 \(prompt '[a-z ]+'\) in epoch 2; the last "
                        rf"good checkpoint is {re.escape(str(run))}/checkpoints/epoch_0001: resume with --resume "
                        rf"{re.escape(str(run))}", line), line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch_0001"]
    assert [json.loads(row)["epoch"] for row in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_evaluate_with_an_infinite_reward_is_one_line_and_writes_nothing(tmp_path, monkeypatch, main_error, bad):
    run = train(tmp_path, "run")
    failing_reward(monkeypatch, 3, bad)  # calls: base train, base heldout, tuned train
    line = main_error(str(run), entry=evaluate.main)
    assert re.fullmatch(rf"error: reward 'jpeg' returned {bad} for sample 1 \(prompt '[a-z ]+'\)", line), line
    assert not (run / "eval").exists()


REAL_FSYNC = files.fsync


def disk_full_at(monkeypatch, name, at_write):
    """A disk that fills up during the at_write-th write of the run file `name`: the temporary file keeps half of
    what was written, and its flush raises ENOSPC (as write() or fsync() does on a full disk)."""
    writes = []

    def fsync(path):
        if Path(path).name == f".{name}.tmp{Path(name).suffix}":
            writes.append(path)
            if len(writes) == at_write:
                Path(path).write_bytes(Path(path).read_bytes()[:Path(path).stat().st_size // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return REAL_FSYNC(path)

    monkeypatch.setattr(files, "fsync", fsync)
    return writes


@pytest.mark.parametrize("name, at_write, epoch", [
    ("metrics.jsonl", 3, 2), ("reward_curve.png", 3, 2), ("grid_002.png", 1, 2), ("grid_002.json", 1, 2),
    ("metrics.jsonl", 1, 0),  # the pretrained model's row, before any checkpoint
])
def test_a_full_disk_in_the_middle_of_an_epoch_is_one_line_leaves_no_half_file_and_keeps_the_checkpoint(
        tmp_path, monkeypatch, main_error, name, at_write, epoch):
    writes = disk_full_at(monkeypatch, name, at_write)
    run = tmp_path / "r"
    argv = [*TINY, "--epochs", "3", "--save-every", "1", "--out-dir", str(tmp_path), "--run-name", "r"]
    line = main_error(*argv)
    assert len(writes) == at_write  # the disk did fill up there
    kept = (f"the last good checkpoint is {run}/checkpoints/epoch_0001: resume with --resume {run}" if epoch else
            "no checkpoint was written yet")
    assert line == f"error: OSError: [Errno 28] No space left on device in epoch {epoch}; {kept}"
    assert not [p.name for p in run.rglob(".*")]  # no temporary file left
    for path in run.glob("*.png"):  # the ones there are whole: the previous version, or this epoch's complete
        Image.open(path).load()
    for path in run.glob("*.json"):
        json.loads(path.read_text())
    if not epoch:
        assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
        return
    rows = [json.loads(row)["epoch"] for row in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == ([0, 1, 2] if name == "reward_curve.png" else [0, 1])  # the curve is drawn after the row is written
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch_0001"]
    monkeypatch.setattr(files, "fsync", REAL_FSYNC)  # room on the disk again
    ddpo.main(["--resume", str(run), "--epochs", "3"])  # the run goes on from its checkpoint
    assert [json.loads(row)["epoch"] for row in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_evaluate_judge_scores_the_same_pictures_beside_the_reward(tmp_path):
    """--judge incompressibility on a compressibility run: the judge of every cell is minus its reward, exactly (both
    the JPEG size of the same 8-bit picture), captioned beside it, and eval.json's judge means are minus the reward
    means (negation is exact in float32)."""
    run = train(tmp_path, "run", "--lr", "1e-2")  # a step large enough that base and fine-tuned differ
    summary = evaluate.main([str(run), "--seed", "3", "--judge", "incompressibility"])
    for name in ("train", "heldout"):
        tiles, strips = grid_tiles(run / "eval" / f"{name}.png", 32, side=32)
        r = torch.tensor([minus_jpeg_kb(tile) for tile in tiles], dtype=torch.float32)
        for i, (strip, v) in enumerate(zip(strips, r.tolist())):
            assert (strip == caption_strip(f"{('base', 'tuned')[i % 2]} {v:.3g} / {-v:.3g}")).all(), (name, i)
        assert summary[name]["judge"] == "incompressibility"
        for which in ("base", "tuned"):
            assert summary[name][f"{which}_judge_mean"] == -summary[name][f"{which}_reward_mean"]
    assert json.loads((run / "eval" / "eval.json").read_text()) == summary


def test_evaluate_on_a_full_disk_is_one_line_and_leaves_no_half_file(tmp_path, monkeypatch, main_error):
    """eval/ is written whole or not at all: a full disk at its second grid leaves the evaluation before it (its
    grids and eval.json from one evaluation, not this one's train.png beside an older heldout.png)."""
    run = train(tmp_path, "run")
    evaluate.main([str(run), "--seed", "5"])
    before = file_digests(run / "eval")
    writes = disk_full_at(monkeypatch, "heldout.png", 1)
    assert main_error(str(run), entry=evaluate.main) == "error: OSError: [Errno 28] No space left on device"
    assert len(writes) == 1 and sorted(p.name for p in run.iterdir() if p.name.startswith("eval")) == ["eval"]
    assert file_digests(run / "eval") == before  # no .tmp, the older one whole


@pytest.mark.parametrize("lora_rank", ["4", "0"])
def test_export_on_a_full_disk_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch, main_error, lora_rank):
    import safetensors.torch

    run = train(tmp_path, "run", "--lora-rank", lora_rank)

    def disk_full(tensors, path, *a, **k):
        Path(path).write_bytes(b"\0" * 10)  # what a full disk leaves: part of the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)  # diffusers' UNet and LoRA writer call it
    out = tmp_path / "out"
    assert main_error(str(run), str(out), entry=export.main) == \
        f"error: cannot write {out} (OSError: [Errno 28] No space left on device)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # neither out nor out.tmp


def test_non_finite_images_from_the_decoder_stop_the_run_before_they_are_scored(tmp_path, monkeypatch, main_error):
    """README: non-finite images stop the run with one line naming the last good checkpoint; never scored (a NaN
    image would be clamped to black, the smallest JPEG: the best compressibility)."""
    real_decode, decodes, scored = ddpo.decode, [], []
    monkeypatch.setattr(ddpo, "decode", lambda models, x0: decodes.append(1) or real_decode(models, x0) *
                        (float("nan") if len(decodes) == 4 else 1.0))  # decodes: eval 0, epoch 1, eval 1, epoch 2
    real_reward = rewards.jpeg_compressibility
    monkeypatch.setattr(ddpo, "load_reward", lambda args: lambda im, p: scored.append(1) or real_reward(im, p))
    run = tmp_path / "r"
    line = main_error(*TINY, "--epochs", "3", "--save-every", "1", "--out-dir", str(tmp_path), "--run-name", "r")
    assert line == (f"error: non-finite images from the decoder in epoch 2; the last good checkpoint is "
                    f"{run}/checkpoints/epoch_0001: resume with --resume {run}")
    assert len(scored) == 3 and [p.name for p in (run / "checkpoints").iterdir()] == ["epoch_0001"]


@pytest.mark.parametrize("entry, argv", [(evaluate.main, ["runs/r"]), (export.main, ["runs/r", "out"])])
def test_evaluate_and_export_under_torchrun_are_one_line(monkeypatch, main_error, entry, argv):
    monkeypatch.setenv("WORLD_SIZE", "2")
    name = entry.__module__
    assert main_error(*argv, entry=entry) == f"error: {name}.py runs in one process: python {name}.py, not torchrun"
