"""Tests for the paper's setup, offline on CPU: a tiny random Stable-Diffusion-style pipeline (VAE, CLIP text
encoder, latent UNet) saved as a real StableDiffusionPipeline folder, LoRA, bf16, checkpoints and resume,
Ctrl-C, non-finite losses, evaluate.py, export.py.

    python -m pytest -q tests/test_paper_setup.py     # this file
    python -m pytest -q -n 2 --dist loadgroup   # the whole suite, as the README and CI run it
"""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from plumbing import checkpoints
import ddpo
from conftest import SHORT_RUN, file_digests, rescoring_rounding_bound
import evaluate
import export
import rewards
from world import tiny_world

ROOT = Path(__file__).resolve().parents[1]  # the repository


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A Stable-Diffusion-1.x-shaped pipeline with random weights: 16x16 images, 4x8x8 latents."""
    torch.manual_seed(0)
    return tiny_world.save_sd_style_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


def train_argv(model, out, name, *extra):
    return ["--model", str(model), "--epochs", "1", "--num-steps", "2", "--samples-per-epoch", "4", "--samples-per-prompt", "4", "--sample-batch-size", "4",
            "--num-minibatches", "2", "--train-batch-size", "2", "--prompts", "simple_animals", "--out-dir", str(out),
            "--run-name", name, *extra]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


# --------------------------------------------------------------------------------------------------------
# Stable Diffusion through --model, LoRA, mixed precision
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
@pytest.mark.parametrize("lora_rank", ["4", "0"])
@pytest.mark.parametrize("algo", ["sf", "is", "rwr", "rwr-sparse"])
def test_sd_pipeline_trains_with_each_algorithm(sd_dir, tmp_path, monkeypatch, algo, lora_rank, precision):
    real, seen = ddpo.ddpo_is_loss, []
    monkeypatch.setattr(ddpo, "ddpo_is_loss", lambda *a: seen.append(real(*a)) or seen[-1])
    # DDPO_IS samples and trains one sample at a time: each re-scoring call of the first minibatch then has the batch
    # layout of the sampling call it repeats (its unconditional and conditional rows), the same inputs and θ = θ_old,
    # so it computes the same numbers on any machine: the ratio is exactly 1 (the step is DDPO_SF's), in bf16/fp16 too
    one_at_a_time = ["--sample-batch-size", "1", "--train-batch-size", "1"] if algo == "is" else []
    ddpo.main(train_argv(sd_dir, tmp_path, "run", "--algo", algo, "--lora-rank", lora_rank, "--mixed-precision", precision,
                         *one_at_a_time))
    run = tmp_path / "run"
    row = metrics(run)[-1]
    assert row["epoch"] == 1 and math.isfinite(row["losses/loss"]) and row["reward/mean"] < 0
    assert (run / "grid_001.png").is_file()
    if algo == "is":  # the first minibatch: 2 samples x 2 timesteps, one call each
        assert len(seen) == 8 and all(kl == 0 and cf == 0 for _, kl, cf in seen[:4]), seen
    base = ddpo.load_models(str(sd_dir), "cpu")
    tuned = ddpo.load_models(str(run), "cpu")  # the run folder: base model + its checkpoint
    base_params = dict(base.denoiser.named_parameters())
    changed = {n.replace(".base_layer", "") for n, p in tuned.denoiser.named_parameters() if "lora_" not in n
               and not torch.equal(p, base_params[n.replace(".base_layer", "")])}
    # fp16's loss scaler skips a step whose gradients overflowed (its first steps, at scale 2^16, often do); a
    # run whose only step was skipped must leave every weight as it was
    assert ("losses/skipped" in row) == (precision == "fp16" or algo == "rwr-sparse")
    updated = row.get("losses/skipped", 0.0) < 1.0
    if lora_rank == "4":  # only the adapter trains (lora_B starts at 0); the base weights stay the pretrained ones
        assert not changed
        assert any("lora_B" in n and p.abs().sum() > 0 for n, p in tuned.denoiser.named_parameters()) == updated
    else:
        assert bool(changed) == updated


def test_lora_adapter_off_gives_the_base_model_exactly(sd_dir):
    base = ddpo.load_models(str(sd_dir), "cpu")
    lora = ddpo.load_models(str(sd_dir), "cpu", lora_rank=4)
    trainable = [n for n, p in lora.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 20])
    cond = ddpo.encode_prompts(base, ["cat", "dog"])
    with torch.no_grad():
        for p in (p for n, p in lora.denoiser.named_parameters() if "lora_B" in n):
            p.normal_()  # a trained adapter: lora_B starts at zero, so make it non-zero
        expected = base.denoiser(x, t, **cond).sample
        assert not torch.equal(lora.denoiser(x, t, **cond).sample, expected)
        lora.denoiser.disable_adapters()
        assert torch.equal(lora.denoiser(x, t, **cond).sample, expected)


def test_dpok_kl_under_lora_is_to_the_base_model_loaded_on_its_own(sd_dir):
    """π_pre with LoRA is the same UNet with its adapter off: its mean equals a separately loaded base model's, the
    KL is 0 while lora_B is at its initial zero, positive once the adapter has moved, and the adapter is back on."""
    base = ddpo.load_models(str(sd_dir), "cpu")
    lora = ddpo.load_models(str(sd_dir), "cpu", lora_rank=4)
    args = ddpo.parse_args(["--model", str(sd_dir), "--num-steps", "3", "--kl-coef", "0.1"])
    base.scheduler.set_timesteps(3)
    traj = ddpo.rollout(lora, ["cat", "dog"], args, ddpo.noise_generators(1, range(2)))
    uncond, rows, steps = ddpo.encode_prompts(lora, [""]), torch.arange(2), torch.tensor([0, 2])
    state = (traj.states[rows, steps], traj.timesteps[steps], traj.cond, ddpo.repeat(uncond, 2), args.guidance_scale, args.eta)
    with torch.no_grad():
        assert ddpo.rescore(lora, traj, rows, steps, uncond, args)[1].tolist() == [0.0, 0.0]
        for p in (p for n, p in lora.denoiser.named_parameters() if "lora_B" in n):
            p.normal_(std=0.1)
        torch.testing.assert_close(ddpo.pretrained_mean(lora, *state), ddpo.policy(base, *state)[0])
        mean, sigma_t = ddpo.policy(lora, *state)  # the adapter is on again
        expected = ddpo.gaussian_kl(mean, ddpo.policy(base, *state)[0], sigma_t)
        kl = ddpo.rescore(lora, traj, rows, steps, uncond, args)[1]
    assert (kl > 0).all()
    torch.testing.assert_close(kl, expected)


def test_lora_weights_are_fp32_over_a_bf16_base(sd_dir):
    models = ddpo.load_models(str(sd_dir), "cpu", lora_rank=4, mixed_precision="bf16")
    dtypes = {n: p.dtype for n, p in models.denoiser.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert models.text_encoder.dtype == models.vae.dtype == torch.bfloat16


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_ratio_is_one_at_the_first_minibatch_under_mixed_precision(sd_dir, precision):
    models = ddpo.load_models(str(sd_dir), "cpu", lora_rank=4, mixed_precision=precision)
    args = ddpo.parse_args(["--model", str(sd_dir), "--num-steps", "3", "--mixed-precision", precision])
    traj = ddpo.rollout(models, ["cat", "dog", "cow", "pig"], args, ddpo.noise_generators(1, range(4)))
    assert traj.states.dtype == traj.log_probs.dtype == torch.float32 and traj.states.shape == (4, 4, 4, 8, 8)
    uncond = ddpo.repeat(ddpo.encode_prompts(models, [""]), 4)
    with torch.no_grad():
        for j in range(3):
            # the sampling batch's own layout: the same computation, so exactly the same log-prob on any machine
            log_prob = ddpo.rescore(models, traj, torch.arange(4), torch.full((4,), j), uncond, args)[0]
            assert torch.equal(log_prob, traj.log_probs[:, j])
            for rows in (torch.tensor([1, 3]), torch.tensor([2])):  # other layouts: only rounding may differ
                log_prob = ddpo.rescore(models, traj, rows, torch.full((len(rows),), j), uncond, args)[0]
                bound = rescoring_rounding_bound(models, traj, rows, j, uncond, args)  # conftest.py
                assert ((log_prob - traj.log_probs[rows, j]).abs() <= bound).all(), (log_prob, traj.log_probs[rows, j], bound)


def one_round(sd_dir, scaler, optimizer_cls=torch.optim.SGD, hook=None, max_grad_norm="1e-3", *extra):
    """One round of fp32 LoRA on the tiny SD pipeline from a fixed adapter (DDPO_IS unless extra says otherwise);
    returns (adapter before, after, logs)."""
    torch.manual_seed(3)  # the same adapter initialisation every call
    models = ddpo.load_models(str(sd_dir), "cpu", lora_rank=4)
    args = ddpo.parse_args(["--model", str(sd_dir), "--num-steps", "2", "--samples-per-epoch", "4", "--samples-per-prompt", "4", "--sample-batch-size", "4",
                            "--num-minibatches", "1", "--max-grad-norm", max_grad_norm, *extra])
    traj = ddpo.rollout(models, ["cat", "dog", "cow", "pig"], args, ddpo.noise_generators(1, range(4)))
    params = [p for p in models.denoiser.parameters() if p.requires_grad]
    if hook:
        params[0].register_hook(hook)
    before = [p.detach().clone() for p in params]
    logs = ddpo.train_round(models, optimizer_cls(params, lr=1.0), traj, torch.tensor([1.0, -1.0, 0.5, -0.5]),
                            torch.zeros(4), args, torch.Generator().manual_seed(2),
                            ddpo.repeat(ddpo.encode_prompts(models, [""]), 4), scaler)
    return before, [p.detach() for p in params], logs


@pytest.mark.parametrize("algo", ["is", "sf"])
def test_a_minibatch_in_chunks_of_train_batch_size_gives_the_same_update(sd_dir, algo):
    """--train-batch-size only trades memory for time: 4 samples in one chunk or in 4 chunks of 1, each weighted
    by its share, take the same optimizer step (SGD, no clipping)."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before, whole, _ = one_round(sd_dir, scaler, torch.optim.SGD, None, "1e9", "--algo", algo, "--train-batch-size", "4")
    _, chunked, _ = one_round(sd_dir, scaler, torch.optim.SGD, None, "1e9", "--algo", algo, "--train-batch-size", "1")
    step = lambda after: torch.cat([(a - b).flatten() for a, b in zip(after, before)])  # noqa: E731
    assert step(whole).norm() > 0
    assert (step(chunked) - step(whole)).norm() < 1e-3 * step(whole).norm()  # measured 7e-5: batched vs single-sample rounding


