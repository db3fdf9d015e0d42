"""Tests: every formula against an independent reference, with numbers; then the CLI end to end.

    python -m pytest -q test_ddpo.py            # this file
    python -m pytest -q -n 2 --dist loadgroup   # the whole suite, as the README and CI run it
"""
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from plumbing import command_line
import ddpo
from conftest import SHORT_RUN, file_digests, rescoring_rounding_bound
import evaluate
import export
from plumbing import files
from plumbing import model_checks
import rewards
from world import JUDGE_OPTIONS, drawing, tiny_world

HERE = Path(__file__).resolve().parent


sd_scheduler = tiny_world.sd_v1_scheduler  # Stable Diffusion v1's DDIM configuration


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    """A randomly initialised tiny model (the built-in one's shapes: VAE, latent UNet, text encoder) saved as a
    StableDiffusionPipeline folder, to load back as a user's folder is loaded."""
    torch.manual_seed(0)
    models = tiny_world.build_models(tiny_world.build_tokenizer(tiny_world.all_prompts()))
    return tiny_world.save_pipeline(models, tmp_path_factory.mktemp("random_tiny") / "model")


@pytest.fixture(scope="session")
def random_models(random_model_dir):
    return ddpo.load_models(str(random_model_dir), "cpu")


def small_args(*extra):
    return ddpo.parse_args(["--num-steps", "4", *extra])


# --------------------------------------------------------------------------------------------------------
# §3.1: the DDIM step and its log-probability
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type, spacing", [("epsilon", "leading"), ("v_prediction", "leading"),
                                                     ("sample", "leading"), ("epsilon", "trailing")])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_step_equals_diffusers(prediction_type, spacing, eta):
    scheduler = sd_scheduler(prediction_type=prediction_type, timestep_spacing=spacing)
    scheduler.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    steps = list(scheduler.timesteps[[0, 7, 13, -1]])  # includes the last step, where ᾱ_prev = ᾱ_0 < 1
    assert steps[-1].item() == {"leading": 1, "trailing": 49}[spacing]
    for t in steps:
        x_t, model_output, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        expected = scheduler.step(model_output, t, x_t, eta=eta, variance_noise=z).prev_sample
        mean, sigma_t = ddpo.ddim_step(scheduler, model_output, x_t, t.expand(2), eta)
        # bound: diffusers computes every term in our order except σ_t (√(a·b) against √a·√b: ≤ 3u relative), which
        # enters as |z|·3uσ_t and through √(1 − ᾱ_prev − σ_t²) as |ε̂|·3uσ_t²/c; with |z|, |ε̂| ≤ 4 (102 for "sample" at
        # t = 1, where σ_t²/c = 0.02), σ_t ≤ 0.66, σ_t²/c ≤ 0.6, |x_prev| ≤ 7 (+2u·7): ≤ 1.6e-6; we allow 3e-6
        torch.testing.assert_close(mean + sigma_t * z, expected, rtol=0, atol=3e-6)
        assert (sigma_t > 0).all()


def test_ddim_step_takes_a_different_timestep_per_sample():
    scheduler = sd_scheduler()
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    t = scheduler.timesteps[[0, 4, 9]]
    x_t, eps = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    mean, sigma_t = ddpo.ddim_step(scheduler, eps, x_t, t, 1.0)
    for i in range(3):
        m_i, s_i = ddpo.ddim_step(scheduler, eps[i:i + 1], x_t[i:i + 1], t[i:i + 1], 1.0)
        assert torch.equal(mean[i], m_i[0])  # elementwise IEEE ops only (no reduction): the batch layout cannot matter
        assert sigma_t[i].item() == s_i.item()


def test_sigma_matches_closed_form():
    """σ_t from DDIM eq. (16) with numbers: at t=1 (last step of 20), ᾱ_prev is ᾱ_0 (set_alpha_to_one=False)."""
    scheduler = sd_scheduler()
    scheduler.set_timesteps(20)
    a = scheduler.alphas_cumprod.double()
    _, sigma = ddpo.ddim_step(scheduler, torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([501]), 1.0)
    expected = math.sqrt((1 - a[451]) / (1 - a[501]) * (1 - a[501] / a[451]))
    # bound: ~8 float32 roundings, and 1 − ᾱ_t/ᾱ_prev = 0.204 turns the ratio's u into u/0.204, halved by the √:
    # ≈ (8 + 2.5) u ≈ 6e-7; we allow 1e-6
    assert sigma.item() == pytest.approx(expected, rel=1e-6)
    _, sigma_last = ddpo.ddim_step(scheduler, torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([1]), 1.0)
    expected_last = math.sqrt((1 - a[0]) / (1 - a[1]) * (1 - a[1] / a[0]))
    # bound: here 1 − ᾱ_1/ᾱ_0 = 8.5e-4, so the ratio's rounding u becomes u/8.5e-4 = 7e-5, halved by the √: 3.5e-5,
    # + ~8 u; we allow 4e-5 (a wrong ᾱ_prev or a missing √ is off by far more)
    assert sigma_last.item() == pytest.approx(expected_last, rel=4e-5) and expected_last > 0.01


@pytest.mark.parametrize("overrides, refused", [
    ({}, None),
    ({"timestep_spacing": "trailing"}, None),  # 999, 949, …, 49: each next timestep is t − 50
    ({"prediction_type": "sample"}, None),
    ({"set_alpha_to_one": True}, "set_alpha_to_one=True"),  # ᾱ_prev = 1 at the last step: σ_t = 0
    ({"thresholding": True}, "thresholding=True"),
    ({"timestep_spacing": "linspace"}, "timestep_spacing='linspace'"),  # 999, 946, …: not t − 50
])
def test_schedulers_without_a_ddim_density_are_refused(overrides, refused):
    scheduler = sd_scheduler(**overrides)
    problem = model_checks.check_scheduler(scheduler, 20)
    assert (problem is None) if refused is None else (refused in problem), problem
    if refused == "set_alpha_to_one=True":  # why: diffusers' own last step has no noise at all
        scheduler.set_timesteps(20)
        assert scheduler._get_variance(scheduler.timesteps[-1], scheduler.timesteps[-1] - 50) == 0
    if refused == "timestep_spacing='linspace'":  # why: DDIMScheduler.step steps from 999 to 949, not to 946
        scheduler.set_timesteps(20)
        assert scheduler.timesteps[:2].tolist() == [999, 946]


def test_log_prob_equals_torch_normal():
    g = torch.Generator().manual_seed(2)
    x, mean = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sigma = torch.tensor([0.05, 0.3, 1.7]).view(3, 1, 1, 1)
    expected = torch.distributions.Normal(mean, sigma).log_prob(x).mean(dim=(1, 2, 3))
    # bound: Normal computes each term in our order; only log σ may differ by 1 ulp (SIMD log on its broadcast σ,
    # scalar log on ours: ≤ 2.4e-7 at |log σ| = 3), which can flip the roundings of the same 100-term mean at its
    # ~7 levels: 7u·|log π| with |log π| ≤ 413: rtol 4.2e-7; we allow rtol 1e-6 and atol 1e-6
    torch.testing.assert_close(ddpo.gaussian_log_prob(x, mean, sigma), expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# Flow-GRPO's policy: the flow's SDE step, against diffusers' Euler step, closed forms and known marginals
# --------------------------------------------------------------------------------------------------------

def flow_scheduler(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)  # SD3's: 1000 training timesteps, shift 3
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sde_step_at_noise_level_zero_is_the_schedulers_euler_step(shift):
    g = torch.Generator().manual_seed(0)
    for j in (0, 1, 4, 9):  # the first step (t = 1), two inside, the last (to t = 0)
        scheduler = flow_scheduler(10, shift)  # a fresh step index: step() finds it from the timestep
        x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        t = scheduler.timesteps[j]
        expected = scheduler.step(v, t, x).prev_sample
        mean, std = ddpo.flow_sde_step(scheduler, v, x, t.expand(2), 0.0)
        assert torch.equal(mean, expected)  # at a = 0 the drift's correction is exactly 0: both compute x_t + Δt·v
        assert (std == 0).all()


def test_flow_sde_step_std_and_log_prob_in_closed_form():
    """std = a √(t / (1 − t)) √|Δt| at the scheduler's sigmas, written out here; at t = 1 with 1 − t at the next
    sigma. The log-prob of a step is torch.distributions.Normal's, averaged over dimensions."""
    scheduler, a = flow_scheduler(10, 3.0), 0.7
    s = scheduler.sigmas.double().tolist()
    assert s[0] == 1.0 and s[-1] == 0.0
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    j = torch.tensor([0, 5, 9])
    mean, std = ddpo.flow_sde_step(scheduler, v, x, scheduler.timesteps[j], a)
    by_hand = [a * math.sqrt(1 / (1 - s[1])) * math.sqrt(1 - s[1]), a * math.sqrt(s[5] / (1 - s[5]) * (s[5] - s[6])),
               a * math.sqrt(s[9] / (1 - s[9]) * s[9])]
    # bound: ~6 roundings (the subtractions 1 − s[1], s[5] − s[6] are exact: Sterbenz) + 0.5u for the float32 of
    # by_hand: ≈ 7u = 4e-7 relative (stds 0.7, 0.35, 0.006); we allow rtol 1e-6
    torch.testing.assert_close(std.flatten(), torch.tensor(by_hand, dtype=torch.float32), rtol=1e-6, atol=0)
    x_prev = mean + std * torch.randn(mean.shape, generator=g)
    expected = torch.distributions.Normal(mean, std).log_prob(x_prev).mean(dim=(1, 2, 3))
    # bound: as in test_log_prob_equals_torch_normal: 1 ulp of |log σ| ≤ 5 (4.8e-7) + 7u·|log π| (≤ 3.6): 6e-7
    torch.testing.assert_close(ddpo.gaussian_log_prob(x_prev, mean, std), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="not one of the scheduler's"):
        ddpo.flow_sde_step(scheduler, v, x, torch.tensor([999.5, 500.0, 1.0]), a)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sde_keeps_the_flows_marginals_on_gaussian_data(shift):
    """Data x_0 ~ N(m, s²): x_t = (1 − t) x_0 + t ε is N((1 − t) m, (1 − t)² s² + t²), and the exact velocity
    E[ε − x_0 | x_t] is linear in x_t. Sampled from x_1 ~ N(0, 1) with that velocity, the SDE's x_t must have the
    flow's mean and variance at every t, up to Euler–Maruyama's error (largest next to t = 1, where σ_t is
    largest); with its drift correction σ_t²/(2t)(x_t + (1 − t)v) dropped, the variance it ends with is far off."""
    m, s, a, n, steps = 0.5, 0.6, 0.7, 50_000, 100
    scheduler = flow_scheduler(steps, shift)
    sigmas = scheduler.sigmas.double()

    def velocity(x, t):
        var = (1 - t) ** 2 * s**2 + t**2
        return (t - (1 - t) * s**2) / var * (x - (1 - t) * m) - m

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, generator=g)
    plain = x.clone()  # the same SDE noise, no drift correction
    for j, t in enumerate(scheduler.timesteps):
        t_now, t_next = sigmas[j].item(), sigmas[j + 1].item()
        mean, std = ddpo.flow_sde_step(scheduler, velocity(x, t_now), x, t.expand(n), a)
        z = torch.randn(n, 1, generator=g)
        x = mean + std * z
        plain = plain + velocity(plain, t_now) * (t_next - t_now) + std * z
        flow_mean, flow_var = (1 - t_next) * m, (1 - t_next) ** 2 * s**2 + t_next**2
        assert abs(x.mean().item() - flow_mean) < 0.02, (t_next, x.mean().item(), flow_mean)
        assert abs(x.var().item() / flow_var - 1) < (0.15 if t_next > 0.8 else 0.07), (t_next, x.var().item(), flow_var)
    assert abs(x.var().item() / s**2 - 1) < 0.03  # t = 0: the data's own variance
    assert plain.var().item() / s**2 - 1 > 1.0


def test_log_prob_gradient_flows_only_through_the_mean():
    x = torch.randn(2, 3, requires_grad=True)
    mean = torch.zeros(2, 3, requires_grad=True)
    ddpo.gaussian_log_prob(x, mean, torch.ones(2, 1)).sum().backward()
    assert x.grad is None
    # d/dμ of mean_d -(x-μ)²/2 = (x-μ)/D; bound: autograd takes fl(1/3)·x (the ×2, /2 are exact), x/3 one rounding:
    # ≤ 1.5u relative; we allow 4u = 2.4e-7
    torch.testing.assert_close(mean.grad, x.detach() / 3, rtol=2.4e-7, atol=0)


