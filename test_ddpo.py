"""Tests: every formula against an independent reference, with numbers; then the CLI end to end.

    python -m pytest -q
"""
import io
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpo
import rewards
import tiny_world

HERE = Path(__file__).resolve().parent


sd_scheduler = tiny_world.sd_v1_scheduler  # Stable Diffusion v1's DDIM configuration


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    """A randomly initialised tiny model saved with save_pretrained, to load back as a user's folder is loaded."""
    torch.manual_seed(0)
    models = tiny_world.build_models(tiny_world.build_tokenizer(tiny_world.all_prompts()))
    path = tmp_path_factory.mktemp("random_tiny")
    tiny_world.save_models(models, path / "model")
    return path / "model"


@pytest.fixture(scope="session")
def random_models(random_model_dir):
    return ddpo.load_models(str(random_model_dir), "cpu")


def small_args(*extra):
    return ddpo.parse_args(["--num-steps", "4", *extra])


# --------------------------------------------------------------------------------------------------------
# §3.1: the DDIM step and its log-probability
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_step_equals_diffusers(prediction_type, eta):
    scheduler = sd_scheduler(prediction_type=prediction_type)
    scheduler.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    steps = list(scheduler.timesteps[[0, 7, 13, -1]])  # includes the last step, where ᾱ_prev = ᾱ_0 < 1
    assert steps[-1].item() == 1
    for t in steps:
        x_t, model_output, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        expected = scheduler.step(model_output, t, x_t, eta=eta, variance_noise=z).prev_sample
        mean, sigma_t = ddpo.ddim_step(scheduler, model_output, x_t, t.expand(2), eta)
        torch.testing.assert_close(mean + sigma_t * z, expected, rtol=1e-5, atol=1e-5)
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
        torch.testing.assert_close(mean[i], m_i[0])
        assert sigma_t[i].item() == s_i.item()


def test_sigma_matches_closed_form():
    """σ_t from DDIM eq. (16) with numbers: at t=1 (last step of 20), ᾱ_prev is ᾱ_0 (set_alpha_to_one=False)."""
    scheduler = sd_scheduler()
    scheduler.set_timesteps(20)
    a = scheduler.alphas_cumprod.double()
    _, sigma = ddpo.ddim_step(scheduler, torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([501]), 1.0)
    expected = math.sqrt((1 - a[451]) / (1 - a[501]) * (1 - a[501] / a[451]))
    assert sigma.item() == pytest.approx(expected, rel=1e-5)
    _, sigma_last = ddpo.ddim_step(scheduler, torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([1]), 1.0)
    expected_last = math.sqrt((1 - a[0]) / (1 - a[1]) * (1 - a[1] / a[0]))
    assert sigma_last.item() == pytest.approx(expected_last, rel=1e-5) and expected_last > 0.01


def test_log_prob_equals_torch_normal():
    g = torch.Generator().manual_seed(2)
    x, mean = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sigma = torch.tensor([0.05, 0.3, 1.7]).view(3, 1, 1, 1)
    expected = torch.distributions.Normal(mean, sigma).log_prob(x).mean(dim=(1, 2, 3))
    torch.testing.assert_close(ddpo.gaussian_log_prob(x, mean, sigma), expected)


def test_log_prob_gradient_flows_only_through_the_mean():
    x = torch.randn(2, 3, requires_grad=True)
    mean = torch.zeros(2, 3, requires_grad=True)
    ddpo.gaussian_log_prob(x, mean, torch.ones(2, 1)).sum().backward()
    assert x.grad is None
    torch.testing.assert_close(mean.grad, x.detach() / 3)  # d/dμ of mean_d -(x-μ)²/2 = (x-μ)/D


# --------------------------------------------------------------------------------------------------------
# §4.3: the MDP rollout and exact re-scoring
# --------------------------------------------------------------------------------------------------------