def test_fp16_loss_scaling_gives_the_unscaled_update(sd_dir):
    """The scaler multiplies the loss by 2^10 and must divide the gradients back before clipping: with SGD
    (unlike Adam, not invariant to the gradient's scale) and a clip norm the gradient exceeds, any slip shows."""
    _, plain, logs = one_round(sd_dir, torch.amp.GradScaler("cpu", enabled=False))
    before, scaled, scaled_logs = one_round(sd_dir, torch.amp.GradScaler("cpu", init_scale=2.0**10))
    assert logs["grad_norm"] > 1e-3  # clipping is active
    assert scaled_logs["grad_norm"] == pytest.approx(logs["grad_norm"], rel=1e-5) and scaled_logs["skipped"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, plain))
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # the update's size is the clip norm: lr 1 x gradient clipped to 1e-3
    step = torch.cat([(a - b).flatten() for a, b in zip(plain, before)]).norm().item()
    assert step == pytest.approx(1e-3, rel=1e-4)


def test_an_overflowed_fp16_step_is_skipped_and_anywhere_else_stops_the_run(sd_dir):
    overflow = lambda g: g * float("inf")  # noqa: E731  a gradient that overflowed
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before, after, logs = one_round(sd_dir, scaler, hook=overflow)
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and logs["skipped"] == 1.0
    assert scaler.get_scale() == 2.0**9  # halved, as torch.amp does after an overflow
    with pytest.raises(ddpo.NonFinite, match="non-finite gradient norm (inf|nan) at optimizer step 1"):
        one_round(sd_dir, torch.amp.GradScaler("cpu", enabled=False), hook=overflow)