# --------------------------------------------------------------------------------------------------------
# §4.3: the MDP rollout and exact re-scoring
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [[], ["--eta", "0.6"], ["--guidance-scale", "2.5"]], ids=["defaults", "eta", "guidance"])
def test_rollout_shapes_and_log_probs_match_diffusers(random_models, flags):
    """Each action is diffusers' DDIM step (at the run's η and w) from the state, with the noise the trajectory's own
    generator drew for that step (after x_T), and its log-prob is torch's Normal's."""
    args = small_args(*flags)
    prompts = ["tench", "cat", "a dog riding a bike"]
    traj = ddpo.rollout(random_models, prompts, args, ddpo.noise_generators(0, range(len(prompts))))
    assert traj.states.shape == (3, 5, 4, 8, 8) and traj.log_probs.shape == (3, 4)  # latents
    assert traj.timesteps.tolist() == [751, 501, 251, 1]
    generators = ddpo.noise_generators(0, range(len(prompts)))  # the same draws again: x_T, then one per step
    draws = torch.stack([torch.stack([torch.randn(4, 8, 8, generator=g) for _ in range(5)]) for g in generators], 1)
    assert torch.equal(traj.states[:, 0], draws[0])
    # each action equals diffusers' DDIM step from the same state with the noise that was drawn
    scheduler = random_models.scheduler
    uncond = ddpo.repeat(ddpo.encode_prompts(random_models, [""]), 3)
    with torch.no_grad():
        for j, t in enumerate(traj.timesteps):
            x_t, x_prev = traj.states[:, j], traj.states[:, j + 1]
            eps_u, eps_c = random_models.denoiser(torch.cat([x_t, x_t]), t, torch.cat([uncond["encoder_hidden_states"], traj.cond["encoder_hidden_states"]])).sample.chunk(2)
            eps = eps_u + args.guidance_scale * (eps_c - eps_u)
            mean, sigma_t = ddpo.ddim_step(scheduler, eps, x_t, t.expand(3), args.eta)
            z = (x_prev - mean) / sigma_t
            # the drawn noise back: |x_prev − μ| ≤ 2.4 carries 2u·2.8 of rounding, over σ_t ≥ 0.1: ≤ 4e-6
            torch.testing.assert_close(z, draws[j + 1], rtol=0, atol=5e-6 / sigma_t.min().item())
            # bound: z = (x_prev − μ)/σ_t and back: 3u·|x_prev − μ| (≤ 2.4) + 2u·|x_prev| (≤ 2.8), and diffusers' σ_t
            # (≤ 3u off) through √(1 − ᾱ_prev − σ_t²): |ε̂|·3uσ_t²/c ≤ 3.7·3u·1.8 (at t = 751): ≈ 33u = 2e-6; allow 3e-6
            torch.testing.assert_close(scheduler.step(eps, t, x_t, eta=args.eta, variance_noise=z).prev_sample, x_prev,
                                       rtol=0, atol=3e-6)
            expected = torch.distributions.Normal(mean, sigma_t).log_prob(x_prev).mean(dim=(1, 2, 3))
            # the same UNet call on the same 2B rows as the rollout's, so μ is the rollout's; bound as in
            # test_log_prob_equals_torch_normal: 1 ulp of |log σ_t| ≤ 4 + 7u·|log π| (≤ 5): ≤ 6e-7
            torch.testing.assert_close(traj.log_probs[:, j], expected, rtol=1e-6, atol=1e-6)


def test_the_runs_tracker_takes_buffer_size_min_count_and_the_group_size(tmp_path, monkeypatch):
    """--buffer-size, --min-count and --samples-per-prompt reach the per-prompt tracker of a run, and its buffers
    hold what they say: after one round of 2 prompts x 3 samples with a buffer of 5, each prompt keeps its 3."""
    real, made = ddpo.PerPromptStatTracker, []
    monkeypatch.setattr(ddpo, "PerPromptStatTracker", lambda *a: made.append(real(*a)) or made[-1])
    ddpo.main(["--epochs", "1", "--num-steps", "2", "--samples-per-epoch", "6", "--samples-per-prompt", "3",
               "--sample-batch-size", "6", "--num-minibatches", "1", "--buffer-size", "5", "--min-count", "3",
               "--out-dir", str(tmp_path), "--run-name", "t"])
    (tracker,) = made
    assert (tracker.buffer_size, tracker.min_count, tracker.group_size) == (5, 3, 3)
    assert sorted(len(b) for b in tracker.buffers.values()) in ([3, 3], [6])  # two prompts, or one drawn twice


def test_the_clip_range_reaches_the_ddpo_is_loss(random_models, monkeypatch):
    """--clip-range is ε in every DDPO_IS loss of a round, whatever its value."""
    real, seen = ddpo.ddpo_is_loss, []
    monkeypatch.setattr(ddpo, "ddpo_is_loss", lambda *a: seen.append(a[3]) or real(*a))
    for epsilon in ("0.037", "0.5"):
        seen.clear()
        count_round(random_models, "is", "--clip-range", epsilon, "--num-minibatches", "1")
        assert seen and set(seen) == {float(epsilon)}


def test_the_value_learning_rate_is_v_phis_optimizers(tmp_path):
    """--value-lr is the learning rate of V_φ's own AdamW (saved with the checkpoint), not the policy's --lr."""
    ddpo.main(["--epochs", "1", "--num-steps", "2", "--samples-per-epoch", "4", "--samples-per-prompt", "2",
               "--advantage", "value", "--value-lr", "0.0123", "--value-steps", "1", "--lr", "3e-5",
               "--out-dir", str(tmp_path), "--run-name", "v"])
    state = torch.load(tmp_path / "v" / "checkpoints" / "epoch_0001" / "state.pt", weights_only=True)
    assert [g["lr"] for g in state["value_optimizer"]["param_groups"]] == [0.0123]
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [3e-5]


@pytest.mark.parametrize("flag", ["--clip-model", "--aesthetic-head", "--vlm", "--bertscore-model", "--pickscore-model",
                                  "--pickscore-processor", "--imagereward-model", "--imagereward-tokenizer"])
def test_each_reward_model_flag_reaches_the_reward(flag, monkeypatch):
    """--clip-model, --aesthetic-head, --vlm, … from the command line reach make_reward as given (a local folder wins
    over the hub id). The flags are written out, so that the mutation check's per-flag search finds this test."""
    assert len(rewards.MODEL_OPTIONS) == 8  # a new reward-model option belongs in the list above
    option, seen = flag[2:].replace("-", "_"), {}
    monkeypatch.setattr(rewards, "make_reward", lambda name, device, **options: seen.update(options) or (lambda i, p: i))
    args = ddpo.parse_args(["--reward", "aesthetic", flag, "/my/own/" + option])
    ddpo.load_reward(args)
    assert seen[option] == "/my/own/" + option
    assert all(v == ("tiny" if k in JUDGE_OPTIONS else rewards.MODEL_OPTIONS[k][0]) for k, v in seen.items() if k != option)


def test_the_trained_timesteps_and_minibatches_are_the_ones_the_flags_select(random_model_dir, monkeypatch):
    """--timestep-fraction picks, for each sample and each inner epoch, its own distinct steps out of all T (not
    the same for every sample, not the first ones); --num-minibatches cuts a permutation of the round, so each
    sample is trained once per inner epoch."""
    models = ddpo.load_models(str(random_model_dir), "cpu")  # its own copy: train_round leaves gradients behind
    args = small_args("--timestep-fraction", "0.5", "--num-minibatches", "2", "--inner-epochs", "2",
                      "--samples-per-epoch", "8", "--samples-per-prompt", "2", "--train-batch-size", "2")
    prompts = ["cat", "cat", "dog", "dog", "cow", "cow", "pig", "pig"]
    traj = ddpo.rollout(models, prompts, args, ddpo.noise_generators(0, range(8)))
    seen, real = [], ddpo.rescore
    monkeypatch.setattr(ddpo, "rescore", lambda m, tr, rows, steps, *rest: (
        seen.extend(zip(rows.tolist(), steps.tolist())) or real(m, tr, rows, steps, *rest)))
    optimizer = torch.optim.SGD([p for p in models.denoiser.parameters() if p.requires_grad], lr=0.0)
    ddpo.train_round(models, optimizer, traj, torch.linspace(-1, 1, 8), torch.zeros(8), args,
                     torch.Generator().manual_seed(0), ddpo.encode_prompts(models, [""]))
    T, n = 4, 2  # int(0.5 · 4) steps of each sample
    per_epoch = [seen[:len(seen) // 2], seen[len(seen) // 2:]]
    chosen = []
    for pairs in per_epoch:
        steps = {i: sorted(s for r, s in pairs if r == i) for i in range(8)}
        assert all(len(v) == n and len(set(v)) == n and set(v) <= set(range(T)) for v in steps.values()), steps
        chosen.append(steps)
    assert len({tuple(v) for v in chosen[0].values()}) > 1, "every sample trained on the same steps"
    assert {s for steps in chosen for v in steps.values() for s in v} == set(range(T)), "some steps never trained"
    assert chosen[0] != chosen[1], "the steps were not drawn again for the second inner epoch"


def test_noise_streams_differ_where_they_must_and_repeat_where_they_must():
    """A trajectory's noise is keyed by (seed, stream, epoch, index) and by nothing else: the same key draws the same
    noise, a change of any part other noise."""
    def draw(seed=0, index=0, epoch=0, stream=0):
        return torch.randn(16, generator=ddpo.noise_generators(seed, [index], epoch, stream)[0])

    assert torch.equal(draw(), draw())
    for change in ({"seed": 1}, {"index": 1}, {"epoch": 1}, {"stream": 1}, {"stream": 2}):
        # not rounding: two independent N(0, 1) draws agree within 0.1 with probability 0.056, 16 of them 1e-20
        assert not torch.allclose(draw(), draw(**change), atol=0.1), change


def test_each_random_stream_is_keyed_as_it_must_be_in_a_run(tmp_path, monkeypatch):
    """Training noise: new every epoch, one key per trajectory (the k samples of a prompt differ). The per-epoch eval
    samples: the same noise every epoch (stream 1), never a training sample's. evaluate.py: its own stream (2)."""
    calls, real = [], ddpo.noise_generators
    monkeypatch.setattr(ddpo, "noise_generators", lambda seed, indices, epoch=0, stream=0: (
        calls.append((seed, list(indices), epoch, stream)) or real(seed, indices, epoch, stream)))
    ddpo.main(["--epochs", "2", "--num-steps", "2", "--samples-per-epoch", "4", "--samples-per-prompt", "2",
               "--seed", "3", "--out-dir", str(tmp_path), "--run-name", "s"])
    assert [c for c in calls if c[3] == 0] == [(3, [0, 1, 2, 3], 1, 0), (3, [0, 1, 2, 3], 2, 0)]
    assert [c for c in calls if c[3] != 0] == [(3, list(range(8)), 0, 1)] * 3  # epochs 0, 1, 2
    calls.clear()
    evaluate.main([str(tmp_path / "s")])
    assert calls and all(c[3] == 2 and c[2] == 0 for c in calls)


@pytest.mark.parametrize("flags", [[], ["--eta", "0.6"], ["--guidance-scale", "2.5"], ["--num-steps", "3"]],
                         ids=["defaults", "eta", "guidance", "steps"])
def test_rescoring_unchanged_weights_gives_ratio_one(random_models, flags):
    """Every flag that shapes sampling shapes rescoring the same way: at θ = θ_old the ratio is 1, at any value."""
    args = small_args(*flags)
    traj = ddpo.rollout(random_models, ["tench", "goldfish", "cat", "dog"], args, ddpo.noise_generators(3, range(4)))
    uncond = ddpo.encode_prompts(random_models, [""])  # one row: rescore expands it to the rows it scores
    advantages = torch.tensor([1.0, -1.0, 0.5, -2.0])
    with torch.no_grad():
        for j in range(len(traj.timesteps)):
            for rows in (torch.arange(4), torch.tensor([2]), torch.tensor([3, 0])):  # any minibatch layout
                steps = torch.full((len(rows),), j)
                log_prob = ddpo.rescore(random_models, traj, rows, steps, uncond, args)[0]
                if len(rows) == 4:  # the sampling batch's own layout: the same computation, the same bits
                    assert torch.equal(log_prob, traj.log_probs[:, j])
                # another layout runs other kernels: only float32 rounding may differ, within its derived bound
                # (conftest.py); a wrong timestep, guidance, η or action moves log π by far more
                bound = rescoring_rounding_bound(random_models, traj, rows, j, uncond, args)
                assert ((log_prob - traj.log_probs[rows, j]).abs() <= bound).all(), (j, rows, log_prob, bound)
                _, approx_kl, clipfrac = ddpo.ddpo_is_loss(log_prob, traj.log_probs[rows, j], advantages[rows], 1e-4)
                # ½ mean(logratio²) ≤ ½ max(bound)², and a ratio within e^bound of 1 is clipped only past ε
                assert approx_kl.item() <= 0.5 * bound.max().item() ** 2 + 1e-30
                assert clipfrac.item() == 0 or bound.max().item() > 1e-4


def test_guidance_scale_combines_the_two_predictions(random_models):
    g = torch.Generator().manual_seed(4)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    cond = ddpo.encode_prompts(random_models, ["cat", "dog"])
    uncond = ddpo.repeat(ddpo.encode_prompts(random_models, [""]), 2)
    t = torch.tensor([501, 501])
    with torch.no_grad():  # the two predictions from one UNet call on the same 2B rows as policy's, so == holds
        eps_u, eps_c = random_models.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat(
            [uncond["encoder_hidden_states"], cond["encoder_hidden_states"]])).sample.chunk(2)
        random_models.scheduler.set_timesteps(20)
        mean, _ = ddpo.policy(random_models, x_t, t, cond, uncond, 3.0, 1.0)
        expected, _ = ddpo.ddim_step(random_models.scheduler, eps_u + 3.0 * (eps_c - eps_u), x_t, t, 1.0)
    assert torch.equal(mean, expected)


# --------------------------------------------------------------------------------------------------------
# App. D.3: advantages
# --------------------------------------------------------------------------------------------------------

def test_stat_tracker_falls_back_to_batch_stats_then_uses_the_prompts_own():
    tracker = ddpo.PerPromptStatTracker(buffer_size=4, min_count=3)
    # round 1: each prompt has < 3 rewards → batch statistics: mean 2.5, std √1.25 = 1.1180340
    adv, own = tracker(["a", "a", "b", "b"], [1.0, 2.0, 3.0, 4.0])
    # bound (both lines): the numbers are 7 significant digits of (r − mean)/std (≤ 3.7e-7 relative), the tracker
    # divides by std + 1e-6 (≤ 1e-6/1.118 = 9e-7 relative), float32 adds 0.5u: ≤ 1.3e-6; we allow 2e-6
    np.testing.assert_allclose(adv.numpy(), [-1.3416399, -0.4472133, 0.4472133, 1.3416399], rtol=2e-6)
    assert own == 0.0
    # round 2: "a" now has 1, 2, 5 (3 ≥ min_count): mean 8/3, std 1.6996732; "b" has 3, 4, 10: mean 17/3, std 3.0912062
    adv, own = tracker(["a", "b"], [5.0, 10.0])
    np.testing.assert_allclose(adv.numpy(), [1.3728129, 1.4018260], rtol=2e-6)
    assert own == 1.0
    # the buffer keeps the most recent buffer_size rewards
    tracker(["a", "a"], [7.0, 8.0])
    assert tracker.buffers["a"] == [2.0, 5.0, 7.0, 8.0]


def test_per_prompt_advantages_use_each_prompts_own_rewards():
    """Two samples of each prompt and min_count 2: a: 1, 3 → −1, +1; b: 10, 14 → −1, +1 (a batch normalisation
    would give −1.06, −0.74, 0.74, 1.06)."""
    args = small_args("--advantage", "per-prompt", "--min-count", "2", "--buffer-size", "4")
    adv, own = ddpo.compute_advantages(ddpo.PerPromptStatTracker(4, 2), ["a", "a", "b", "b"],
                                       torch.tensor([1.0, 3.0, 10.0, 14.0]), args)
    # bound: the tracker's std + 1e-6 makes ±1 into ±1/(1 + 1e-6/std) (std 1 and 2): ≤ 1e-6 off; + float64→32 0.5u
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]), rtol=0, atol=2e-6)
    assert own == 1.0