def test_rollout_shapes_and_log_probs_match_diffusers(random_models):
    args = small_args()
    prompts = ["tench", "cat", "a dog riding a bike"]
    traj = ddpo.rollout(random_models, prompts, args, torch.Generator().manual_seed(0))
    assert traj.states.shape == (3, 5, 3, 32, 32) and traj.log_probs.shape == (3, 4)
    assert traj.timesteps.tolist() == [751, 501, 251, 1]
    # each action equals diffusers' DDIM step from the same state with the noise that was drawn
    scheduler = random_models.scheduler
    uncond = ddpo.encode_prompts(random_models, [""]).expand(3, -1, -1)
    with torch.no_grad():
        for j, t in enumerate(traj.timesteps):
            x_t, x_prev = traj.states[:, j], traj.states[:, j + 1]
            eps_u, eps_c = random_models.unet(torch.cat([x_t, x_t]), t, torch.cat([uncond, traj.cond])).sample.chunk(2)
            eps = eps_u + args.guidance_scale * (eps_c - eps_u)
            mean, sigma_t = ddpo.ddim_step(scheduler, eps, x_t, t.expand(3), 1.0)
            z = (x_prev - mean) / sigma_t
            torch.testing.assert_close(scheduler.step(eps, t, x_t, eta=1.0, variance_noise=z).prev_sample, x_prev,
                                       rtol=1e-4, atol=1e-5)
            expected = torch.distributions.Normal(mean, sigma_t).log_prob(x_prev).mean(dim=(1, 2, 3))
            torch.testing.assert_close(traj.log_probs[:, j], expected)


def test_rescoring_unchanged_weights_gives_ratio_one(random_models):
    args = small_args()
    traj = ddpo.rollout(random_models, ["tench", "goldfish", "cat", "dog"], args, torch.Generator().manual_seed(3))
    uncond = ddpo.encode_prompts(random_models, [""]).expand(4, -1, -1)
    advantages = torch.tensor([1.0, -1.0, 0.5, -2.0])
    with torch.no_grad():
        for j in range(4):
            for rows in (torch.arange(4), torch.tensor([2]), torch.tensor([3, 0])):  # any minibatch layout
                steps = torch.full((len(rows),), j)
                log_prob = ddpo.rescore(random_models, traj, rows, steps, uncond, args)
                ratio = torch.exp(log_prob - traj.log_probs[rows, j])
                assert (ratio - 1).abs().max().item() < 1e-6
                _, approx_kl, clipfrac = ddpo.ddpo_is_loss(log_prob, traj.log_probs[rows, j], advantages[rows], 1e-4)
                assert approx_kl.item() < 1e-12 and clipfrac.item() == 0


def test_guidance_scale_combines_the_two_predictions(random_models):
    g = torch.Generator().manual_seed(4)
    x_t = torch.randn(2, 3, 32, 32, generator=g)
    cond = ddpo.encode_prompts(random_models, ["cat", "dog"])
    uncond = ddpo.encode_prompts(random_models, [""]).expand(2, -1, -1)
    t = torch.tensor([501, 501])
    with torch.no_grad():
        eps_u = random_models.unet(x_t, t, uncond).sample
        eps_c = random_models.unet(x_t, t, cond).sample
        random_models.scheduler.set_timesteps(20)
        mean, _ = ddpo.policy(random_models, x_t, t, cond, uncond, 3.0, 1.0)
        expected, _ = ddpo.ddim_step(random_models.scheduler, eps_u + 3.0 * (eps_c - eps_u), x_t, t, 1.0)
    torch.testing.assert_close(mean, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# §4.4: advantages
# --------------------------------------------------------------------------------------------------------

def test_stat_tracker_falls_back_to_batch_stats_then_uses_the_prompts_own():
    tracker = ddpo.PerPromptStatTracker(buffer_size=4, min_count=3)
    # round 1: each prompt has < 3 rewards → batch statistics (mean 2.5, std √1.25)
    adv = tracker(["a", "a", "b", "b"], [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(adv.numpy(), (np.array([1, 2, 3, 4]) - 2.5) / (math.sqrt(1.25) + 1e-6), rtol=1e-6)
    # round 2: "a" now has 1, 2, 5 (3 ≥ min_count) → its own mean 8/3 and std; "b" has 3, 4, 10 → its own too
    adv = tracker(["a", "b"], [5.0, 10.0])
    a, b = np.array([1.0, 2.0, 5.0]), np.array([3.0, 4.0, 10.0])
    np.testing.assert_allclose(adv.numpy(), [(5 - a.mean()) / (a.std() + 1e-6), (10 - b.mean()) / (b.std() + 1e-6)],
                               rtol=1e-6)
    # the buffer keeps the most recent buffer_size rewards
    tracker(["a", "a"], [7.0, 8.0])
    assert tracker.buffers["a"] == [2.0, 5.0, 7.0, 8.0]


def test_advantages_batch_mode_and_clipping():
    r = torch.tensor([0.0, 0.0, 0.0, 10.0])
    batch = ddpo.compute_advantages(None, ["a"] * 4, r, small_args("--advantage", "batch", "--adv-clip", "1.5"))
    expected = ((r - 2.5) / (r.std(unbiased=False) + 1e-6)).clamp(-1.5, 1.5)  # 10 → +1.73 is clipped to 1.5
    torch.testing.assert_close(batch, expected)
    assert batch.max().item() == 1.5


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
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert approx_kl.item() == pytest.approx(0.5 * (new - old).item() ** 2, rel=1e-5)  # the fp32 logratio
    assert clipfrac.item() == clipped


def test_clipped_loss_has_no_gradient_once_clipped_in_the_advantage_direction():
    log_prob = torch.tensor([0.01, -0.01], requires_grad=True)  # ratios e^0.01 (clipped), e^-0.01 (unclipped)
    loss, _, _ = ddpo.ddpo_is_loss(log_prob, torch.zeros(2), torch.tensor([1.0, 1.0]), 1e-4)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, -math.exp(-0.01) / 2]))