@pytest.mark.parametrize("rank", [0, 1])
def test_under_fp16_a_process_holding_no_sample_of_a_minibatch_still_steps(sd_dir, monkeypatch, rank):
    """torchrun as one process sees it (a world of 2, the collectives stood in for): RWR in minibatches of one
    sample, so half of them hold none of this process's two samples, and for one of the two ranks the very first
    does. That process has no loss to scale, yet its fp16 loss scaler must unscale and step the summed gradients
    the all-reduce brings it, like every other process. The stand-in all-reduce returns scale·g for a known g, so
    with SGD (not invariant to the gradient's scale, unlike Adam) the round must move θ by exactly −lr·4·g."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    g = torch.Generator().manual_seed(5)
    models = ddpo.load_models(str(sd_dir), "cpu", lora_rank=4, mixed_precision="fp16")
    params = [p for p in models.denoiser.parameters() if p.requires_grad]
    g_sum = [1e-4 * torch.randn(p.shape, generator=g) for p in params]  # the processes' summed (unscaled) gradient
    g_norm = torch.cat([x.flatten() for x in g_sum]).norm().item()
    assert g_norm < 0.1  # below --max-grad-norm 1: no clipping

    def sum_gradients(params):  # the all-reduce: every process gets the sum of the scaled gradients
        for p, x in zip(params, g_sum):
            p.grad = scaler.get_scale() * x
    monkeypatch.setattr(ddpo, "distributed", lambda: (rank, 2))
    monkeypatch.setattr(ddpo, "sum_gradients", sum_gradients)
    monkeypatch.setattr(ddpo, "gather_objects", lambda x: [x])
    args = ddpo.parse_args(["--model", str(sd_dir), "--algo", "rwr", "--mixed-precision", "fp16", "--num-steps", "2",
                            "--samples-per-epoch", "4", "--samples-per-prompt", "4", "--sample-batch-size", "2", "--num-minibatches", "4",
                            "--train-batch-size", "1"])
    mine = range(2 * rank, 2 * rank + 2)  # this process's share of the round's 4 samples
    traj = ddpo.rollout(models, ["cat", "dog", "cow", "pig"][2 * rank:2 * rank + 2], args, ddpo.noise_generators(1, mine))
    before = [p.detach().clone() for p in params]
    logs = ddpo.train_round(models, torch.optim.SGD(params, lr=1.0), traj, torch.zeros(4),
                            torch.tensor([1.0, 0.0, 0.5, 2.0]), args, torch.Generator().manual_seed(2),
                            ddpo.repeat(ddpo.encode_prompts(models, [""]), 2), scaler)
    assert logs["skipped"] == 0, "a step was skipped"
    assert logs["grad_norm"] == pytest.approx(g_norm, rel=1e-5)
    for p, b, x in zip(params, before, g_sum):
        torch.testing.assert_close(p.detach(), b - 4 * x, rtol=0, atol=1e-6)  # 4 steps of 1e-4: rounding 1e-7


# --------------------------------------------------------------------------------------------------------
# Checkpoints, resume, failures that lose nothing
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setup", ["tiny", "sd-fp16", "sd-lora", "tiny-dpok"])
def test_resume_gives_the_same_metrics_as_training_straight(tmp_path, sd_dir, setup):
    """Also under fp16, where the loss scale (lowered after the first step overflows) is part of the state, and
    with per-prompt advantages that use the reward buffers of epoch 1 in epoch 2 (two prompts, min count 2)."""
    (tmp_path / "two.txt").write_text("a cat\na dog\n")
    common = ["--epochs", "2", "--num-steps", "2", "--samples-per-epoch", "4", "--samples-per-prompt", "4", "--sample-batch-size", "4",
              "--num-minibatches", "2", "--out-dir", str(tmp_path), "--seed", "5", "--save-every", "1"]
    if setup == "tiny":
        common += ["--prompts", str(tmp_path / "two.txt"), "--min-count", "2", "--buffer-size", "8"]
    if setup == "sd-fp16":
        common += ["--model", str(sd_dir), "--mixed-precision", "fp16", "--lora-rank", "0", "--lr", "1e-3"]
    if setup == "sd-lora":
        common += ["--model", str(sd_dir), "--lora-rank", "4", "--lr", "1e-2"]
    epochs = 2
    if setup == "tiny-dpok":  # V_φ, its optimizer and the KL's frozen copy of the pretrained UNet carry over; the
        epochs = 3  # optimizer's state shows only in epoch 3's baseline (epoch 2 logs V_φ before fitting it again)
        common += ["--advantage", "value", "--kl-coef", "1", "--lr", "1e-3", "--value-lr", "1e-2", "--epochs", "3"]
    ddpo.main([*common, "--run-name", "straight"])
    ddpo.main([*common, "--run-name", "halves", "--epochs", "1"])
    assert [p.name for p in (tmp_path / "halves" / "checkpoints").iterdir()] == ["epoch_0001"]
    ddpo.main(["--resume", str(tmp_path / "halves"), "--epochs", str(epochs)])
    straight, halves = metrics(tmp_path / "straight"), metrics(tmp_path / "halves")
    assert [r["epoch"] for r in halves] == list(range(epochs + 1))
    assert without_times(straight) == without_times(halves)
    assert [p.name for p in (tmp_path / "halves" / "checkpoints").iterdir()] == [f"epoch_{epochs:04d}"]  # older ones go
    if setup == "sd-fp16":
        assert straight[1]["losses/skipped"] > 0  # the scale did change in epoch 1
    if setup == "tiny":  # epoch 2 normalised samples by their prompt's buffer, which holds epoch 1's rewards
        assert straight[2]["adv/per_prompt_fraction"] > 0
    if setup == "tiny-dpok":
        assert straight[2]["losses/kl"] > 0 and "value/loss" in straight[2]


def test_a_run_stopped_at_once_before_its_first_checkpoint_says_there_is_nothing_to_resume(tmp_path, monkeypatch):
    """A second Ctrl-C while the first checkpoint is being written: one line that says so, no half-written one."""
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(SystemExit, match=r"^stopped before the first checkpoint was written; nothing to resume$"):
        ddpo.main([*SHORT_RUN, "--sample-batch-size", "4", "--out-dir", str(tmp_path), "--run-name", "r"])
    assert checkpoints.checkpoints(tmp_path / "r") == [] and not (tmp_path / "r" / "checkpoints" / "epoch_0001.tmp").exists()


def test_a_checkpoint_killed_mid_write_is_never_taken_for_a_whole_one(tmp_path, monkeypatch):
    argv = ["--epochs", "1", "--num-steps", "2", "--samples-per-epoch", "4", "--samples-per-prompt", "4", "--sample-batch-size", "4",
            "--num-minibatches", "1", "--out-dir", str(tmp_path), "--run-name", "r"]
    ddpo.main(argv)
    run = tmp_path / "r"
    real_save = torch.save

    def killed_half_way(obj, path, *a, **k):  # the process dies after writing half of state.pt
        real_save(obj, path, *a, **k)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_half_way)
    with pytest.raises(SystemExit, match=r"stopped; the last checkpoint \(epoch_0001\) is kept"):
        ddpo.main(["--resume", str(run), "--epochs", "2"])
    assert not (run / "checkpoints" / "epoch_0002.tmp").exists()  # the unfinished one is removed …
    assert checkpoints.latest_checkpoint(run).name == "epoch_0001"  # … and the last whole one is the one used
    monkeypatch.setattr(torch, "save", real_save)
    ddpo.main(["--resume", str(run), "--epochs", "2"])
    assert [r["epoch"] for r in metrics(run)] == [0, 1, 2]


# The tiny UNet's size (1.4M weights, about 50 ms a checkpoint) without its import: the writer process needs only
# torch and ddpo, not diffusers (10 s a process). save_checkpoint reads nothing but models.denoiser's parameters.
STAND_IN_UNET = "torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(340)))"
CHECKPOINT_WRITER = f"""
import random, sys, types, torch, ddpo
from plumbing import checkpoints
run = sys.argv[1]
models = types.SimpleNamespace(denoiser={STAND_IN_UNET})
params = list(models.denoiser.parameters())
optimizer, tracker, rng, generator = torch.optim.AdamW(params), ddpo.PerPromptStatTracker(16, 4), random.Random(0), torch.Generator()
start = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(run), models, optimizer, tracker, rng, generator) if checkpoints.checkpoints(run) else 0
for epoch in range(start + 1, 10**6):
    with torch.no_grad():
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()  # optimizer state to save too
        for p in params:
            p.fill_(epoch)  # the weights say which epoch wrote them
    checkpoints.save_checkpoint(run, epoch, models, optimizer, tracker, rng, generator)
    print(epoch, flush=True)