def test_group_sampling_normalises_each_prompt_by_its_own_group():
    """--samples-per-prompt 2: before a prompt's buffer holds min_count rewards, its group of 2 is its statistics
    (a: 1, 3 → −1, +1; b: 10, 14 → −1, +1), where without groups the batch would be (−1.06, −0.74, 0.74, 1.06)."""
    tracker = ddpo.PerPromptStatTracker(buffer_size=16, min_count=16, group_size=2)
    adv, own = tracker(["a", "a", "b", "b"], [1.0, 3.0, 10.0, 14.0])
    np.testing.assert_allclose(adv.numpy(), [-1.0, 1.0, -1.0, 1.0], atol=2e-6)  # the std + 1e-6 guard: ≤ 1e-6 off
    assert own == 1.0


def test_a_prompt_drawn_twice_in_a_round_is_normalised_by_all_of_its_rewards():
    """Buffer = min-count = k = 2, the defaults' arithmetic: "a" drawn twice in one round (its groups 1, 3 and 5, 7)
    is one prompt's four i.i.d. rewards: mean 4, std √5, so its advantages are (r − 4)/√5 for both groups. A buffer
    cut to k would keep 5, 7 (mean 6, std 1) and give the first group −5, −3."""
    tracker = ddpo.PerPromptStatTracker(buffer_size=2, min_count=2, group_size=2)
    adv, own = tracker(["a", "a", "b", "b", "a", "a"], [1.0, 3.0, 10.0, 14.0, 5.0, 7.0])
    # bound: the std + 1e-6 guard moves A by |A|·1e-6/std ≤ 1.34e-6/√5 = 6e-7 (std 2: 5e-7), float32 0.5u·1.34
    np.testing.assert_allclose(adv.numpy(), [-3 / 5**0.5, -1 / 5**0.5, -1.0, 1.0, 1 / 5**0.5, 3 / 5**0.5], atol=2e-6)
    assert own == 1.0 and tracker.buffers["a"] == [1.0, 3.0, 5.0, 7.0]
    # the next round it is drawn once: its buffer is back to the last buffer_size rewards, this round's group
    adv, _ = tracker(["a", "a"], [0.0, 2.0])
    assert tracker.buffers["a"] == [0.0, 2.0]
    np.testing.assert_allclose(adv.numpy(), [-1.0, 1.0], atol=2e-6)  # std 1: the guard moves ±1 by 1e-6


def test_group_sampling_draws_k_samples_of_each_prompt_with_distinct_noise(tmp_path, monkeypatch):
    real, seen = ddpo.compute_rewards, []

    def recording(fn, name, images, prompts):
        seen.append((images, prompts))
        assert len(seen) <= 3, "--epochs 1 went on to a second round"  # at once, not after many more
        return real(fn, name, images, prompts)

    monkeypatch.setattr(ddpo, "compute_rewards", recording)
    ddpo.main(["--samples-per-prompt", "4", "--samples-per-epoch", "8", "--sample-batch-size", "8", "--epochs", "1",
               "--num-steps", "2", "--out-dir", str(tmp_path), "--run-name", "r"])
    assert len(seen) == 3  # the evaluations before and after training, and the one round between them
    images, prompts = seen[1]
    assert prompts == [prompts[0]] * 4 + [prompts[4]] * 4 and prompts[0] != prompts[4]
    assert all(not torch.equal(images[i], images[j]) for i in range(4) for j in range(i + 1, 4))  # distinct noise
    row = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["adv/per_prompt_fraction"] == 1.0


def test_advantages_batch_mode_and_clipping():
    """r = 0, 0, 0, 10: mean 2.5, std √18.75, so A = −1/√3 three times and √3 = 1.732, clipped to 1.5."""
    r = torch.tensor([0.0, 0.0, 0.0, 10.0])
    batch, own = ddpo.compute_advantages(None, ["a"] * 4, r, small_args("--advantage", "batch", "--adv-clip", "1.5"))
    # bound: mean and deviations exact here (2.5, 18.75), then √, + 1e-6, ÷: 3 roundings, the guard 1e-6/4.33 = 2.3e-7
    # relative, and 0.5u for the float32 of −1/√3: ≈ 4.3e-7; we allow rtol 1e-6
    torch.testing.assert_close(batch, torch.tensor([-1 / math.sqrt(3)] * 3 + [1.5]), rtol=1e-6, atol=0)
    assert own == 0.0


# --------------------------------------------------------------------------------------------------------
# The four estimators
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("logratio, advantage, expected_loss, clipped", [
    (0.00005, 2.0, -2.0 * math.exp(0.00005), 0),  # inside the clip range: −A·ratio
    (0.01, 2.0, -2.0 * (1 + 1e-4), 1),  # A > 0, ratio above 1+ε: the clipped (smaller) gain counts
    (-0.01, 2.0, -2.0 * math.exp(-0.01), 1),  # A > 0, ratio below 1−ε: the unclipped (worse) value counts
    (0.01, -3.0, 3.0 * math.exp(0.01), 1),  # A < 0, ratio above 1+ε: unclipped (worse) counts
    (-0.01, -3.0, 3.0 * (1 - 1e-4), 1),  # A < 0, ratio below 1−ε: clipped counts
])
def test_clipped_loss_matches_hand_computed(logratio, advantage, expected_loss, clipped):
    old = torch.tensor([-1.3])
    new = old + logratio
    loss, approx_kl, clipfrac = ddpo.ddpo_is_loss(new, old, torch.tensor([advantage]), 1e-4)
    # bound: new = −1.3 + logratio rounds to 0.5 ulp(1.3) = 6e-8, which exp turns into 6e-8 relative; exp itself ≤ 1
    # ulp (1.2e-7), ×A and 1 ± ε ≤ 0.5u each: ≈ 2.4e-7; we allow 1e-6
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    # the fp32 logratio, squared in float32 (0.5u) against in float64; ×½ and the mean of one are exact: allow 2u
    assert approx_kl.item() == pytest.approx(0.5 * (new - old).item() ** 2, rel=1.2e-7)
    assert clipfrac.item() == clipped


def test_approx_kl_and_clipfrac_over_several_samples():
    """logratios 0, 0.01, −0.02, 5e-5 with ε = 1e-4: approx_kl = ½ mean(logratio²) = ½ (1e-4 + 4e-4 + 2.5e-9) / 4;
    two of the four ratios are outside 1 ± ε, so clipfrac = 0.5 (the fraction, not the count)."""
    new = torch.tensor([0.0, 0.01, -0.02, 5e-5], dtype=torch.float64)
    _, approx_kl, clipfrac = ddpo.ddpo_is_loss(new, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), 1e-4)
    # bound: float64: the inputs' decimal rounding and ~8 operations, each 2^-53 = 1.1e-16: ≈ 1e-15; we allow 1e-14
    assert approx_kl.item() == pytest.approx(6.25003125e-5, rel=1e-14)
    assert clipfrac.item() == 0.5


def test_clipped_loss_has_no_gradient_once_clipped_in_the_advantage_direction():
    log_prob = torch.tensor([0.01, -0.01], requires_grad=True)  # ratios e^0.01 (clipped), e^-0.01 (unclipped)
    loss, _, _ = ddpo.ddpo_is_loss(log_prob, torch.zeros(2), torch.tensor([1.0, 1.0]), 1e-4)
    loss.backward()
    # bound: the clipped sample's gradient is exactly 0; the other is −fl(exp(−0.01))/2 (exp ≤ 1 ulp, /2 exact)
    # against float64 rounded once: ≤ 1.5u; we allow 4u = 2.4e-7
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, -math.exp(-0.01) / 2]), rtol=2.4e-7, atol=0)