def test_rwr_weights():
    adv = torch.tensor([-1.0, 0.5, 2.0, 0.0])
    w = ddpo.rwr_exponential_weights(adv, beta=0.7)
    expected = torch.exp(0.7 * adv) / torch.exp(0.7 * adv).mean()
    torch.testing.assert_close(w, expected)
    assert w.mean().item() == pytest.approx(1.0) and torch.equal(w.argsort(), adv.argsort())
    assert torch.allclose(ddpo.rwr_exponential_weights(adv, beta=0.0), torch.ones(4))  # β = 0: plain DDPM loss
    r = torch.tensor([0.3, 0.9, 0.5, 0.9, 0.1])
    sparse = ddpo.rwr_sparse_weights(r, threshold=0.5)
    torch.testing.assert_close(sparse, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]) * 5 / 3)  # exactly r ≥ C, mean 1
    assert torch.equal(ddpo.rwr_sparse_weights(r, threshold=2.0), torch.zeros(5))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_loss_is_zero_for_the_true_target_and_matches_the_closed_form(prediction_type):
    """Against the forward process written out: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, and v = √ᾱ_t ε − √(1−ᾱ_t) x_0."""
    scheduler = sd_scheduler(prediction_type=prediction_type)
    a = scheduler.alphas_cumprod
    x0 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))

    class Oracle(torch.nn.Module):  # knows x_0, so it can recover ε (and v) exactly from x_t
        def forward(self, x_t, t, encoder_hidden_states):
            ab = a[t].view(-1, 1, 1, 1)
            eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
            return type("Out", (), {"sample": eps if prediction_type == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x0})

    class Zero(torch.nn.Module):
        def forward(self, x_t, t, encoder_hidden_states):
            return type("Out", (), {"sample": torch.zeros_like(x_t)})

    oracle = ddpo.Models(Oracle(), None, None, scheduler, None, "cpu")
    assert ddpo.ddpm_loss(oracle, x0, None, torch.Generator().manual_seed(6)).abs().max().item() < 1e-8
    zero = ddpo.Models(Zero(), None, None, scheduler, None, "cpu")
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (3,), generator=g)  # the loss draws t first, then ε, from the same generator
    noise = torch.randn(x0.shape, generator=g)
    ab = a[t].view(-1, 1, 1, 1)
    target = noise if prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    torch.testing.assert_close(ddpo.ddpm_loss(zero, x0, None, torch.Generator().manual_seed(7)),
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
    assert stderr < 0.02  # so 4 standard errors are < 2% of the exact gradient, 4
    assert -mu.grad.item() == pytest.approx(-2 * (1.0 - 3.0), abs=4 * stderr)


@pytest.mark.parametrize("advantage, direction", [(1.0, 1), (-1.0, -1)])
def test_one_is_step_moves_log_prob_with_the_advantage(random_model_dir, advantage, direction):
    models = ddpo.load_models(str(random_model_dir), "cpu")  # a fresh copy: this test trains it
    args = small_args("--algo", "is", "--num-minibatches", "1", "--lr", "1e-4")
    traj = ddpo.rollout(models, ["cat"], args, torch.Generator().manual_seed(8))
    uncond = ddpo.encode_prompts(models, [""]).expand(1, -1, -1)
    # a small plain gradient step tests the estimator's direction (Adam's first step is ±lr on every weight,
    # which can overshoot where log π is sharply curved, at the last steps' small σ_t)
    optimizer = torch.optim.SGD(models.unet.parameters(), lr=1e-3)
    logs = ddpo.train_round(models, optimizer, traj, torch.tensor([advantage]), torch.zeros(1), args,
                            torch.Generator().manual_seed(0), uncond)
    assert logs["approx_kl"] < 1e-12 and logs["clipfrac"] == 0  # one minibatch: data from the current θ
    with torch.no_grad():
        after = torch.stack([ddpo.rescore(models, traj, torch.tensor([0]), torch.tensor([j]), uncond, args)
                             for j in range(4)]).sum()
    assert direction * (after - traj.log_probs.sum()).item() > 1e-3  # measured: ±0.01


def test_batch_arithmetic_flags_decide_the_forward_passes(random_models):
    """--num-minibatches, --inner-epochs, --train-batch-size and --timestep-fraction, counted as UNet calls."""
    args = small_args("--algo", "is", "--num-minibatches", "2", "--inner-epochs", "2", "--train-batch-size", "1",
                      "--timestep-fraction", "0.5", "--lr", "0")
    traj = ddpo.rollout(random_models, ["cat", "dog", "cow", "pig"], args, torch.Generator().manual_seed(9))
    calls = []
    hook = random_models.unet.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    try:
        optimizer = torch.optim.AdamW(random_models.unet.parameters(), lr=0.0)
        uncond = ddpo.encode_prompts(random_models, [""]).expand(1, -1, -1)
        ddpo.train_round(random_models, optimizer, traj, torch.ones(4), torch.zeros(4), args,
                         torch.Generator().manual_seed(0), uncond)
    finally:
        hook.remove()
    # 2 inner epochs x 4 samples (1 per pass) x 2 of the 4 timesteps, each pass conditional + unconditional
    assert calls == [2] * 16


# --------------------------------------------------------------------------------------------------------
# Rewards and prompts
# --------------------------------------------------------------------------------------------------------

def test_jpeg_rewards():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise])
    compress, incompress = rewards.jpeg_compressibility(images, ["a", "b"]), rewards.jpeg_incompressibility(images, ["a", "b"])
    assert compress[0] > compress[1] and incompress[1] > incompress[0]  # flat is more compressible than noise
    torch.testing.assert_close(compress, -incompress)
    buffer = io.BytesIO()  # the same number written out with PIL by hand: kB = bytes / 1000 at quality 95
    Image.fromarray((noise[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buffer, "JPEG", quality=95)
    assert incompress[1].item() == pytest.approx(len(buffer.getvalue()) / 1000)
    assert compress.dtype == torch.float32 and compress.shape == (2,)


def test_non_finite_or_misshapen_reward_stops_with_the_sample_named():
    broken = lambda images, prompts: torch.tensor([0.5, float("nan"), 1.0])
    with pytest.raises(SystemExit, match=r"reward 'broken' returned nan for sample 1 \(prompt 'dog'\)"):
        ddpo.compute_rewards(broken, "broken", torch.zeros(3, 3, 4, 4), ["cat", "dog", "cow"])
    with pytest.raises(SystemExit, match=r"returned shape \(3,\), expected \(2,\)"):
        ddpo.compute_rewards(broken, "broken", torch.zeros(2, 3, 4, 4), ["cat", "dog"])


def test_prompt_sets():
    animals = ddpo.load_prompts("imagenet_animals")
    assert len(animals) == 398 and animals[0] == "tench" and animals[-1] == "puffer"  # ImageNet ids 0–397
    assert len(ddpo.load_prompts("simple_animals")) == 45
    alignment = ddpo.load_prompts("alignment")
    assert len(alignment) == 45 * 3 and "an ant playing chess" in alignment and "a cat riding a bike" in alignment
    assert "a turtle driving a car" in ddpo.load_prompts("alignment_unseen_activities")
    assert ddpo.load_prompts(str(HERE / "prompts" / "everyday_objects.txt")) == ddpo.load_prompts("everyday_objects")
    assert not set(ddpo.load_prompts("unseen_animals")) & set(ddpo.load_prompts("simple_animals"))


# --------------------------------------------------------------------------------------------------------
# The tiny built-in model and the CLI end to end
# --------------------------------------------------------------------------------------------------------

def palette_accuracy(images, prompts):
    """How often the image's border colour is nearest to the background colour its prompt picks (chance: 1/8)."""
    border = torch.cat([images[:, :, [0, 1, -2, -1], :].flatten(2), images[:, :, :, [0, 1, -2, -1]].flatten(2)], 2)
    colour = border.median(dim=2).values.numpy()  # (B, 3); the median ignores the stripes' swing
    backgrounds = np.array([bg for bg, _ in tiny_world.PALETTES])
    nearest = np.argmin(((colour[:, None] - backgrounds[None]) ** 2).sum(-1), axis=1)
    wanted = [tiny_world.prompt_attributes(p, None)[0] for p in prompts]
    return float(np.mean(nearest == np.array(wanted)))


def test_palette_accuracy_measures_the_toy_world():
    rng = np.random.default_rng(0)
    prompts = tiny_world.all_prompts()[:64]
    toy = torch.from_numpy(np.stack([tiny_world.draw(p, rng) for p in prompts])) / 2 + 0.5
    assert palette_accuracy(toy, prompts) == 1.0
    shuffled = random.Random(1).sample(prompts, len(prompts))
    assert palette_accuracy(toy, shuffled) < 0.3  # the wrong prompts: near chance


def test_tiny_model_is_pretrained_and_prompt_conditional():
    """The shipped model draws the toy world: the prompt's palette, and JPEG sizes that vary (RL's signal)."""
    models = ddpo.load_models("tiny", "cpu")
    prompts = random.Random(0).sample(tiny_world.all_prompts(), 32)
    _, images = ddpo.sample(models, prompts, ddpo.parse_args([]), torch.Generator().manual_seed(0), 32)
    assert palette_accuracy(images, prompts) >= 0.9  # measured: 1.0 at w = 1, 3 and 5 on 48 prompts
    sizes = rewards.jpeg_kilobytes(images)
    assert sizes.std() / sizes.mean() > 0.03


def run_cli(*argv):
    return subprocess.run([sys.executable, str(HERE / "ddpo.py"), *argv], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("algo, extra", [
    ("sf", ["--advantage", "batch"]),
    ("is", ["--guidance-scale", "3", "--eta", "0.8", "--max-grad-norm", "0.5", "--adv-clip", "2"]),
    ("rwr", ["--rwr-beta", "2"]),
    ("rwr-sparse", ["--rwr-threshold", "-5", "--buffer-size", "4", "--min-count", "2"]),
])
def test_cli_one_epoch_each_algorithm(tmp_path, algo, extra):
    ddpo.main(["--algo", algo, "--epochs", "1", "--num-steps", "3", "--samples-per-epoch", "4", "--sample-batch-size", "2",
               "--num-minibatches", "2", "--train-batch-size", "2", "--prompts", "simple_animals", "--device", "cpu",
               "--out-dir", str(tmp_path), "--run-name", "run", "--seed", "1", *extra])
    run = tmp_path / "run"
    before, row = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(before) == {"epoch", "eval/reward_mean"} and before["epoch"] == 0  # the pretrained model
    assert row["epoch"] == 1 and math.isfinite(row["losses/loss"])
    assert row["reward/min"] <= row["reward/mean"] <= row["reward/max"] < 0  # jpeg: r = −kB
    assert (algo == "is") == ("losses/clipfrac" in row)
    assert Image.open(run / "grid_001.png").size == (512, 2 * 142) and (run / "reward_curve.png").is_file()
    tuned, base = ddpo.load_models(str(run), "cpu"), ddpo.load_models("tiny", "cpu")  # a run folder is a model
    changed = [not torch.equal(p, q) for p, q in zip(tuned.unet.parameters(), base.unet.parameters())]
    assert any(changed)


def test_cli_same_seed_same_results_and_lr_zero_changes_nothing(tmp_path):
    common = ["--epochs", "1", "--num-steps", "2", "--samples-per-epoch", "4", "--sample-batch-size", "4",
              "--num-minibatches", "1", "--out-dir", str(tmp_path), "--seed", "3"]
    for name in ("a", "b"):
        ddpo.main([*common, "--run-name", name])
    a, b = ((tmp_path / n / "metrics.jsonl").read_text() for n in ("a", "b"))
    strip = lambda text: [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")} for l in text.splitlines()]
    assert strip(a) == strip(b)
    ddpo.main([*common, "--run-name", "frozen", "--lr", "0"])
    frozen, base = ddpo.load_models(str(tmp_path / "frozen"), "cpu"), ddpo.load_models("tiny", "cpu")
    assert all(torch.equal(p, q) for p, q in zip(frozen.unet.parameters(), base.unet.parameters()))


@pytest.mark.parametrize("argv, message", [
    (["--reward", "beauty"], "argument --reward: invalid choice: 'beauty'"),
    (["--algo", "ppo"], "argument --algo: invalid choice: 'ppo'"),
    (["--prompts", "no_such_file.txt"], "prompt file or set 'no_such_file.txt' does not exist"),
    (["--eta", "0"], "--eta 0.0 is out of range"),
    (["--clip-range", "-1"], "--clip-range -1.0 is out of range"),
    (["--samples-per-epoch", "10", "--sample-batch-size", "4"], "must be a multiple of --sample-batch-size"),
    (["--sample-batch-size", "0"], "--sample-batch-size 0 is out of range"),
    (["--timestep-fraction", "1.5"], "--timestep-fraction 1.5 is out of range"),
    (["--model", "/no/such/model"], "cannot load model '/no/such/model'"),
])
def test_bad_input_is_one_clear_line_and_nothing_is_written(tmp_path, argv, message):
    result = run_cli(*argv, "--out-dir", str(tmp_path / "runs"))
    assert result.returncode != 0
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_hub_id_with_the_hub_unreachable_is_one_line_saying_so(tmp_path):
    """A closed local port stands in for the hub: the library's retry chatter (about 25 s of it) is silenced."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}  # 9: discard, closed
    result = subprocess.run([sys.executable, str(HERE / "ddpo.py"), "--model", "some-org/some-model", "--out-dir",
                             str(tmp_path / "runs")], capture_output=True, text=True, timeout=300, env=env)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot load model 'some-org/some-model': no such local folder, and the hub is "
                               "unreachable (") and lines[0].endswith("--model tiny or a local folder works offline")
    assert not (tmp_path / "runs").exists()


def test_a_folder_that_is_not_a_pipeline_is_one_line_naming_it(tmp_path):
    result = run_cli("--model", str(tmp_path), "--out-dir", str(tmp_path / "runs"))
    assert result.returncode != 0
    assert result.stderr.strip().startswith(f"error: cannot load model folder {tmp_path} (")


def test_empty_prompt_file_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    result = run_cli("--prompts", str(tmp_path / "empty.txt"), "--out-dir", str(tmp_path / "runs"))
    assert result.returncode != 0 and result.stderr.strip() == f"error: prompt file {tmp_path / 'empty.txt'} has no prompts"
    assert not (tmp_path / "runs").exists()


def test_help_documents_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for f in ddpo.dataclasses.fields(ddpo.Args):
        assert "--" + f.name.replace("_", "-") in result.stdout