"""


def test_a_checkpointing_process_killed_with_sigkill_always_leaves_a_whole_checkpoint(tmp_path):
    """A real kill -9 of a process that does nothing but write checkpoints (of a stand-in with the tiny UNet's
    size): the moment a new epoch_N.tmp appears, and 20 and 40 ms into that write. Each time the newest whole
    checkpoint loads and holds its own epoch's weights."""
    import types

    run, killed_mid_write = tmp_path / "r", 0
    for delay in (0.0, 0.02, 0.04):
        writer = subprocess.Popen([sys.executable, "-c", CHECKPOINT_WRITER, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        first = int(writer.stdout.readline())  # this process has written a checkpoint …
        deadline = time.time() + 60
        while not any((run / "checkpoints").glob("*.tmp")) and time.time() < deadline:
            time.sleep(0.001)  # … and has started the next one
        time.sleep(delay)
        writer.kill()
        writer.wait()
        killed_mid_write += any((run / "checkpoints").glob("*.tmp"))
        models = types.SimpleNamespace(denoiser=eval(STAND_IN_UNET))
        params = list(models.denoiser.parameters())
        latest = checkpoints.latest_checkpoint(run)
        epoch = checkpoints.load_checkpoint(latest, models, torch.optim.AdamW(params), ddpo.PerPromptStatTracker(16, 4),
                                     random.Random(0), torch.Generator())
        assert epoch == int(latest.name.removeprefix("epoch_")) >= first
        assert all(torch.all(p == epoch) for p in params)
    assert killed_mid_write >= 1  # the kills did land inside a write (writing one takes about 50 ms)


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    real_save, calls = safetensors.torch.save_file, []

    def disk_full_at_the_second(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"\0" * 10)  # what a full disk leaves: part of the file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_at_the_second)
    argv = ["--epochs", "3", "--num-steps", "2", "--samples-per-epoch", "2", "--samples-per-prompt", "2", "--sample-batch-size", "2",
            "--num-minibatches", "1", "--save-every", "1", "--out-dir", str(tmp_path), "--run-name", "r"]
    with pytest.raises(SystemExit, match=r"error: cannot write checkpoint .*epoch_0002 \(OSError: \[Errno 28\] No space "
                                         r"left on device\) in epoch 2; the last good checkpoint is .*epoch_0001: resume"):
        ddpo.main(argv)
    run = tmp_path / "r"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch_0001"]  # no .tmp left behind
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    ddpo.main(["--resume", str(run), "--epochs", "3"])
    assert [r["epoch"] for r in metrics(run)] == [0, 1, 2, 3]


def test_a_reward_that_raises_names_the_sample_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    calls = []

    def fails_in_epoch_two(images, prompts):  # called for: eval 0, epoch 1, eval 1, epoch 2
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("the reward server went away")
        return -torch.arange(len(prompts), dtype=torch.float32)

    monkeypatch.setattr(ddpo, "load_reward", lambda args: fails_in_epoch_two)
    argv = ["--epochs", "3", "--num-steps", "2", "--samples-per-epoch", "2", "--samples-per-prompt", "2", "--sample-batch-size", "2",
            "--num-minibatches", "1", "--save-every", "1", "--out-dir", str(tmp_path), "--run-name", "r"]
    # it fails once, not on one sample: retried one sample at a time it scores them all, so the batch is named
    with pytest.raises(SystemExit, match=r"reward 'jpeg' raised RuntimeError: the reward server went away on a batch "
                                         r"of 2 in epoch 2; the last good checkpoint is .*epoch_0001"):
        ddpo.main(argv)
    assert "Traceback" in capsys.readouterr().err  # the reward's own traceback is kept, above the line
    assert checkpoints.latest_checkpoint(tmp_path / "r").name == "epoch_0001"


@pytest.mark.parametrize("seed_b, same", [("7", True), ("8", False)])
def test_lora_runs_follow_the_seed(sd_dir, tmp_path, seed_b, same):
    """The adapter's initial lora_A is drawn from --seed: the same seed gives the same adapter, another seed
    another one. (lr 0 keeps the checkpoint at the initial adapter.)"""
    from safetensors.torch import load_file

    for name, seed in (("a", "7"), ("b", seed_b)):
        torch.manual_seed(int(name == "b"))  # whatever the global RNG held before must not matter
        ddpo.main(train_argv(sd_dir, tmp_path, name, "--lora-rank", "4", "--seed", seed, "--lr", "0",
                             "--num-minibatches", "1"))
    a, b = (load_file(checkpoints.latest_checkpoint(tmp_path / n) / "trainable.safetensors") for n in "ab")
    lora_a = [k for k in a if "lora_A" in k]
    assert lora_a and all(torch.equal(a[k], b[k]) == same for k in lora_a)
    if same:
        assert without_times(metrics(tmp_path / "a")) == without_times(metrics(tmp_path / "b"))


def test_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    real_loss, calls = ddpo.ddpo_is_loss, []

    def nan_in_epoch_two(log_prob, *a):
        loss, kl, cf = real_loss(log_prob, *a)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 4 else loss), kl, cf  # epoch 1 has 2 steps x 2 timesteps

    monkeypatch.setattr(ddpo, "ddpo_is_loss", nan_in_epoch_two)
    argv = ["--epochs", "3", "--num-steps", "2", "--samples-per-epoch", "2", "--samples-per-prompt", "2", "--sample-batch-size", "2",
            "--num-minibatches", "2", "--save-every", "1", "--out-dir", str(tmp_path), "--run-name", "r"]
    with pytest.raises(SystemExit, match=r"non-finite loss nan at optimizer step 1, timestep t=\d+ in epoch 2; "
                                          r"the last good checkpoint is .*epoch_0001: resume with --resume"):
        ddpo.main(argv)
    assert checkpoints.latest_checkpoint(tmp_path / "r").name == "epoch_0001"


def test_ctrl_c_finishes_the_epoch_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    """A real SIGINT, sent to this process (the run is in-process, so no second import of torch and diffusers)
    once the run has written its first metrics, as a terminal's Ctrl-C would arrive in the middle of an epoch."""
    import os
    import threading

    run, stray, ended = tmp_path / "r", [], threading.Event()
    guard = lambda signum, frame: stray.append(signum)  # noqa: E731  (a SIGINT outside the run must not stop pytest)
    previous = signal.signal(signal.SIGINT, guard)

    def press_ctrl_c():
        while not ended.is_set() and not (run / "metrics.jsonl").is_file():
            time.sleep(0.05)
        if not ended.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    try:
        with pytest.raises(SystemExit) as stop:
            ddpo.main(["--epochs", "50", "--num-steps", "2", "--samples-per-epoch", "4", "--samples-per-prompt", "4", "--sample-batch-size", "4",
                       "--num-minibatches", "1", "--out-dir", str(tmp_path), "--run-name", "r", "--save-every", "100"])
    finally:
        ended.set()
        presser.join(timeout=10)
        after = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, previous)
    assert after is guard and not stray  # the run took the Ctrl-C, and gave the handler it found back
    epoch = len(metrics(run)) - 1
    assert 1 <= epoch < 50 and stop.value.code == (f"interrupted after epoch {epoch}, checkpoint written: resume with "
                                                   f"--resume {run}")
    assert checkpoints.latest_checkpoint(run).name == f"epoch_{epoch:04d}"