def test_rwr_exponential_weights_are_the_papers_formula_by_hand():
    """w = exp(β x)/Z with Z = the mean of exp(β x): x = 0, ln 2, ln 4 at β = 1 gives 1, 2, 4 over 7/3."""
    x = torch.tensor([0.0, math.log(2), math.log(4)])
    # bound: ln 4 in float32 is off by ≤ 0.5u·1.39 (exp: 0.7u relative), exp ≤ 1 ulp, the sum of 3, ÷ and ×3 one u
    # each, the float32 of the expected 0.5u: ≈ 6u = 3.6e-7 relative; we allow rtol 1e-6 (same in the next two tests)
    torch.testing.assert_close(ddpo.rwr_exponential_weights(x, beta=1.0), torch.tensor([3 / 7, 6 / 7, 12 / 7]), rtol=1e-6, atol=0)
    torch.testing.assert_close(ddpo.rwr_exponential_weights(x, beta=0.0), torch.ones(3), rtol=1e-6, atol=0)  # β = 0: plain DDPM loss
    torch.testing.assert_close(ddpo.rwr_exponential_weights(x, beta=0.5), torch.tensor([1, math.sqrt(2), 2]) / ((3 + math.sqrt(2)) / 3),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("which, expected", [
    ("reward", [3 / 7, 6 / 7, 12 / 7]),  # the paper: exp(β r) on r = 0, ln 2, ln 4
    ("advantage", [12 / 7, 6 / 7, 3 / 7]),  # exp(β A) on A = ln 2, 0, −ln 2: weights 2, 1, ½ over 7/6
])
def test_rwr_weights_exponentiate_the_configured_quantity(which, expected):
    rewards, advantages = torch.tensor([0.0, math.log(2), math.log(4)]), torch.tensor([math.log(2), 0.0, -math.log(2)])
    args = small_args("--algo", "rwr", "--rwr-weights", which, "--rwr-beta", "1")
    torch.testing.assert_close(ddpo.rwr_weights(args, rewards, advantages), torch.tensor(expected), rtol=1e-6, atol=0)


def test_sparse_rwr_keeps_rewards_at_or_above_c_by_default_the_top_tenth():
    r = torch.arange(1.0, 11.0)  # 1 … 10: the 90th percentile is 9.1, so only r = 10 is kept, with weight 10
    args = small_args("--algo", "rwr-sparse")
    # bound: keep / keep.mean(): the mean rounds once (0.5u), the division once, the float32 of 10/6 once: ≤ 1.5u;
    # we allow 4u = 2.4e-7 (the zeros are exact)
    torch.testing.assert_close(ddpo.rwr_weights(args, r, torch.zeros(10)), torch.tensor([0.0] * 9 + [10.0]), rtol=2.4e-7, atol=0)
    args = small_args("--algo", "rwr-sparse", "--rwr-threshold", "5")  # r ≥ 5: six kept, each weighted 10/6
    torch.testing.assert_close(ddpo.rwr_weights(args, r, torch.zeros(10)), torch.tensor([0.0] * 4 + [10 / 6] * 6), rtol=2.4e-7, atol=0)
    assert torch.equal(ddpo.rwr_sparse_weights(r, threshold=20.0), torch.zeros(10))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_loss_is_zero_for_the_true_target_and_matches_the_closed_form(prediction_type):
    """Against the forward process written out: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, and v = √ᾱ_t ε − √(1−ᾱ_t) x_0."""
    scheduler = sd_scheduler(prediction_type=prediction_type)
    a = scheduler.alphas_cumprod
    x0 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))

    class Oracle(torch.nn.Module):  # knows x_0, so it can recover ε (and v) exactly from x_t; called as a UNet is
        def forward(self, sample, timestep, return_dict):
            ab = a[timestep].view(-1, 1, 1, 1)
            eps = (sample - ab.sqrt() * x0) / (1 - ab).sqrt()
            return ({"epsilon": eps, "sample": x0, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction_type],)

    class Zero(torch.nn.Module):
        def forward(self, sample, timestep, return_dict):
            return (torch.zeros_like(sample),)

    oracle = ddpo.Models(Oracle(), None, None, scheduler, None, "cpu")
    # bound: the oracle's ε = (x_t − √ᾱ x_0)/√(1 − ᾱ) carries x_t's and √ᾱ x_0's roundings (2u·|x_t| ≤ 2u·4.5)
    # divided by √(1 − ᾱ_0) = 0.029: ≤ 1.9e-5 per value (v: the same), squared ≤ 3.5e-10; we allow 1e-9
    assert ddpo.ddpm_loss(oracle, x0, {}, *ddpo.ddpm_noise(scheduler, x0.shape, torch.Generator().manual_seed(6))).abs().max().item() < 1e-9
    zero = ddpo.Models(Zero(), None, None, scheduler, None, "cpu")
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (3,), generator=g)  # the loss draws t first, then ε, from the same generator
    noise = torch.randn(x0.shape, generator=g)
    ab = a[t].view(-1, 1, 1, 1)
    target = {"epsilon": noise, "sample": x0, "v_prediction": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[prediction_type]
    # the target is written here in diffusers' order (get_velocity: √ᾱ ε − √(1 − ᾱ) x_0), (0 − y)² = y², and the
    # same mean over the same shape: the same bits
    assert torch.equal(ddpo.ddpm_loss(zero, x0, {}, *ddpo.ddpm_noise(scheduler, x0.shape, torch.Generator().manual_seed(7))),
                       target.pow(2).mean(dim=(1, 2, 3)))


def test_score_function_gradient_is_unbiased_on_a_toy_problem():
    """One-step Gaussian policy a ~ N(μ, σ²), reward r(a) = −(a − 3)²: E[r] = −(μ − 3)² − σ², so ∂E[r]/∂μ = −2(μ − 3).

    The gradient of the SF loss is −(Monte Carlo estimate of ∇E[r]); with μ = 1, σ = 0.5 the loss gradient must be −4.
    """
    torch.manual_seed(0)
    mu, sigma, n = torch.tensor([1.0], requires_grad=True), torch.tensor(0.5), 400_000
    a = (mu + sigma * torch.randn(n, 1)).detach()  # actions are sampled, then held constant
    r = -((a - 3.0) ** 2).squeeze(1)
    ddpo.ddpo_sf_loss(ddpo.gaussian_log_prob(a, mu.expand(n, 1), sigma), r).backward()
    per_sample = r * (a.squeeze(1) - 1.0) / sigma**2  # r ∇_μ log π, for the standard error
    stderr = per_sample.std().item() / math.sqrt(n)
    assert stderr < 0.02  # so 4 standard errors are < 2% of the exact gradient, 4 (false failure rate 6e-5)
    assert -mu.grad.item() == pytest.approx(-2 * (1.0 - 3.0), abs=4 * stderr)


@pytest.mark.parametrize("advantage, direction", [(1.0, 1), (-1.0, -1)])
def test_one_is_step_moves_log_prob_with_the_advantage(random_model_dir, advantage, direction):
    models = ddpo.load_models(str(random_model_dir), "cpu")  # a fresh copy: this test trains it
    args = small_args("--algo", "is", "--num-minibatches", "1", "--lr", "1e-4")
    traj = ddpo.rollout(models, ["cat"], args, ddpo.noise_generators(8, range(1)))
    uncond = ddpo.encode_prompts(models, [""])
    # a small plain gradient step tests the estimator's direction (Adam's first step is ±lr on every weight,
    # which can overshoot where log π is sharply curved, at the last steps' small σ_t)
    optimizer = torch.optim.SGD(models.denoiser.parameters(), lr=1e-3)
    logs = ddpo.train_round(models, optimizer, traj, torch.tensor([advantage]), torch.zeros(1), args,
                            torch.Generator().manual_seed(0), uncond)
    # one minibatch of the one sample, re-scored alone as it was sampled alone: θ = θ_old and the same computation
    assert logs["approx_kl"] == 0 and logs["clipfrac"] == 0
    with torch.no_grad():
        after = torch.stack([ddpo.rescore(models, traj, torch.tensor([0]), torch.tensor([j]), uncond, args)[0]
                             for j in range(4)]).sum()
    assert direction * (after - traj.log_probs.sum()).item() > 1e-3  # measured: ±0.01


def count_round(models, algo, *flags, advantages=(1.0, -1.0, 0.5, -0.5), optimizer=None, one_at_a_time=False):
    """Train one round on 4 fresh samples; returns (UNet batch sizes per forward pass, optimizer steps, logs).
    one_at_a_time: each sample drawn alone (as --sample-batch-size 1 would)."""
    args = small_args("--algo", algo, *flags)
    prompts, generators = ["cat", "dog", "cow", "pig"], ddpo.noise_generators(9, range(4))
    traj = ddpo.Trajectories.cat([ddpo.rollout(models, [c], args, [g]) for c, g in zip(prompts, generators)]) \
        if one_at_a_time else ddpo.rollout(models, prompts, args, generators)
    calls, steps = [], []
    optimizer = optimizer or torch.optim.AdamW(models.denoiser.parameters(), lr=0.0)
    hooks = [models.denoiser.register_forward_hook(lambda m, a, kw, out: calls.append(kw["sample"].shape[0]), with_kwargs=True),
             optimizer.register_step_post_hook(lambda *_: steps.append(1))]
    try:
        logs = ddpo.train_round(models, optimizer, traj, torch.tensor(advantages), torch.arange(4.0), args,
                                torch.Generator().manual_seed(0), ddpo.encode_prompts(models, [""]))
    finally:
        for hook in hooks:
            hook.remove()
    return calls, len(steps), logs


@pytest.mark.parametrize("algo, optimizer_steps, passes, per_pass", [
    ("is", 8, 16, 1),  # 2 inner epochs x 4 minibatches; 2 x 4 samples (1 per pass) x 2 of the 4 timesteps
    ("sf", 1, 8, 1),  # one step per round, whatever the flags: its samples must come from the current θ
    ("is", 8, 8, 2),  # both trained timesteps of a sample in one pass
])
def test_batch_arithmetic_flags_decide_the_forward_passes(random_models, algo, optimizer_steps, passes, per_pass):
    """--num-minibatches, --inner-epochs, --train-batch-size, --timestep-fraction and --timesteps-per-pass, counted
    as UNet calls; each flag away from its default, so that a flag read as its default changes a count."""
    calls, steps, _ = count_round(random_models, algo, "--num-minibatches", "4", "--inner-epochs", "2",
                                  "--train-batch-size", "1", "--timestep-fraction", "0.5", "--lr", "0",
                                  "--timesteps-per-pass", str(per_pass))
    assert steps == optimizer_steps
    assert calls == [2 * per_pass] * passes  # each pass: its steps, conditional + unconditional


def test_ddpo_is_and_sf_take_different_updates_at_the_defaults(random_model_dir):
    """One optimizer step a round at θ = θ_old makes DDPO_IS's ratio 1 and its gradient DDPO_SF's: the defaults
    give DDPO_IS several steps a round on the same samples, so after the first one its ratio moves."""
    updates = {}
    for algo in ("is", "sf"):
        models = ddpo.load_models(str(random_model_dir), "cpu")
        before = [p.detach().clone() for p in models.denoiser.parameters()]
        optimizer = torch.optim.AdamW(models.denoiser.parameters(), lr=ddpo.parse_args([]).lr)
        _, steps, logs = count_round(models, algo, optimizer=optimizer)  # the defaults, but T = 4
        updates[algo] = torch.cat([(p.detach() - b).flatten() for p, b in zip(models.denoiser.parameters(), before)])
        assert steps == (1 if algo == "sf" else ddpo.parse_args([]).num_minibatches * ddpo.parse_args([]).inner_epochs)
        if algo == "is":
            assert steps >= 2 and logs["approx_kl"] > 0
    assert (updates["is"] - updates["sf"]).norm() > 0.1 * updates["sf"].norm()


def test_trained_timesteps_truncate_like_the_pytorch_port():
    """int(T · fraction), as ddpo-pytorch computes it: 10 x 0.35 = 3.5 → 3 (rounding gives 4), 4 x 0.99 → 3."""
    assert ddpo.round_plan(small_args("--timestep-fraction", "0.35"), 10)[2] == 3
    assert ddpo.round_plan(small_args("--timestep-fraction", "0.99"), 4)[2] == 3
    assert ddpo.round_plan(small_args("--timestep-fraction", "0.01"), 4)[2] == 1  # at least one


def test_ddpo_is_ratio_is_one_at_the_first_step_then_moves_and_clips(random_model_dir, monkeypatch):
    """Two inner epochs: the first optimizer step sees θ = θ_old (ratio 1, nothing clipped); the later ones see
    the moved θ against the stored old log-probs, so approx_kl > 0 and some ratios leave 1 ± ε."""
    models = ddpo.load_models(str(random_model_dir), "cpu")  # a fresh copy: this test trains it
    real, seen = ddpo.ddpo_is_loss, []
    monkeypatch.setattr(ddpo, "ddpo_is_loss", lambda *a: seen.append(real(*a)) or seen[-1])
    # each sample drawn alone and trained alone (--train-batch-size 1): each re-scoring call repeats the layout and
    # inputs of the sampling call it re-scores, so at θ = θ_old it gives the same bits on any machine
    _, steps, logs = count_round(models, "is", "--inner-epochs", "2", "--num-minibatches", "1", "--train-batch-size", "1",
                                 optimizer=torch.optim.AdamW(models.denoiser.parameters(), lr=1e-3), one_at_a_time=True)
    assert steps == 2 and len(seen) == 32  # 2 steps x 4 samples x 4 timesteps, one call each
    first, later = seen[:16], seen[16:]
    assert all(kl.item() == 0 and cf.item() == 0 for _, kl, cf in first), "the ratio must be 1 when θ = θ_old"
    assert all(kl.item() > 1e-10 for _, kl, _ in later) and max(cf.item() for _, _, cf in later) > 0
    assert logs["clipfrac"] > 0 and logs["approx_kl"] > 0


def test_rwr_regresses_on_the_final_sample_x0(random_models, monkeypatch):
    real, seen = ddpo.ddpm_loss, []
    monkeypatch.setattr(ddpo, "ddpm_loss", lambda models, x0, *a: seen.append(x0) or real(models, x0, *a))
    args = small_args("--algo", "rwr", "--num-minibatches", "1")
    traj = ddpo.rollout(random_models, ["cat", "dog"], args, ddpo.noise_generators(9, range(2)))
    ddpo.train_round(random_models, torch.optim.SGD(random_models.denoiser.parameters(), lr=0.0), traj,
                     torch.tensor([1.0, -1.0]), torch.zeros(2), args, torch.Generator().manual_seed(0),
                     ddpo.encode_prompts(random_models, [""]))
    assert len(seen) == 1 and len(seen[0]) == 2  # one minibatch of both samples, in the round's shuffled order
    x0 = traj.states[:, -1]  # a = x_0, the image that was scored, not x_T or any other state
    found = [next((i for i in range(2) if torch.equal(row, x0[i])), None) for row in seen[0]]
    assert sorted(found, key=str) == [0, 1], "RWR must regress on the final samples x_0"


def test_sparse_rwr_takes_no_step_when_no_sample_reaches_c(random_model_dir):
    """AdamW with weight decay would move every weight even on a zero loss: the step must be skipped."""
    models = ddpo.load_models(str(random_model_dir), "cpu")
    before = [p.detach().clone() for p in models.denoiser.parameters()]
    optimizer = torch.optim.AdamW(models.denoiser.parameters(), lr=1e-2, weight_decay=0.1)
    _, steps, logs = count_round(models, "rwr-sparse", "--rwr-threshold", "100", "--num-minibatches", "2",
                                 optimizer=optimizer)
    assert steps == 0 and logs["skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, models.denoiser.parameters()))
    # with C = 3 only the sample with r = 3 is kept: one of the two minibatches steps, the other is skipped
    _, steps, logs = count_round(models, "rwr-sparse", "--rwr-threshold", "3", "--num-minibatches", "2",
                                 optimizer=optimizer)
    assert steps == 1 and logs["skipped"] == 0.5


def test_non_finite_weights_after_a_step_stop_the_round(random_model_dir):
    models = ddpo.load_models(str(random_model_dir), "cpu")
    optimizer = torch.optim.SGD(models.denoiser.parameters(), lr=0.0)
    name, param = next(iter(models.denoiser.named_parameters()))
    optimizer.register_step_post_hook(lambda *_: param.data.fill_(float("inf")))  # an update that overflowed
    with pytest.raises(ddpo.NonFinite, match=rf"non-finite weights \({name}\) after optimizer step 1"):
        count_round(models, "is", "--num-minibatches", "1", optimizer=optimizer)


# --------------------------------------------------------------------------------------------------------
# DPOK (Fan et al. 2023): the KL to the pretrained model and the learned value baseline
# --------------------------------------------------------------------------------------------------------

def test_gaussian_kl_equals_torch_kl_divergence_and_a_hand_computed_number():
    g = torch.Generator().manual_seed(0)
    mean, mean_pre = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    sigma_t = torch.tensor([0.3, 1.0, 2.5]).view(3, 1, 1, 1)  # one σ_t per sample, as at mixed timesteps
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, sigma_t),
                                                 torch.distributions.Normal(mean_pre, sigma_t)).mean(dim=(1, 2, 3))
    # bound: torch computes ½(1 + (Δμ/σ)² − 1 − log 1): ~4 roundings of (1 + KL), ours ~3 of KL, and the 32-term mean
    # ~5 levels: ≈ 12u·|KL| (≤ 11 at σ = 0.3) + 2u: 7.5e-6 absolute, 7e-7 relative; we allow rtol 1e-6, atol 1e-7
    torch.testing.assert_close(ddpo.gaussian_kl(mean, mean_pre, sigma_t), expected, rtol=1e-6, atol=1e-7)
    # by hand: means 1 and 0 in one of two dimensions, σ = 0.5: (1² / (2 · 0.25) + 0) / 2 = 1, every step exact
    assert ddpo.gaussian_kl(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.tensor(0.5)).item() == 1.0