TINY_ARGV = ["--num-steps", "2", "--samples-per-epoch", "4", "--samples-per-prompt", "4", "--sample-batch-size", "4",
             "--num-minibatches", "1"]


def start_run(tmp_path, *argv):
    """ddpo.py in its own process, as a user or a batch scheduler starts it; stdout and stderr go to files, stdout
    block-buffered as in a scheduler's log (PYTHONUNBUFFERED, if this shell sets it, is not passed on)."""
    out, log = open(tmp_path / "stdout.txt", "w"), open(tmp_path / "stderr.txt", "w")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "ddpo.py"), *TINY_ARGV, "--out-dir", str(tmp_path), *argv],
                            stdout=out, stderr=log, cwd=ROOT, env=env)
    return proc, lambda: (proc.wait(timeout=120), out.close(), log.close(), (tmp_path / "stderr.txt").read_text())[3]


def wait_for(condition, proc, timeout=120, poll=0.05):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before the signal"
        time.sleep(poll)


def test_a_new_run_in_a_folder_that_holds_a_run_is_refused_and_the_run_is_kept(tmp_path):
    """The same --run-name again, from a real process as a user types it: one line, before anything is loaded or
    written; the first run's files stay byte for byte, and --resume is the way to continue it."""
    run = tmp_path / "keep"
    ddpo.main([*TINY_ARGV, "--epochs", "1", "--out-dir", str(tmp_path), "--run-name", "keep"])
    files = file_digests(run)
    proc, finish = start_run(tmp_path, "--epochs", "1", "--seed", "5", "--run-name", "keep")
    stderr = finish()
    assert proc.returncode != 0
    assert stderr.strip() == f"error: {run} exists: continue it with --resume {run}, or choose another --run-name"
    assert file_digests(run) == files
    ddpo.main(["--resume", str(run), "--epochs", "2"])
    assert len(metrics(run)) == 3 and checkpoints.latest_checkpoint(run).name == "epoch_0002"


def test_resume_drops_the_metrics_of_epochs_after_its_checkpoint_and_trains_them_again(tmp_path):
    """A run killed after it logged epoch 3 but before epoch 3's checkpoint: resuming from epoch 2's checkpoint
    trains epoch 3 again, and metrics.jsonl holds each epoch once, the epoch from the resumed run."""
    ddpo.main([*TINY_ARGV, "--epochs", "2", "--out-dir", str(tmp_path), "--run-name", "m"])
    path = tmp_path / "m" / "metrics.jsonl"
    path.write_text(path.read_text() + json.dumps({"epoch": 3, "eval/reward_mean": 99.0}) + "\n")
    ddpo.main(["--resume", str(tmp_path / "m"), "--epochs", "3"])
    rows = metrics(tmp_path / "m")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and rows[-1]["eval/reward_mean"] != 99.0


def test_resume_of_a_run_whose_metrics_are_damaged_is_one_line_naming_the_file_and_the_line(tmp_path, main_error):
    ddpo.main([*TINY_ARGV, "--epochs", "1", "--out-dir", str(tmp_path), "--run-name", "m"])
    path = tmp_path / "m" / "metrics.jsonl"
    path.write_text(path.read_text()[:-20])  # cut short inside its second line, as a full disk or a bad copy leaves it
    assert main_error("--resume", str(tmp_path / "m"), "--epochs", "2").startswith(
        f"error: {path} is damaged at line 2 (")
    path.write_text('{"epoch": 0}\n[1, 2]\n')
    assert main_error("--resume", str(tmp_path / "m"), "--epochs", "2") == \
        f"error: {path} is damaged at line 2 (not an epoch's metrics): restore it, or start a new run"