def test_kl_gradient_pulls_the_mean_toward_the_pretrained_one():
    """∇_μ KL = (μ − μ_pre) / (σ² D): a gradient step on the penalty moves μ_θ towards μ_pre, never μ_pre."""
    mean, mean_pre = torch.tensor([[2.0, -1.0]], requires_grad=True), torch.tensor([[0.5, 0.5]], requires_grad=True)
    ddpo.gaussian_kl(mean, mean_pre, torch.tensor(0.5)).sum().backward()
    assert torch.equal(mean.grad, torch.tensor([[1.5, -1.5]]) / (0.25 * 2))  # dyadic numbers: every step exact
    assert mean_pre.grad is None or not mean_pre.grad.any()  # the pretrained model is a fixed target


def kl_round(models, kl_coef, lr):
    """One DDPO_SF round with zero advantages: the KL penalty is the whole loss. Returns the mean KL before, after."""
    args = small_args("--algo", "sf", "--kl-coef", str(kl_coef), "--max-grad-norm", "1e9")  # a plain SGD step
    traj = ddpo.rollout(models, ["cat", "dog"], args, ddpo.noise_generators(4, range(2)))
    uncond = ddpo.encode_prompts(models, [""])

    def kl():
        with torch.no_grad():
            return torch.cat([ddpo.rescore(models, traj, torch.arange(2), torch.full((2,), j), uncond, args)[1]
                              for j in range(4)]).mean().item()
    before = kl()
    params = [p for p in models.denoiser.parameters() if p.requires_grad]
    ddpo.train_round(models, torch.optim.SGD(params, lr=lr), traj, torch.zeros(2), torch.zeros(2), args,
                     torch.Generator().manual_seed(0), uncond)
    return before, kl()