def test_sigterm_finishes_the_epoch_writes_a_checkpoint_and_a_second_one_stops_at_once(tmp_path):
    """A real SIGTERM, as a batch scheduler sends before it kills, to a real process in the middle of a run:
    handled like Ctrl-C. Then two SIGTERMs in a row to another run: it stops at once and keeps its last checkpoint."""
    run = tmp_path / "term"
    proc, finish = start_run(tmp_path, "--epochs", "50", "--save-every", "100", "--run-name", "term")
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 2, proc)  # epoch 1 is done
    proc.send_signal(signal.SIGTERM)
    stderr = finish()
    epoch = len(metrics(run)) - 1
    assert proc.returncode != 0 and 1 <= epoch < 50
    assert stderr.strip().splitlines()[-1] == f"interrupted after epoch {epoch}, checkpoint written: resume with --resume {run}"
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"epoch_{epoch:04d}"]

    # The second signal must come while the epoch runs: as soon as the first one's handler has said so (its line,
    # flushed to stdout), not after a fixed delay, in which a fast machine finished the epoch and exited (-15: the
    # second signal met the default handler). 10 steps make an epoch some 50 times the 10 ms poll (0.5 s here).
    run = tmp_path / "twice"
    proc, finish = start_run(tmp_path, "--epochs", "50", "--save-every", "1", "--run-name", "twice", "--num-steps", "10")
    wait_for(lambda: bool(checkpoints.checkpoints(run)), proc)  # epoch 1's checkpoint is whole
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM: finishing this epoch" in (tmp_path / "stdout.txt").read_text(), proc, poll=0.01)
    proc.send_signal(signal.SIGTERM)
    stderr = finish()
    last = stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("stopped; the last checkpoint (epoch_") and "is kept" in last, stderr
    kept = checkpoints.latest_checkpoint(run).name
    # at once: epoch 2, in which both signals came, neither finished (no line) nor saved
    assert f"({kept})" in last and kept == "epoch_0001" and "epoch 2/50" not in (tmp_path / "stdout.txt").read_text()


def test_a_run_with_a_truncated_weights_file_is_one_line_for_model_and_eval(tmp_path):
    ddpo.main(["--epochs", "1", "--num-steps", "2", "--samples-per-epoch", "2", "--samples-per-prompt", "2", "--sample-batch-size", "2",
               "--num-minibatches", "1", "--out-dir", str(tmp_path), "--run-name", "r"])
    weights = tmp_path / "r" / "checkpoints" / "epoch_0001" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for entry, argv in ((ddpo.main, ["--model", str(tmp_path / "r"), "--out-dir", str(tmp_path)]),
                        (evaluate.main, [str(tmp_path / "r")])):
        with pytest.raises(SystemExit, match=r"error: checkpoint .*epoch_0001 is damaged \(SafetensorError: "):
            entry(argv)


@pytest.mark.parametrize("damage, message", [
    (lambda run: None, "has no checkpoint"),
    (lambda run: (run / "checkpoints" / "epoch_0001" / "trainable.safetensors").write_bytes(b"\0" * 64), "is damaged"),
    (lambda run: (run / "checkpoints" / "epoch_0001" / "state.pt").write_bytes(b"PK\3\4 not a pickle"), "is damaged"),
])
def test_resume_from_a_folder_without_a_whole_checkpoint_is_one_clear_line(tmp_path, main_error, damage, message):
    ddpo.main(["--epochs", "1", "--num-steps", "2", "--samples-per-epoch", "2", "--samples-per-prompt", "2", "--sample-batch-size", "2",
               "--num-minibatches", "1", "--out-dir", str(tmp_path), "--run-name", "r"])
    run = tmp_path / "r"
    if message == "has no checkpoint":
        import shutil
        shutil.rmtree(run / "checkpoints")
    damage(run)
    assert message in main_error("--resume", str(run), "--epochs", "2")