def test_kl_is_zero_at_the_pretrained_model_and_its_gradient_pulls_back_towards_it(random_model_dir):
    """Full fine-tuning: π_pre is a frozen copy of the UNet as loaded. At θ = θ_pre the KL and its gradient are 0;
    after the weights move, the penalty's own gradient steps bring the KL down (zero advantages: nothing else acts)."""
    models = ddpo.load_models(str(random_model_dir), "cpu")
    models.reference = ddpo.copy.deepcopy(models.denoiser).requires_grad_(False)
    args = small_args("--kl-coef", "1")
    traj = ddpo.rollout(models, ["cat", "dog"], args, ddpo.noise_generators(4, range(2)))
    log_prob, kl = ddpo.rescore(models, traj, torch.arange(2), torch.tensor([1, 3]), ddpo.encode_prompts(models, [""]), args)
    kl.sum().backward()
    assert kl.tolist() == [0.0, 0.0] and all(not p.grad.any() for p in models.denoiser.parameters() if p.grad is not None)
    with torch.no_grad():
        for p in models.denoiser.parameters():
            p.add_(0.002 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    before, after = kl_round(models, kl_coef=1.0, lr=1e-3)
    assert before > 1e-3 and after < 0.9 * before  # measured: 0.160 → 0.135


def test_kl_is_off_at_zero_and_logged_when_on(random_models):
    args = small_args()
    traj = ddpo.rollout(random_models, ["cat"], args, ddpo.noise_generators(0, range(1)))
    assert ddpo.rescore(random_models, traj, torch.arange(1), torch.tensor([0]), ddpo.encode_prompts(random_models, [""]), args)[1] is None


def test_value_baseline_lowers_the_gradient_variance_and_keeps_its_mean():
    """A toy one-step problem with a known gradient: state s (a 1x4x4 'image'), action a ~ N(μ + 0, σ²), reward
    r = 10·mean(s) + a, so ∂E[r]/∂μ = 1 and the state explains most of r's variance. V_φ, fitted by fit_value on
    1024 trajectories, is the baseline of the REINFORCE estimate (r − V_φ(s)) ∂log π/∂μ on 20,000 new ones:
    the same mean (1, within 4 standard errors) and a much smaller variance than with no baseline."""
    torch.manual_seed(0)
    sigma, mu = 0.5, 0.0

    def trajectories(n, g):
        s = torch.randn(n, 1, 4, 4, generator=g)
        a = mu + sigma * torch.randn(n, generator=g)
        states = torch.stack([s, a.view(n, 1, 1, 1).expand(n, 1, 4, 4)], 1)  # (n, T+1, C, H, W) with T = 1
        traj = ddpo.Trajectories(["c"] * n, {"encoder_hidden_states": torch.zeros(n, 2, 8)}, states, torch.tensor([500]), torch.zeros(n, 1))
        return traj, 10 * s.mean(dim=(1, 2, 3)) + a, (a - mu) / sigma**2  # trajectories, r, ∂log π/∂μ

    args = ddpo.parse_args(["--advantage", "value", "--value-steps", "300", "--value-lr", "1e-2"])
    value = ddpo.ValueFunction(channels=1, cond_dim=8, width=32)
    traj, r, _ = trajectories(1024, torch.Generator().manual_seed(1))
    ddpo.fit_value(value, torch.optim.AdamW(value.parameters(), lr=args.value_lr), traj, r, args)
    traj, r, score = trajectories(20_000, torch.Generator().manual_seed(2))
    with torch.no_grad():
        baseline = ddpo.value_at(value, traj, 0)
    plain, with_value = r * score, (r - baseline) * score
    for g in (plain, with_value):
        # 4 standard errors of a 20,000-sample mean: false failure rate 6e-5 (not a rounding bound)
        assert g.mean().item() == pytest.approx(1.0, abs=4 * g.std().item() / math.sqrt(len(g)))
    assert with_value.var() < 0.2 * plain.var()  # measured: 2.47 against 26.9 (means 1.002 and 0.999)


def test_value_advantages_use_the_value_function_from_before_the_round(tmp_path, monkeypatch):
    """A sample's baseline must not contain its own reward: each round's advantages come from V_φ as fitted on the
    earlier rounds only (so in round 1 from the unfitted V_φ), and V_φ is fitted to the round afterwards."""
    fits, seen = [], []
    real_advantages, real_fit = ddpo.value_advantages, ddpo.fit_value
    monkeypatch.setattr(ddpo, "value_advantages", lambda *a: seen.append(len(fits)) or real_advantages(*a))
    monkeypatch.setattr(ddpo, "fit_value", lambda *a: fits.append(1) or real_fit(*a))
    ddpo.main(["--epochs", "3", "--num-steps", "2", "--samples-per-epoch", "4", "--samples-per-prompt", "4", "--sample-batch-size", "4",
               "--advantage", "value", "--out-dir", str(tmp_path), "--run-name", "v"])
    assert seen == [0, 1, 2] and len(fits) == 3
    row = [json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()][-1]
    assert math.isfinite(row["value/loss"]) and row["value/explained_variance"] <= 1


def test_value_advantages_are_per_step_and_normalised(random_models):
    args = small_args("--advantage", "value", "--adv-clip", "100")
    traj = ddpo.rollout(random_models, ["cat", "dog", "cow"], args, ddpo.noise_generators(0, range(3)))
    value = ddpo.ValueFunction(random_models.denoiser.config.in_channels, random_models.text_encoder.config.hidden_size)
    r = torch.tensor([1.0, 2.0, 4.0])
    unfitted, _ = ddpo.value_advantages(value, traj, r, args)  # V_φ constant until fitted: the batch advantages, every step
    batch, _ = ddpo.compute_advantages(None, ["a"] * 3, r, small_args("--advantage", "batch", "--adv-clip", "100"))
    # bound: V_φ = its bias b here, so δ = r − b (u·4 each), its 12-term mean and std (≤ 4u), ÷ std 1.25, |A| ≤ 1.4:
    # ≈ (3·4u + 4u·1.4·1.25)/1.25 ≈ 16u = 1e-6 against the batch's own ≈ 4u; we allow 2e-6
    torch.testing.assert_close(unfitted, batch[:, None].expand(3, 4), rtol=0, atol=2e-6)
    torch.nn.init.normal_(value.head[-1].weight)  # a V_φ that varies with the state
    advantages, logs = ddpo.value_advantages(value, traj, r, args)
    with torch.no_grad():
        v = torch.stack([value(traj.states[:, j], traj.timesteps[j].expand(3), traj.cond["encoder_hidden_states"]) for j in range(4)], 1)
    delta = r[:, None] - v  # (B, T): each step has its own baseline V(s_t)
    # V(s_t) from the same calls on the same rows as value_advantages', δ and its normalisation (its + 1e-6 guard
    # too) in the same order: the same bits
    assert torch.equal(advantages, (delta - delta.mean()) / (delta.std(unbiased=False) + 1e-6))
    assert logs["value/loss"] == delta.pow(2).mean().item()


# --------------------------------------------------------------------------------------------------------
# Rewards and prompts
# --------------------------------------------------------------------------------------------------------

def jpeg_kilobytes_by_hand(pixels):
    """One (H, W, 3) uint8 image written out with PIL at quality 95: its size in kB (bytes / 1000). The tests'
    reference for rewards.jpeg_kilobytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_jpeg_rewards():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise])
    compress, incompress = rewards.jpeg_compressibility(images, ["a", "b"]), rewards.jpeg_incompressibility(images, ["a", "b"])
    assert compress[0] > compress[1] and incompress[1] > incompress[0]  # flat is more compressible than noise
    assert torch.equal(compress, -incompress)
    pixels = (noise[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # the same number by hand
    assert incompress[1].item() == np.float32(jpeg_kilobytes_by_hand(pixels))  # the float32 of the same bytes / 1000
    assert compress.dtype == torch.float32 and compress.shape == (2,)


def test_non_finite_misshapen_or_raising_reward_stops_with_the_sample_named():
    broken = lambda images, prompts: torch.tensor([0.5, float("nan"), 1.0])
    with pytest.raises(files.RunError, match=r"reward 'broken' returned nan for sample 1 \(prompt 'dog'\)"):
        rewards.compute_rewards(broken, "broken", torch.zeros(3, 3, 4, 4), ["cat", "dog", "cow"])
    with pytest.raises(files.RunError, match=r"returned shape \(3,\), expected \(2,\)"):
        rewards.compute_rewards(broken, "broken", torch.zeros(2, 3, 4, 4), ["cat", "dog"])

    def no_cows(images, prompts):
        if "cow" in prompts:
            raise ValueError("cannot score cows")
        return torch.zeros(len(prompts))

    with pytest.raises(files.RunError, match=r"reward 'no_cows' raised ValueError: cannot score cows on sample 2 "
                                            r"\(prompt 'cow'\)"):
        rewards.compute_rewards(no_cows, "no_cows", torch.zeros(4, 3, 4, 4), ["cat", "dog", "cow", "pig"])


@pytest.mark.parametrize("content, message", [
    (b"a cat\n\xff\xfe a dog\n", "cannot be read as UTF-8 text"),
    (b"a cat\n\x00\x01\x02\n", "is not a text file"),
])
def test_a_prompt_file_that_is_not_text_is_one_line(tmp_path, content, message):
    (tmp_path / "prompts.txt").write_bytes(content)
    with pytest.raises(SystemExit, match=f"error: prompt file {tmp_path / 'prompts.txt'} {message}"):
        rewards.load_prompts(str(tmp_path / "prompts.txt"))


def test_prompt_sets():
    animals = rewards.load_prompts("imagenet_animals")
    assert len(animals) == 398 and animals[0] == "tench" and animals[-1] == "puffer"  # ImageNet ids 0–397
    assert len(rewards.load_prompts("simple_animals")) == 45
    alignment = rewards.load_prompts("alignment")
    assert len(alignment) == 45 * 3 and "an ant playing chess" in alignment and "a cat riding a bike" in alignment
    assert "a turtle driving a car" in rewards.load_prompts("alignment_unseen_activities")
    unseen = rewards.load_prompts("alignment_unseen_animals")  # §6.3: new animals, the training activities
    assert len(unseen) == 16 * 3 and "a penguin riding a bike" in unseen and "an owl playing chess" in unseen
    assert rewards.load_prompts(str(HERE / "prompts" / "everyday_objects.txt")) == rewards.load_prompts("everyday_objects")
    assert not set(rewards.load_prompts("unseen_animals")) & set(rewards.load_prompts("simple_animals"))


# --------------------------------------------------------------------------------------------------------
# The tiny built-in model and the CLI end to end
# --------------------------------------------------------------------------------------------------------

def palette_accuracy(images, prompts):
    """How often the image's border colour is nearest to the background colour its prompt picks (chance: 1/8)."""
    border = torch.cat([images[:, :, [0, 1, -2, -1], :].flatten(2), images[:, :, :, [0, 1, -2, -1]].flatten(2)], 2)
    colour = border.median(dim=2).values.numpy()  # (B, 3); the median ignores the stripes' swing
    backgrounds = np.array([bg for bg, _ in drawing.PALETTES])
    nearest = np.argmin(((colour[:, None] - backgrounds[None]) ** 2).sum(-1), axis=1)
    wanted = [drawing.prompt_attributes(p, None)[0] for p in prompts]
    return float(np.mean(nearest == np.array(wanted)))


def test_palette_accuracy_measures_the_toy_world():
    rng = np.random.default_rng(0)
    prompts = tiny_world.all_prompts()[:64]
    toy = torch.from_numpy(np.stack([drawing.draw(p, rng) for p in prompts])) / 2 + 0.5
    assert palette_accuracy(toy, prompts) >= 0.95  # 63 of 64: the busiest tiles can move a border's median
    shuffled = random.Random(1).sample(prompts, len(prompts))
    assert palette_accuracy(toy, shuffled) < 0.3  # the wrong prompts: near chance


def test_draw_at_a_strength_is_the_same_picture_with_other_tiles():
    """drawing.draw(strength=s), which --reward-range measures: the same palette, shape and place as the draw from
    the same random numbers, with the background's 4x4 tiles at strength s: one colour at 0, the busiest at 1."""
    seed = 3
    drawn, flat, busy = (drawing.draw("a cat", np.random.default_rng(seed), s) for s in (None, 0.0, 1.0))
    bg, fg = (np.array(c, dtype=np.float32) * 2 - 1 for c in drawing.PALETTES[drawing.prompt_attributes("a cat", None)[0]])
    shape = np.isclose(flat, fg[:, None, None]).all(0)
    assert 20 < shape.sum() < 32 * 32 - 200 and np.isclose(flat[:, ~shape], bg[:, None]).all()  # two colours: bg, fg
    assert np.array_equal(drawn[:, shape], flat[:, shape]) and np.array_equal(busy[:, shape], flat[:, shape])
    spread = [np.abs(image[:, ~shape] - bg[:, None]).mean() for image in (flat, drawn, busy)]
    assert spread[0] == 0 < spread[1] < spread[2]
    tiles = busy.reshape(3, 8, 4, 8, 4)  # (channel, tile row, y in tile, tile column, x in tile)
    whole = ~shape.reshape(8, 4, 8, 4).any(axis=(1, 3))  # tiles the shape does not touch: one colour each
    assert whole.sum() > 20 and np.all(tiles.max(axis=(2, 4))[:, whole] == tiles.min(axis=(2, 4))[:, whole])


def test_world_strengths_are_log_normal_around_the_median():
    s = np.array([drawing.world_strength(np.random.default_rng([7, i])) for i in range(4000)])
    # statistical, not rounding: the median's log has standard error 1.25·0.6/√4000 = 0.012, so rel 0.05 is 4.1 of
    # them; the log-std's is 0.6/√8000 = 0.0067, so rel 0.05 (0.03) is 4.5: false failure rate ≤ 5e-5
    assert np.median(s) == pytest.approx(drawing.STRENGTH_MEDIAN, rel=0.05)
    assert np.log(s).std() == pytest.approx(drawing.STRENGTH_SPREAD, rel=0.05)


def test_reward_range_sizes_images_as_the_reward_sees_them(random_models):
    """--reward-range's sizes (tiny_world.jpeg_sizes): the images as drawn, their VAE reconstruction (the posterior's
    mean, scaled) and that reconstruction with the last step's noise added in the scaled latent space, each decoded
    as the sampler decodes x_0. Against the VAE called by hand, numpy and PIL."""
    vae = random_models.vae
    x = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    sigma = 0.3
    drawn, decoded, noisy = tiny_world.jpeg_sizes(random_models, x, sigma, torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        z_noisy = z + sigma * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
        images = [vae.decode(latents / vae.config.scaling_factor).sample for latents in (z, z_noisy)]

    def kilobytes(model_space):
        pixels = np.round(np.clip(model_space.numpy() / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
        return float(np.mean([jpeg_kilobytes_by_hand(a.transpose(1, 2, 0)) for a in pixels]))

    # bound: float32 kB (≤ 3): two sizes rounded (0.5u each) and their mean (u): 2u·3 = 3.6e-7; we allow 1e-6 (one
    # byte more in one image moves the mean by 5e-4)
    assert drawn == pytest.approx(kilobytes(x), abs=1e-6)
    assert decoded == pytest.approx(kilobytes(images[0]), abs=1e-6)
    assert noisy == pytest.approx(kilobytes(images[1]), abs=1e-6)
    assert decoded != noisy  # the noise is there


def test_reward_range_of_the_shipped_model_has_room_both_ways(capsys):
    """The VAE keeps both rewards' range: flat backgrounds are smaller and the busiest tiles larger than the world's
    own pictures, as drawn and as the reward sees them (VAE + the last step's noise)."""
    tiny_world.reward_range(n=16)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    sizes = [[float(v) for v in line.split()[-5::2]] for line in rows]  # as drawn | reconstructed | with the noise
    world, flattest, busiest = sizes
    assert all(f < w < b for f, w, b in zip(flattest, world, busiest))


def test_the_rebuild_command_is_exact(tmp_path):
    """tiny_world.build from one seed twice (two steps a stage): the same bytes in every file."""
    for name in ("a", "b"):
        tiny_world.build(seed=0, out=tmp_path / name, vae_steps=2, unet_steps=2)
    a = file_digests(tmp_path / "a")
    assert len(a) == 10 and file_digests(tmp_path / "b") == a


def test_tiny_model_is_pretrained_and_prompt_conditional():
    """The shipped model draws the toy world: the prompt's palette, and JPEG sizes that vary (RL's signal)."""
    models = ddpo.load_models("tiny", "cpu")
    prompts = random.Random(0).sample(tiny_world.all_prompts(), 32)
    _, images = ddpo.sample(models, prompts, ddpo.parse_args([]), ddpo.noise_generators(0, range(32)), 32)
    assert palette_accuracy(images, prompts) >= 0.9  # measured: 1.0 at w = 1, 3 and 5 on 48 prompts
    sizes = rewards.jpeg_kilobytes(images)
    assert sizes.std() / sizes.mean() > 0.03


def pipeline_images(model_dir, prompts, args, generators, resolution=None):
    """StableDiffusionPipeline's own sampling of prompts on model_dir at args' T, w and η, from the x_T and the
    per-step noise of generators (one per prompt, as ddpo.rollout draws them: x_T first, then one draw a step), at
    its own image size or height = width = resolution."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    unet, side = pipe.unet.config, (resolution or pipe.vae.config.sample_size) // pipe.vae_scale_factor
    x_T = torch.stack([torch.randn((unet.in_channels, side, side), generator=g) for g in generators])
    return pipe(prompts, num_inference_steps=args.num_steps, guidance_scale=args.guidance_scale, eta=args.eta,
                latents=x_T, generator=generators, output_type="pt", height=resolution, width=resolution).images


@pytest.mark.parametrize("model", ["tiny", "random"])
def test_sampling_equals_stable_diffusion_pipeline_on_the_same_noise(model, random_model_dir):
    """The latent path end to end against diffusers' own StableDiffusionPipeline on the same model, prompts and
    noise: the prompt encoding and the empty prompt's, the guidance pair, the DDIM step at η = 1 and the VAE decode
    of x_0 / scaling_factor. On the shipped model also: it loads in diffusers unchanged and draws the toy world."""
    path = ddpo.TINY_MODELS["tiny"] if model == "tiny" else random_model_dir
    args = ddpo.parse_args(["--num-steps", "6", "--guidance-scale", "3"])
    prompts = ["a cat", "a dog riding a bike", "tench", "goldfish"]
    _, images = ddpo.sample(ddpo.load_models(str(path), "cpu"), prompts, args, ddpo.noise_generators(0, range(4)), 4)
    expected = pipeline_images(path, prompts, args, ddpo.noise_generators(0, range(4)))
    assert images.shape == (4, 3, 32, 32)
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)
    if model == "tiny":
        assert palette_accuracy(expected, prompts) == 1.0


def test_resolution_samples_other_image_sizes_as_stable_diffusion_pipelines_height_and_width(random_model_dir):
    """--resolution 48 on a 32x32 model: 12x12 latents, and the images StableDiffusionPipeline draws at height =
    width = 48 from the same noise (a UNet takes any latent size)."""
    args = ddpo.parse_args(["--num-steps", "3", "--guidance-scale", "3", "--resolution", "48"])
    prompts = ["a cat", "tench"]
    models = ddpo.load_models(str(random_model_dir), "cpu")
    assert ddpo.resolution_problem(models, 48) is None and ddpo.latent_shape(models, 48) == (4, 12, 12)
    _, images = ddpo.sample(models, prompts, args, ddpo.noise_generators(0, range(2)), 2)
    expected = pipeline_images(random_model_dir, prompts, args, ddpo.noise_generators(0, range(2)), 48)
    assert images.shape == (2, 3, 48, 48)
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)


def test_a_resolution_the_vae_cannot_give_is_one_line(main_error, tmp_path):
    line = main_error("--out-dir", str(tmp_path / "runs"), *SHORT_RUN, "--resolution", "30")
    assert line == ("error: cannot use model tiny: its VAE's downsampling 4 needs a --resolution that is a multiple "
                    "of 4, not 30")
    assert not (tmp_path / "runs").exists()
    assert main_error(*SHORT_RUN, "--out-dir", str(tmp_path / "runs"), "--resolution", "-32") == \
        "error: --resolution -32 is out of range (must be ≥ 0) (see --help)"


def replaced_component(folder, name, **config):
    """folder's component `name` replaced by a random one whose config differs in `config` (saved with save_pretrained)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    kind = {"vae": AutoencoderKL, "unet": UNet2DConditionModel}.get(name)
    if kind:
        module = kind.from_config({**kind.load_config(folder / name), **config})
    else:
        module = CLIPTextModel(CLIPTextConfig(**{**CLIPTextConfig.from_pretrained(folder / name).to_dict(), **config}))
    module.save_pretrained(folder / name)



@pytest.mark.parametrize("name, config, message", [
    ("vae", {"latent_channels": 8}, "its VAE has 8 latent channels and its UNet takes 4 input channels"),
    ("unet", {"sample_size": 16}, "its UNet's sample size 16 is not its VAE's image size 32 divided by the VAE's "
                                  "downsampling 4 (8)"),
    ("text_encoder", {"hidden_size": 32}, "its text encoder's hidden size 32 is not its UNet's cross-attention size 64"),
    ("text_encoder", {"vocab_size": 100}, "its tokenizer has 510 tokens and its text encoder only 100"),
])
def test_components_that_do_not_fit_together_are_one_line_before_anything_is_written(
        tmp_path, main_error, random_model_dir, name, config, message):
    folder = tmp_path / "model"
    shutil.copytree(random_model_dir, folder)
    replaced_component(folder, name, **config)
    line = main_error(*SHORT_RUN, "--model", str(folder), "--out-dir", str(tmp_path / "runs"))
    assert line == f"error: model {folder} does not fit together: {message}"
    assert not (tmp_path / "runs").exists()


def test_a_pipeline_without_a_vae_is_one_line_naming_what_is_missing(tmp_path, main_error, random_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(random_model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "vae"}))
    line = main_error(*SHORT_RUN, "--model", str(folder), "--out-dir", str(tmp_path / "runs"))
    assert line == (f"error: model {folder} has no vae: it needs a StableDiffusionPipeline's unet, vae, "
                    f"text_encoder, tokenizer, scheduler")
    assert not (tmp_path / "runs").exists()


def run_cli(*argv):
    return subprocess.run([sys.executable, str(HERE / "ddpo.py"), *argv], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("algo, extra", [
    ("sf", ["--advantage", "batch"]),
    ("is", ["--guidance-scale", "3", "--eta", "0.8", "--max-grad-norm", "0.5", "--adv-clip", "2"]),
    ("rwr", ["--rwr-beta", "2"]),
    ("rwr-sparse", ["--rwr-threshold", "-5", "--buffer-size", "4", "--min-count", "2"]),
    ("sf", ["--advantage", "value", "--kl-coef", "0.5", "--value-steps", "2", "--value-lr", "1e-2"]),  # DPOK
])
def test_cli_one_epoch_each_algorithm(tmp_path, algo, extra):
    ddpo.main(["--algo", algo, "--epochs", "1", "--num-steps", "3", "--samples-per-epoch", "4", "--samples-per-prompt", "4", "--sample-batch-size", "2",
               "--num-minibatches", "2", "--train-batch-size", "2", "--prompts", "simple_animals", "--device", "cpu",
               "--out-dir", str(tmp_path), "--run-name", "run", "--seed", "1", *extra])
    run = tmp_path / "run"
    before, row = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(before) == {"epoch", "eval/reward_mean"} and before["epoch"] == 0  # the pretrained model
    assert row["epoch"] == 1 and math.isfinite(row["losses/loss"])
    assert row["reward/min"] <= row["reward/mean"] <= row["reward/max"] < 0  # jpeg: r = −kB
    assert (algo == "is") == ("losses/clipfrac" in row)
    assert ("--kl-coef" in extra) == ("losses/kl" in row) and ("value" in extra) == ("value/loss" in row)
    assert Image.open(run / "grid_001.png").size == (512, 2 * 142) and (run / "reward_curve.png").is_file()
    tuned, base = ddpo.load_models(str(run), "cpu"), ddpo.load_models("tiny", "cpu")  # a run folder is a model
    changed = [not torch.equal(p, q) for p, q in zip(tuned.denoiser.parameters(), base.denoiser.parameters())]
    assert any(changed)


def test_cli_same_seed_same_results_and_lr_zero_changes_nothing(tmp_path):
    common = ["--epochs", "1", "--num-steps", "2", "--samples-per-epoch", "4", "--samples-per-prompt", "4", "--sample-batch-size", "4",
              "--num-minibatches", "1", "--out-dir", str(tmp_path), "--seed", "3"]
    for name in ("a", "b"):
        ddpo.main([*common, "--run-name", name])
    a, b = ((tmp_path / n / "metrics.jsonl").read_text() for n in ("a", "b"))
    strip = lambda text: [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")} for l in text.splitlines()]
    assert strip(a) == strip(b)
    ddpo.main([*common, "--run-name", "frozen", "--lr", "0"])
    frozen, base = ddpo.load_models(str(tmp_path / "frozen"), "cpu"), ddpo.load_models("tiny", "cpu")
    assert all(torch.equal(p, q) for p, q in zip(frozen.denoiser.parameters(), base.denoiser.parameters()))


@pytest.mark.parametrize("argv, message", [
    (["--reward", "beauty"], "unknown reward 'beauty': one of jpeg, compressibility"),
    (["--algo", "ppo"], "argument --algo: invalid choice: 'ppo'"),
    (["--prompts", "no_such_file.txt"], "prompt file or set 'no_such_file.txt' does not exist"),
    (["--eta", "0"], "--eta 0.0 is out of range"),
    (["--clip-range", "-1"], "--clip-range -1.0 is out of range"),
    (["--samples-per-epoch", "10", "--samples-per-prompt", "10", "--sample-batch-size", "4"], "--samples-per-epoch 10 is not a multiple of --sample-batch-size 4"),
    (["--sample-batch-size", "0"], "--sample-batch-size 0 is out of range"),
    (["--timestep-fraction", "1.5"], "--timestep-fraction 1.5 is out of range"),
    (["--model", "/no/such/model"], "cannot load model '/no/such/model'"),
    (["--device", "cuda:7"], "--device cuda:7: this machine has " + ("no CUDA GPU" if not torch.cuda.is_available()
                                                                     else f"{torch.cuda.device_count()} CUDA GPU(s)")),
    (["--device", "gpu"], "--device 'gpu' is not a torch device"),
    (["--device", "xla"], "--device xla: only cpu, cuda, cuda:N and mps are supported"),
    (["--min-count", "100", "--buffer-size", "16"], "--min-count 100 is more than --buffer-size 16: a prompt's buffer "
                                                    "could never hold enough rewards for its own statistics"),
])
def test_bad_input_is_one_clear_line_and_nothing_is_written(tmp_path, main_error, argv, message):
    assert message in main_error(*SHORT_RUN, *argv, "--out-dir", str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("task, reward", [("compressibility", "jpeg"), ("incompressibility", "incompressibility"),
                                          ("aesthetic", "aesthetic"), ("alignment", "alignment")])
def test_the_papers_config_files_give_the_papers_settings(task, reward):
    """configs/sd14_*.txt through argparse's @file, comments and all: the paper's §5 settings (SD v1.4, T = 50,
    η = 1, w = 5, 256 samples, 4 DDPO_IS steps, ε = 1e-4, LoRA 4 at lr 3e-4, fp16); a later flag overrides."""
    args = ddpo.parse_args([f"@{HERE / 'configs' / f'sd14_{task}.txt'}", "--device", "cpu"])
    assert (args.model, args.reward, args.algo) == ("CompVis/stable-diffusion-v1-4", reward, "is")
    assert (args.num_steps, args.eta, args.guidance_scale, args.samples_per_epoch, args.samples_per_prompt) == (50, 1.0, 5.0, 256, 1)
    assert (args.num_minibatches, args.clip_range, args.lr, args.lora_rank, args.mixed_precision) == (4, 1e-4, 3e-4, 4, "fp16")
    assert ddpo.parse_args([f"@{HERE / 'configs' / f'sd14_{task}.txt'}", "--device", "cpu", "--algo", "sf"]).algo == "sf"


def test_help_after_a_config_file_shows_the_files_values(capsys, monkeypatch):
    """python ddpo.py @configs/sd14_compressibility.txt --help: the paper's values as the defaults in effect."""
    monkeypatch.setenv("COLUMNS", "250")  # argparse wraps at the terminal's width, a hub id included
    with pytest.raises(SystemExit) as stop:
        ddpo.parse_args([f"@{HERE / 'configs' / 'sd14_compressibility.txt'}", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert stop.value.code == 0
    for shown in ("(default: CompVis/stable-diffusion-v1-4)", "(paper: 50) (default: 50)", "(default: 256)",
                  "(default: 0.0001)", "(default: fp16)", "(default: 4)"):
        assert shown in text, shown
    with pytest.raises(SystemExit):
        ddpo.parse_args(["--help"])
    assert "(paper: 50) (default: 20)" in " ".join(capsys.readouterr().out.split())


def test_a_sample_batch_larger_than_the_round_is_one_batch_and_a_smaller_one_must_divide_it():
    args = ddpo.parse_args(["--samples-per-epoch", "16", "--samples-per-prompt", "4"])  # the default batch: 64
    assert "16 samples per epoch (4 prompts x 4) = 1 batch(es) of 16," in command_line.describe(
        args, 398, ddpo.round_plan(args, args.num_steps))
    args = ddpo.parse_args(["--samples-per-epoch", "48", "--samples-per-prompt", "4", "--sample-batch-size", "16"])
    assert "= 3 batch(es) of 16," in command_line.describe(args, 398, ddpo.round_plan(args, args.num_steps))
    with pytest.raises(SystemExit, match="--samples-per-epoch 24 is not a multiple of --sample-batch-size 16"):
        ddpo.parse_args(["--samples-per-epoch", "24", "--samples-per-prompt", "4", "--sample-batch-size", "16"])


def test_evaluate_and_export_take_bad_input_as_one_line(tmp_path, main_error):
    """The two entry files beside ddpo.py: a folder that is no run, a bad device, a missing argument."""
    assert main_error(str(tmp_path), entry=evaluate.main) == f"error: {tmp_path} is not a run folder (no args.json)"
    assert main_error(str(tmp_path), "--device", "gpu0", entry=evaluate.main).startswith(
        "error: --device 'gpu0' is not a torch device")
    assert main_error(str(tmp_path), "--seed", "-1", entry=evaluate.main) == \
        "error: --seed -1 is out of range (must be ≥ 0) (see --help)"
    assert main_error(str(tmp_path), str(tmp_path / "out"), entry=export.main) == \
        f"error: {tmp_path} is not a run folder (no args.json)"
    assert main_error(str(tmp_path), entry=export.main) == "error: the following arguments are required: out (see --help)"
    assert not (tmp_path / "out").exists()
    for entry in ("evaluate.py", "export.py"):
        result = subprocess.run([sys.executable, str(HERE / entry), "--help"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "usage: " + entry in result.stdout and "run" in result.stdout


def test_bad_input_from_the_shell_is_one_line_on_stderr(tmp_path):
    """The same through a real process, once: exit status, stderr and nothing written."""
    result = run_cli("--eta", "2", *SHORT_RUN, "--out-dir", str(tmp_path / "runs"))
    assert result.returncode == 1 and result.stderr == ("error: --eta 2.0 is out of range (must be 0 < η ≤ 1) "
                                                        "(see --help)\n")
    assert not (tmp_path / "runs").exists()


def test_a_hub_id_with_the_hub_unreachable_is_one_line_saying_so(tmp_path):
    """A closed local port stands in for the hub: the library's retry chatter is silenced. Its five retries wait
    1 + 2 + 4 + 8 + 8 s between them; here that wait is skipped (time.sleep as huggingface_hub's HTTP code sees it),
    the retries themselves are not."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}  # 9: discard, closed
    no_backoff = ("import sys, time, types, runpy, huggingface_hub.utils._http as http; "
                  "http.time = types.SimpleNamespace(**{**vars(time), 'sleep': lambda s: None}); "
                  "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", no_backoff, str(HERE / "ddpo.py"), "--model", "some-org/some-model",
                             *SHORT_RUN, "--out-dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=300, env=env)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot load model 'some-org/some-model': no such local folder, and the hub is "
                               "unreachable (") and lines[0].endswith("--model tiny or a local folder works offline")
    assert not (tmp_path / "runs").exists()


def test_a_folder_that_is_not_a_pipeline_is_one_line_naming_it(tmp_path, main_error):
    line = main_error("--model", str(tmp_path), *SHORT_RUN, "--out-dir", str(tmp_path / "runs"))
    assert line.startswith(f"error: cannot load model folder {tmp_path} (") and line.endswith("needs a diffusers pipeline layout")


def test_empty_prompt_file_is_an_error(tmp_path, main_error):
    (tmp_path / "empty.txt").write_text("\n  \n")
    line = main_error("--prompts", str(tmp_path / "empty.txt"), *SHORT_RUN, "--out-dir", str(tmp_path / "runs"))
    assert line == f"error: prompt file {tmp_path / 'empty.txt'} has no prompts"
    assert not (tmp_path / "runs").exists()


FLAGS = """reward algo model lora-rank mixed-precision prompts seed epochs run-name out-dir save-every resume
device collective-timeout samples-per-epoch samples-per-prompt sample-batch-size num-steps eta noise-level guidance-scale resolution advantage buffer-size min-count
adv-clip lr max-grad-norm num-minibatches inner-epochs train-batch-size timesteps-per-pass timestep-fraction clip-range rwr-weights
rwr-beta rwr-threshold kl-coef value-lr value-steps clip-model aesthetic-head vlm bertscore-model pickscore-model
pickscore-processor imagereward-model imagereward-tokenizer""".split()


def test_help_lists_the_documented_flags_with_their_defaults_and_symbols():
    """The interface written out by hand: a flag added, dropped or renamed without the README changes this list."""
    result = run_cli("--help")
    assert result.returncode == 0
    listed = re.findall(r"^  (?:-h, )?(--[a-z-]+)", result.stdout, flags=re.M)
    assert sorted(listed) == sorted(["--help"] + ["--" + f for f in FLAGS])
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for snippet in ("ε, DDPO_IS ratio clip", "(default: 0.001)", "η, DDIM noise scale, 0 < η ≤ 1", "(default: 20)",
                    "w, classifier-free guidance", "{sf,is,rwr,rwr-sparse}", "the paper's w = exp(β·r)/Z"):
        assert snippet in text, snippet


@pytest.mark.parametrize("argv, message", [
    (["--eta", "1.5"], "--eta 1.5 is out of range (must be 0 < η ≤ 1)"),  # above 1 the DDIM mean is a NaN
    (["--eta", "nan"], "--eta nan is out of range (must be finite)"),
    (["--lr", "inf"], "--lr inf is out of range (must be finite)"),
    (["--lr=-1e-4"], "--lr -0.0001 is out of range (must be ≥ 0)"),
    (["--guidance-scale", "nan"], "--guidance-scale nan is out of range (must be finite)"),
    (["--max-grad-norm", "inf"], "--max-grad-norm inf is out of range (must be finite)"),
    (["--rwr-beta", "-1"], "--rwr-beta -1.0 is out of range (must be ≥ 0)"),
    (["--rwr-threshold=-inf"], "--rwr-threshold -inf is out of range (must be finite)"),
    (["--epochs", "0"], "--epochs 0 is out of range (must be > 0)"),  # a run with no epoch has no checkpoint
    (["--rwr-weights", "logits"], "argument --rwr-weights: invalid choice: 'logits'"),
    (["--kl-coef=-0.1"], "--kl-coef -0.1 is out of range (must be ≥ 0)"),
    (["--value-lr", "nan"], "--value-lr nan is out of range (must be finite)"),
    (["--value-steps", "0"], "--value-steps 0 is out of range (must be > 0)"),
    (["--timesteps-per-pass", "0"], "--timesteps-per-pass 0 is out of range (must be > 0)"),
    (["--algo", "rwr", "--advantage", "value"], "--advantage value, --kl-coef and --timesteps-per-pass act on the "
                                                "per-step policy: they need --algo sf or is, not rwr"),
    (["--algo", "rwr-sparse", "--kl-coef", "0.1"], "--advantage value, --kl-coef and --timesteps-per-pass act on the "
                                                   "per-step policy: they need --algo sf or is, not rwr-sparse"),
    (["--algo", "rwr", "--timesteps-per-pass", "2"], "--advantage value, --kl-coef and --timesteps-per-pass act on the "
                                                     "per-step policy: they need --algo sf or is, not rwr"),
])
def test_out_of_range_and_non_finite_flags_are_refused_by_name(argv, message):
    with pytest.raises(SystemExit, match=re.escape(f"error: {message}")):
        ddpo.parse_args(argv)


def write_run_args(folder, **settings):
    """A run folder as far as the command line is concerned: its args.json."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = {**ddpo.dataclasses.asdict(ddpo.Args()), "prompts": "imagenet_animals", "lora_rank": 0, **settings}
    (folder / "args.json").write_text(json.dumps(saved))
    return folder


def test_resume_takes_every_typed_flag_it_may_change_and_refuses_the_others(tmp_path):
    run = write_run_args(tmp_path / "r", epochs=5, save_every=2, device="cuda", lr=3e-4)
    # typed values equal to the flags' defaults count too (150, 5 and cpu are the defaults)
    args = ddpo.parse_args(["--resume", str(run), "--epochs", "150", "--save-every", "5", "--device", "cpu"])
    assert (args.epochs, args.save_every, args.device, args.lr) == (150, 5, "cpu", 3e-4)
    assert ddpo.parse_args(["--resume", str(run), "--device", "cpu"]).epochs == 5
    assert ddpo.parse_args(["--resume", str(run), "--device", "cpu", "--lr", "3e-4"]).lr == 3e-4  # the run's own: no change
    with pytest.raises(SystemExit, match=r"--lr, --seed cannot change \(only --epochs, --save-every, --device can\)"):
        ddpo.parse_args(["--resume", str(run), "--device", "cpu", "--lr", "0.5", "--seed", "3"])
    if not torch.cuda.is_available():  # the run's own device, which this machine lacks: the line says what to type
        with pytest.raises(SystemExit, match=r"--device cuda: this machine has no CUDA GPU .*; the run was made there: "
                                             r"resume it here with --device cpu"):
            ddpo.parse_args(["--resume", str(run)])


def test_a_run_made_with_an_unknown_reward_is_one_line(tmp_path):
    run = write_run_args(tmp_path / "r", reward="my_reward")
    for entry, argv in ((ddpo.parse_args, ["--resume", str(run)]), (ddpo.parse_args, ["--model", str(run)]),
                        (evaluate.main, [str(run)])):
        with pytest.raises(SystemExit, match=r"was made with --reward 'my_reward', which this ddpo.py does not know"):
            entry(argv)


def test_a_run_as_model_keeps_its_lora_rank(tmp_path):
    run = write_run_args(tmp_path / "r", lora_rank=4, mixed_precision="bf16")
    assert ddpo.parse_args(["--model", str(run)]).lora_rank == 4
    with pytest.raises(SystemExit, match=r"is a run trained with LoRA rank 4; --lora-rank 0 cannot change that"):
        ddpo.parse_args(["--model", str(run), "--lora-rank", "0"])


def test_an_unwritable_out_dir_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(ddpo, "load_models", lambda *a, **k: pytest.fail("loaded a model first"))
    with pytest.raises(SystemExit, match=r"error: cannot write the run folder .*a_file/runs/r \(NotADirectoryError: "):
        ddpo.main([*SHORT_RUN, "--out-dir", str(tmp_path / "a_file" / "runs"), "--run-name", "r"])
    assert (tmp_path / "a_file").is_file()


def test_a_model_folder_with_a_damaged_weights_file_names_the_file(tmp_path, random_model_dir):
    shutil.copytree(random_model_dir, tmp_path / "m")
    weights = tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SystemExit, match=f"cannot load model folder {tmp_path / 'm'}: weights file {weights} is damaged"):
        ddpo.load_models(str(tmp_path / "m"), "cpu")


def test_a_model_folder_with_a_damaged_bin_weights_file_names_the_file(tmp_path, random_model_dir):
    """The same for PyTorch .bin weights (save_pretrained(safe_serialization=False)), which older folders hold."""
    from diffusers import UNet2DConditionModel

    shutil.copytree(random_model_dir, tmp_path / "m")
    unet = tmp_path / "m" / "unet"
    UNet2DConditionModel.from_pretrained(unet).save_pretrained(unet, safe_serialization=False)
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    weights = unet / "diffusion_pytorch_model.bin"
    assert ddpo.load_models(str(tmp_path / "m"), "cpu").denoiser is not None  # the whole .bin loads
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SystemExit, match=f"cannot load model folder {tmp_path / 'm'}: weights file {weights} is damaged"):
        ddpo.load_models(str(tmp_path / "m"), "cpu")


def test_a_scheduler_without_a_density_is_refused_before_anything_is_written(tmp_path, random_model_dir):
    shutil.copytree(random_model_dir, tmp_path / "m")
    config = tmp_path / "m" / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "set_alpha_to_one": True}))
    with pytest.raises(SystemExit, match=r"cannot use model .*: its set_alpha_to_one=True makes the last DDIM step "
                                         r"deterministic \(σ_t = 0, no density\)"):
        ddpo.main(["--model", str(tmp_path / "m"), *SHORT_RUN, "--out-dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


def test_non_finite_latents_stop_the_run_with_one_clean_line(tmp_path, main_error):
    """w = 1e30 is finite, but the guided prediction overflows the next UNet call: named, not scored as a black
    image (the smallest JPEG, so compressibility would 'improve'). The line is all that reaches stderr."""
    line = main_error("--guidance-scale", "1e30", "--num-steps", "3", "--epochs", "1", "--out-dir", str(tmp_path),
                      "--run-name", "r")
    assert line == ("error: non-finite latents while sampling, first after policy step 2 of 3 in epoch 0; "
                    "no checkpoint was written yet")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_compare_runs_every_estimator_on_the_same_samples_and_draws_the_figure(tmp_path):
    import compare

    summary = compare.main(["--algos", "sf", "rwr", "--seeds", "0", "--epochs", "1", "--out-dir", str(tmp_path), "--",
                            "--num-steps", "2", "--samples-per-epoch", "4", "--samples-per-prompt", "4", "--sample-batch-size", "4"])
    folder = next(tmp_path.glob("compare__incompressibility__*"))
    assert (folder / "compare.png").is_file() and json.loads((folder / "compare.json").read_text()) == summary
    assert set(summary) == {"DDPO_SF", "RWR"} and summary["DDPO_SF"]["samples_seen"] == [4]
    assert summary["DDPO_SF"]["eval_first"] == summary["RWR"]["eval_first"]  # same seed: the same model and samples
    assert summary["DDPO_SF"]["train_reward_mean"] == summary["RWR"]["train_reward_mean"]  # epoch 1's samples, before any update


# --------------------------------------------------------------------------------------------------------
# Your own reward, by import path or as a callable, and ddpo as a library
# --------------------------------------------------------------------------------------------------------

BRIGHTNESS = '''import torch

def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))

def wrong_shape(images, prompts):
    return torch.zeros(len(images), 2)

def words(images, prompts):
    return ["good"] * len(images)

def none_at_all(images, prompts):
    return None

def extras_not_a_dict(images, prompts):
    return images.mean(dim=(1, 2, 3)), ["bright"] * len(images)

def extras_one_short(images, prompts):
    return images.mean(dim=(1, 2, 3)), {"why": ["bright"] * (len(images) - 1)}

def extras_a_number(images, prompts):
    return images.mean(dim=(1, 2, 3)), {"mean": images.mean()}

def with_extras(images, prompts):
    return images.mean(dim=(1, 2, 3)), {"red": images[:, 0].mean(dim=(1, 2)), "words": ("bright",) * len(images),
                                        "green": list(images[:, 1].mean(dim=(1, 2)))}  # a list of 0-d tensors

_scale = torch.ones(1, requires_grad=True)

def with_grad(images, prompts):  # a reward computed by a module with trainable parameters, not detached
    return images.mean(dim=(1, 2, 3)) * _scale

class Darkness:
    def __init__(self, device):
        self.device = device

    def __call__(self, images, prompts):
        return -images.mean(dim=(1, 2, 3))
'''

TINY_RUN = ["--epochs", "1", "--num-steps", "2", "--samples-per-epoch", "4", "--samples-per-prompt", "4", "--sample-batch-size", "4"]


def test_a_reward_by_import_path_trains_resumes_and_evaluates(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(BRIGHTNESS)
    monkeypatch.chdir(tmp_path)  # a module in the current folder, as a user's would be
    ddpo.main(["--reward", "my_rewards:brightness", *TINY_RUN, "--out-dir", str(tmp_path), "--run-name", "b"])
    ddpo.main(["--resume", str(tmp_path / "b"), "--epochs", "2"])
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and 0 < rows[-1]["reward/mean"] < 1  # mean pixel value
    summary = evaluate.main([str(tmp_path / "b")])
    assert 0 < summary["train"]["base_reward_mean"] < 1
    ddpo.main(["--reward", f"{tmp_path / 'my_rewards.py'}:Darkness", *TINY_RUN, "--out-dir", str(tmp_path), "--run-name", "d"])
    assert -1 < json.loads((tmp_path / "d" / "metrics.jsonl").read_text().splitlines()[-1])["reward/mean"] < 0


@pytest.mark.parametrize("spec, message", [
    ("no_such_module:f", "error: reward 'no_such_module:f': cannot import it (ModuleNotFoundError: No module named 'no_such_module')"),
    ("my_rewards:nothing", "error: reward 'my_rewards:nothing': cannot import it (AttributeError: module 'my_rewards' has no attribute 'nothing')"),
    ("missing.py:f", "error: reward 'missing.py:f': cannot import it (FileNotFoundError: no file missing.py)"),
    ("beauty", "error: unknown reward 'beauty': one of jpeg, compressibility, incompressibility, aesthetic"),
])
def test_a_reward_that_cannot_be_imported_is_one_line(tmp_path, monkeypatch, main_error, spec, message):
    (tmp_path / "my_rewards.py").write_text(BRIGHTNESS)
    monkeypatch.chdir(tmp_path)
    assert main_error("--reward", spec, *TINY_RUN, "--out-dir", str(tmp_path / "runs")).startswith(message)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name, message", [
    ("wrong_shape", "returned shape (8, 2), expected (8,)"),
    ("words", "returned list that is not numbers (ValueError: too many dimensions 'str'): it must return 8 numbers"),
    ("none_at_all", "returned NoneType that is not numbers (TypeError: must be real number, not NoneType): it must "
                    "return 8 numbers"),
    ("extras_not_a_dict", "returned a tuple that is not (rewards, a dict of per-sample extras)"),
    ("extras_one_short", "returned extras 'why' of 7 values for 8 samples"),
    ("extras_a_number", "returned extras 'mean' of a Tensor for 8 samples"),
])
def test_a_reward_whose_output_is_not_numbers_of_its_shape_is_one_line(tmp_path, monkeypatch, main_error, name, message):
    (tmp_path / "my_rewards.py").write_text(BRIGHTNESS)
    monkeypatch.chdir(tmp_path)
    line = main_error("--reward", f"my_rewards:{name}", *TINY_RUN, "--out-dir", str(tmp_path / "runs"))
    assert line == f"error: reward 'my_rewards:{name}' {message} in epoch 0; no checkpoint was written yet"


def test_a_rewards_extras_go_into_the_grids_json_one_value_a_picture(tmp_path, monkeypatch):
    """Extras as a tensor, a tuple and a list of 0-d tensors, one value a sample: each eval grid's .json holds each
    picture's, as plain numbers and strings, beside its reward (the reward and red are computed from one picture each, so they differ)."""
    (tmp_path / "my_rewards.py").write_text(BRIGHTNESS)
    monkeypatch.chdir(tmp_path)
    ddpo.main(["--reward", "my_rewards:with_extras", *TINY_RUN, "--out-dir", str(tmp_path), "--run-name", "x"])
    cells = json.loads((tmp_path / "x" / "grid_001.json").read_text())
    assert len(cells) == 8 and all(c["words"] == "bright" and isinstance(c["red"], float) for c in cells)
    assert all(isinstance(c["green"], float) and 0 <= c["green"] <= 1 for c in cells)
    assert len({c["red"] for c in cells}) == 8 and all(0 <= c["red"] <= 1 for c in cells)


def test_a_reward_that_requires_grad_is_detached_and_scored_as_its_values(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(BRIGHTNESS)
    monkeypatch.chdir(tmp_path)
    for name in ("with_grad", "brightness"):
        ddpo.main(["--reward", f"my_rewards:{name}", *TINY_RUN, "--out-dir", str(tmp_path), "--run-name", name])
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("with_grad", "brightness")}
    strip = lambda run: [{k: v for k, v in row.items() if not k.startswith("time/")} for row in run]  # noqa: E731
    assert strip(rows["with_grad"]) == strip(rows["brightness"])  # the same values, the same update


def test_train_takes_args_made_in_python_and_a_reward_callable(tmp_path):
    def redness(images, prompts):
        return images[:, 0].mean(dim=(1, 2))

    history = ddpo.train(ddpo.Args(epochs=1, num_steps=2, samples_per_epoch=4, samples_per_prompt=4, sample_batch_size=4, out_dir=str(tmp_path),
                                   run_name="lib"), reward_fn=redness)
    assert [h["epoch"] for h in history] == [0, 1] and 0 < history[-1]["reward/mean"] < 1
    saved = json.loads((tmp_path / "lib" / "args.json").read_text())
    assert saved["reward"] == f"{__name__}:test_train_takes_args_made_in_python_and_a_reward_callable.<locals>.redness"
    assert saved["prompts"] == "simple_animals" and saved["lora_rank"] == 0  # completed as parse_args would
    with pytest.raises(SystemExit, match="error: --eta 2.0 is out of range"):
        ddpo.train(ddpo.Args(eta=2.0, out_dir=str(tmp_path)), reward_fn=redness)
    with pytest.raises(SystemExit, match="error: --advantage 'Value' is not one of per-prompt, batch, value"):
        ddpo.train(ddpo.Args(advantage="Value", out_dir=str(tmp_path)), reward_fn=redness)