@pytest.mark.parametrize("argv, message", [
    (["--resume", "/no/such/run"], "/no/such/run is not a run folder"),
    (["--lora-rank", "-1"], "--lora-rank -1 is out of range"),
    (["--mixed-precision", "fp8"], "argument --mixed-precision: invalid choice: 'fp8'"),
    (["--samples-per-epoch", "8", "--samples-per-prompt", "8", "--sample-batch-size", "8", "--num-minibatches", "3"],
     "is not a multiple of --num-minibatches 3"),
])
def test_bad_setup_flags_are_one_clear_line(main_error, tmp_path, argv, message):
    # were a check skipped (a wrong version of it), what followed would be SHORT_RUN's epoch, written to tmp_path
    assert message in main_error(*SHORT_RUN, "--out-dir", str(tmp_path), *argv)


# --------------------------------------------------------------------------------------------------------
# evaluate.py
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora_rank, precision", [("4", "no"), ("0", "no"), ("4", "bf16")])
def test_eval_writes_side_by_side_grids_and_both_mean_rewards(sd_dir, tmp_path, lora_rank, precision):
    ddpo.main(train_argv(sd_dir, tmp_path, "run", "--algo", "is", "--lr", "1e-2", "--lora-rank", lora_rank,
                         "--mixed-precision", precision))
    summary = evaluate.main([str(tmp_path / "run"), "--eval-prompts", "unseen_animals"])
    saved = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert set(saved) == {"train", "heldout"} and saved["heldout"]["prompts"] == "unseen_animals"
    for which in ("train", "heldout"):
        assert (tmp_path / "run" / "eval" / f"{which}.png").is_file()
        assert saved[which]["base_reward_mean"] < 0 and saved[which]["tuned_reward_mean"] < 0  # jpeg: −kB
    assert summary == saved
    assert saved["train"]["base_reward_mean"] != saved["train"]["tuned_reward_mean"]
    # "base" is the base model itself (with LoRA: the adapter switched off), in the run's precision: sampled here
    run = ddpo.load_run_args(tmp_path / "run")
    prompts = random.Random(0).choices(rewards.load_prompts(run.prompts), k=16)
    base = ddpo.load_models(str(sd_dir), "cpu", mixed_precision=precision)
    _, images = ddpo.sample(base, prompts, run, ddpo.noise_generators(0, range(16), stream=2), 4)
    r, _ = rewards.compute_rewards(ddpo.load_reward(run), run.reward, images, prompts)
    assert saved["train"]["base_reward_mean"] == r.mean().item()


# --------------------------------------------------------------------------------------------------------
# The fine-tuned model leaves the project: diffusers' own formats, loaded by diffusers' own pipelines
# --------------------------------------------------------------------------------------------------------

def unet_outputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    config = unet.config
    x = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=g)
    cond = torch.randn(2, 16, config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([700, 30]), encoder_hidden_states=cond).sample


@pytest.mark.parametrize("lora_rank", ["4", "0"])
@pytest.mark.parametrize("model", ["tiny", "sd"])
def test_export_loads_in_diffusers_pipelines_with_the_runs_unet(sd_dir, tmp_path, model, lora_rank):
    """LoRA: StableDiffusionPipeline.from_pretrained(base) + load_lora_weights(OUT); full fine-tuning:
    DiffusionPipeline.from_pretrained(OUT). Either way the UNet computes what this project's does (--model RUN), on
    the built-in tiny model as on a random SD-style pipeline."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    base_dir = ddpo.TINY_MODELS["tiny"] if model == "tiny" else sd_dir
    ddpo.main(train_argv(model if model == "tiny" else sd_dir, tmp_path, "run", "--lora-rank", lora_rank, "--lr", "1e-2"))
    export.main([str(tmp_path / "run"), str(tmp_path / "out")])
    ours = unet_outputs(ddpo.load_models(str(tmp_path / "run"), "cpu").denoiser)
    base = unet_outputs(ddpo.load_models(str(base_dir), "cpu").denoiser)
    assert (ours - base).abs().max() > 1e-4  # the run did change the UNet
    if lora_rank == "4":
        from safetensors import safe_open

        with safe_open(tmp_path / "out" / "pytorch_lora_weights.safetensors", "pt") as f:  # as diffusers' scripts write it
            keys, metadata = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
        assert keys and all(k.startswith("unet.") and k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys)
        assert metadata["unet.r"] == metadata["unet.lora_alpha"] == 4
        pipe = StableDiffusionPipeline.from_pretrained(base_dir)
        pipe.load_lora_weights(tmp_path / "out")
    else:
        pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
        assert type(pipe).__name__ == "StableDiffusionPipeline"
        ddpo.load_models(str(tmp_path / "out"), "cpu")  # and --model OUT loads it too
    torch.testing.assert_close(unet_outputs(pipe.unet), ours, rtol=1e-5, atol=1e-5)


def test_export_refuses_an_existing_out_and_other_flags(tmp_path, main_error):
    ddpo.main(train_argv("tiny", tmp_path, "run"))
    export.main([str(tmp_path / "run"), str(tmp_path / "out")])
    assert main_error(str(tmp_path / "run"), str(tmp_path / "out"), entry=export.main) == \
        f"error: {tmp_path / 'out'} exists; export.py writes a new folder"
    assert main_error(str(tmp_path / "run"), str(tmp_path / "o2"), "--device", "cpu", entry=export.main) == (
        "error: unrecognized arguments: --device cpu (see --help)")
    assert not (tmp_path / "o2").exists()
