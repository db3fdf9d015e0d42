"""The graded tests of the course kit (make_exercises.py, EXERCISES.md): one group per exercise.

    python -m pytest -q course/test_exercises.py -k exercise_5   # grade exercise 5 (in the student copy: test_exercises.py)

Each exercise's tests call only that exercise's function and compare it with an independent reference:
diffusers' own DDIM step, torch.distributions, a toy problem whose gradient is known, or numbers worked out by
hand (in the comments). A failure says what is wrong in the terms of the paper. In the full project these tests
pass on the reference ddpo.py and run with the rest of the suite.
"""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import ddpo


def close(a, b, tol=1e-5):
    """|a − b| ≤ tol + tol·|b| in float64. Each grading call states its own tol, derived for any correct order of
    the float32 operations; the calls that only choose a hint keep a loose one (any tol that tells the wrong form)."""
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------------------------
# Exercise 1: the DDIM step's σ_t and mean μ (paper §3.1; DDIM eq. 12 and 16)
# --------------------------------------------------------------------------------------------------------

def sd_scheduler(steps=20):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1)
    s.set_timesteps(steps)
    return s


def diffusers_step(sched, eps, x_t, t, eta, z):
    return sched.step(eps, t, x_t, eta=eta, variance_noise=z).prev_sample


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_exercise_1_sigma_is_the_noise_diffusers_adds(eta):
    sched = sd_scheduler()
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps[[0, 10, -1]]:  # the first, a middle and the last step (ᾱ_{t−1} = final ᾱ there)
        x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        ones, zeros = torch.ones_like(x_t), torch.zeros_like(x_t)
        expected = (diffusers_step(sched, eps, x_t, t, eta, ones) - diffusers_step(sched, eps, x_t, t, eta, zeros))[0, 0, 0, 0]
        _, sigma = ddpo.ddim_step(sched, eps, x_t, t.expand(2), eta)
        sigma = torch.as_tensor(sigma).flatten()[0]
        hint = ""
        if close(sigma, expected / eta, 1e-4) and eta != 1:
            hint = " It is right for η = 1: σ_t must scale with η."
        elif close(sigma, expected**2, 1e-6):
            hint = " That is the variance σ_t²; return its square root."
        # bound: `expected` is a difference of two diffusers samples (|x| ≤ 7): 2·0.5 ulp(7) = 4.8e-7; σ_t in any order
        # ~8u relative, but at t = 1, 1 − ᾱ_1/ᾱ_0 = 8.5e-4 makes a ratio's u 3.5e-5 of σ_t = 0.0206 (7e-7, ours and
        # diffusers'): ≈ 2e-6; we allow 3e-6
        assert close(sigma, expected, 3e-6), (f"σ_t at t = {t.item()}, η = {eta}: you return {sigma.item():.6g}, the "
                                              f"noise scale DDIMScheduler.step adds is {expected.item():.6g}.{hint}")


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_exercise_1_mean_is_the_diffusers_step_without_its_noise(eta):
    sched = sd_scheduler()
    g = torch.Generator().manual_seed(1)
    for t in sched.timesteps[[0, 7, -1]]:
        x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = diffusers_step(sched, eps, x_t, t, eta, torch.zeros_like(x_t))
        mean, _ = ddpo.ddim_step(sched, eps, x_t, t.expand(2), eta)
        # bound: another order of a correct μ rounds its terms (|√ᾱ_prev x̂_0| ≤ 6.6, |direction| ≤ 3, x̂_0's roundings
        # scaled by √ᾱ_prev/√ᾱ_t ≤ 1.2) a few times each, and diffusers' σ_t (≤ 3u off) moves √(1 − ᾱ_prev − σ_t²) by
        # |ε|·3uσ_t²/c ≤ 4·3u·0.55: ≈ 10u·7 = 4e-6; we allow 1e-5 (also in the next test)
        error = (mean - expected).abs().max().item()
        hint = " At η = 0 it is right: the direction term pointing to x_t must shrink as σ_t grows." if eta else ""
        assert error < 1e-5, (f"μ at t = {t.item()}, η = {eta} differs from DDIMScheduler.step with zero noise by "
                              f"up to {error:.3g}.{hint}")


def test_exercise_1_mean_plus_sigma_times_noise_is_the_diffusers_step():
    sched = sd_scheduler()
    g = torch.Generator().manual_seed(2)
    t = sched.timesteps[3]
    x_t, eps, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    mean, sigma = ddpo.ddim_step(sched, eps, x_t, t.expand(2), 1.0)
    error = (mean + sigma * z - diffusers_step(sched, eps, x_t, t, 1.0, z)).abs().max().item()
    assert error < 1e-5, f"x_(t-1) = μ + σ_t z must be DDIMScheduler.step's sample for the same noise z (off by {error:.3g})"


# --------------------------------------------------------------------------------------------------------
# Exercise 2: log π(x_{t-1} | x_t, c), averaged over dimensions (paper §3.1 eq. 2, §4.3)
# --------------------------------------------------------------------------------------------------------

def test_exercise_2_log_prob_is_the_gaussian_density_averaged_over_dimensions():
    g = torch.Generator().manual_seed(3)
    x, mean = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sigma = torch.tensor([0.3, 0.7, 1.2]).view(3, 1, 1, 1)  # one σ_t per sample, as ddim_step returns it
    got = ddpo.gaussian_log_prob(x, mean, sigma)
    assert got.shape == (3,), f"one log-prob per sample: shape (3,), not {tuple(got.shape)}"
    expected = Normal(mean, sigma).log_prob(x).mean(dim=(1, 2, 3))  # the reference: torch.distributions
    hint = ""
    if close(got, expected * 100, 1e-4):
        hint = " Yours is 100 times too large: you summed over the C·H·W = 100 dimensions; average them."
    elif close(got, Normal(mean, sigma.sqrt()).log_prob(x).mean(dim=(1, 2, 3)) - 0.5 * torch.log(sigma).view(3), 1e-4):
        hint = " The exponent must divide the squared distance by 2σ², not 2σ."
    # bound: another order of the density rounds each term (≤ 89 at σ = 0.3) a few times and the 100-term mean at ~7
    # levels: ≈ 14u·|log π| (≤ 11) ≈ 9e-6; close(…, 2e-6) allows 2e-6 + 2e-6·11 = 2.4e-5
    assert close(got, expected, 2e-6), (f"log π = {got.tolist()}, torch.distributions.Normal gives "
                                        f"{expected.tolist()} (averaged over dimensions).{hint}")


def test_exercise_2_gradient_flows_into_the_mean_only():
    x = torch.randn(2, 3, 4, 4).requires_grad_()
    mean = torch.randn(2, 3, 4, 4).requires_grad_()
    ddpo.gaussian_log_prob(x, mean, torch.tensor(0.5)).sum().backward()
    assert x.grad is None or not x.grad.any(), \
        "x_(t-1) is the action already taken, a constant: no gradient may flow into it"
    reference = mean.detach().clone().requires_grad_()
    Normal(reference, 0.5).log_prob(x.detach()).mean(dim=(1, 2, 3)).sum().backward()
    # bound: (x − μ)/(σ² D) ≤ 5/(0.25·48) = 0.42, a few roundings in either: ≈ 4u·0.42 = 1e-7; we allow 1e-6
    assert mean.grad is not None and close(mean.grad, reference.grad, 1e-6), "the gradient with respect to μ is not the density's"


# --------------------------------------------------------------------------------------------------------
# Exercise 3: per-prompt advantages (paper App. D.3)
# --------------------------------------------------------------------------------------------------------

def spread(values):
    values = torch.as_tensor(values, dtype=torch.float64)
    return values.mean().item(), values.std(unbiased=False).item()


def test_exercise_3_each_prompt_is_normalised_by_its_own_rewards():
    tracker = ddpo.PerPromptStatTracker(buffer_size=16, min_count=4)
    prompts = ["cat"] * 4 + ["dog"] * 4
    advantages, own = tracker(prompts, [1.0, 2.0, 3.0, 4.0, 100.0, 110.0, 120.0, 130.0])
    assert isinstance(advantages, torch.Tensor) and advantages.shape == (8,), "return the advantages as a (B,) tensor"
    for name, part in (("cat", advantages[:4]), ("dog", advantages[4:])):
        m, s = spread(part)
        # bound: the guard std + 1e-6 (EXERCISES.md) makes the std 1/(1 + 1e-6/std) ≤ 9e-7 short of 1 (std ≥ 1.118);
        # float32 adds ≤ 0.5u·1.34 to each advantage (≤ 1e-7 in m and s): we allow 1e-6 for m, 2e-6 for s (so below)
        assert abs(m) < 1e-6 and abs(s - 1) < 2e-6, (f"{name}'s advantages have mean {m:.3g} and std {s:.3g} over "
                                                      f"its own 4 samples: each prompt must be normalised by its own "
                                                      f"rewards (mean 0, std 1), not by the batch's")
    assert own == 1.0, f"all 8 samples used their own prompt's statistics: the fraction must be 1, not {own}"


def test_exercise_3_a_prompt_with_few_rewards_uses_the_batch():
    tracker = ddpo.PerPromptStatTracker(buffer_size=16, min_count=5)  # nobody has 5 rewards yet; one sample a prompt
    rewards = [1.0, 2.0, 3.0, 4.0, 100.0, 110.0, 120.0, 130.0]
    advantages, own = tracker(["cat"] * 4 + ["dog"] * 4, rewards)
    m, s = spread(advantages)
    assert abs(m) < 1e-6 and abs(s - 1) < 2e-6, (f"with fewer than min_count rewards (and no groups) every sample must "
                                                  f"be normalised by the whole batch: mean {m:.3g}, std {s:.3g} over it")
    assert advantages[0] < advantages[4], "a cat at reward 1 must be below a dog at reward 100 when the batch normalises"
    assert own == 0.0, f"no sample used its own prompt's statistics: the fraction must be 0, not {own}"


def test_exercise_3_groups_of_a_prompt_normalise_by_the_group():
    tracker = ddpo.PerPromptStatTracker(buffer_size=16, min_count=16, group_size=4)
    advantages, own = tracker(["cat"] * 4 + ["dog"] * 4, [1.0, 2.0, 3.0, 4.0, 100.0, 110.0, 120.0, 130.0])
    for name, part in (("cat", advantages[:4]), ("dog", advantages[4:])):
        m, s = spread(part)
        assert abs(m) < 1e-6 and abs(s - 1) < 2e-6, (f"group_size = 4: before its buffer holds min_count rewards, "
                                                      f"{name}'s group must be normalised by its own 4 rewards "
                                                      f"(mean {m:.3g}, std {s:.3g})")
    assert own == 1.0, f"every sample was normalised by its own prompt's group: the fraction must be 1, not {own}"


def test_exercise_3_the_buffer_keeps_the_last_buffer_size_rewards():
    tracker = ddpo.PerPromptStatTracker(buffer_size=4, min_count=4)
    tracker(["cat", "cat"], [1.0, 3.0])
    tracker(["cat", "cat"], [5.0, 7.0])  # buffer 1, 3, 5, 7: mean 4, std √5
    advantages, _ = tracker(["cat", "cat"], [9.0, 11.0])  # buffer 5, 7, 9, 11: mean 8, std √5
    expected = [1 / math.sqrt(5), 3 / math.sqrt(5)]  # 0.447, 1.342
    # bound: the guard moves A by |A|·1e-6/√5 ≤ 6e-7, float32 by 0.5u·1.34: we allow 2e-6
    assert close(advantages, expected, 2e-6), (f"after rewards 1, 3 | 5, 7 | 9, 11 with buffer_size = 4 the third "
                                               f"round's advantages must be {[round(e, 3) for e in expected]} (the "
                                               f"buffer keeps the prompt's last 4 rewards, this round's included), "
                                               f"not {[round(a, 3) for a in advantages.tolist()]}")


def test_exercise_3_a_prompt_drawn_twice_keeps_all_its_rewards_of_the_round():
    tracker = ddpo.PerPromptStatTracker(buffer_size=2, min_count=2, group_size=2)
    advantages, _ = tracker(["cat", "cat", "dog", "dog", "cat", "cat"], [1.0, 3.0, 10.0, 14.0, 5.0, 7.0])
    expected = [-3 / math.sqrt(5), -1 / math.sqrt(5), -1.0, 1.0, 1 / math.sqrt(5), 3 / math.sqrt(5)]
    # bound: the guard moves A by |A|·1e-6/√5 ≤ 6e-7, float32 by 0.5u·1.34: we allow 2e-6
    assert close(advantages, expected, 2e-6), (f"cat drawn twice in one round (1, 3 and 5, 7) is four rewards of one "
                                               f"prompt: both groups by mean 4 and std √5, "
                                               f"{[round(e, 3) for e in expected]}, not the last buffer_size's "
                                               f"statistics; got {[round(a, 3) for a in advantages.tolist()]}")


def test_exercise_3_equal_rewards_give_zero_not_nan():
    advantages, _ = ddpo.PerPromptStatTracker(buffer_size=16, min_count=2)(["cat"] * 3, [2.0, 2.0, 2.0])
    assert torch.isfinite(advantages).all() and not advantages.any(), \
        f"a prompt whose rewards are all equal must get advantages 0 (guard the division by its std), not {advantages.tolist()}"


# --------------------------------------------------------------------------------------------------------
# Exercise 4: DDPO_SF (paper §4.3)
# --------------------------------------------------------------------------------------------------------

def test_exercise_4_the_loss_descends_towards_higher_advantage():
    log_prob = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    loss = ddpo.ddpo_sf_loss(log_prob, torch.tensor([2.0, -1.0, 0.5]))
    assert loss.ndim == 0, "the loss must be one number"
    loss.backward()
    expected = [-2 / 3, 1 / 3, -0.5 / 3]  # worked out by hand for advantages 2, -1, 0.5
    hint = ""
    if close(log_prob.grad, [-e for e in expected]):
        hint = " The sign is reversed: descending the loss must raise log π where A > 0."
    elif close(log_prob.grad, [3 * e for e in expected]):
        hint = " It is 3 times too large: average over the samples, do not sum."
    # bound: −A/3 as −A·fl(1/3) or −A/3: ≤ 1.5u·0.67 = 6e-8; we allow 3e-7 (also in exercise 5)
    assert close(log_prob.grad, expected, 3e-7), (f"∂loss/∂log π = {[round(v, 4) for v in log_prob.grad.tolist()]}, "
                                                  f"expected {[round(e, 4) for e in expected]}.{hint}")


def test_exercise_4_the_gradient_is_the_policy_gradient_of_a_toy_problem():
    # one-step policy a ~ N(μ, 0.5²), reward r(a) = −(a − 3)²: E[r] = −(μ − 3)² − 0.25, so ∂E[r]/∂μ = 4 at μ = 1
    mu = torch.tensor(1.0, requires_grad=True)
    a = (mu + 0.5 * torch.randn(200_000, generator=torch.Generator().manual_seed(4))).detach()
    log_prob = Normal(mu, 0.5).log_prob(a)
    ddpo.ddpo_sf_loss(log_prob, -(a - 3) ** 2).backward()
    # statistical: 0.1 is 4.0 standard errors (0.025) of this 200,000-sample mean: false failure rate 6e-5
    assert abs(mu.grad.item() + 4) < 0.1, (f"on the toy problem the gradient of your loss with respect to μ is "
                                           f"{mu.grad.item():.3f}; the exact −∂E[r]/∂μ is −4 (descending the loss "
                                           f"must climb the expected reward)")


# --------------------------------------------------------------------------------------------------------
# Exercise 5: DDPO_IS with PPO's clip (paper §4.3)
# --------------------------------------------------------------------------------------------------------

def test_exercise_5_at_the_old_policy_the_ratio_is_one_and_the_update_is_sfs():
    old = torch.tensor([-1.0, -2.0, -0.5])
    log_prob = old.clone().requires_grad_()
    loss, approx_kl, clipfrac = ddpo.ddpo_is_loss(log_prob, old, torch.tensor([1.0, -2.0, 0.5]), 1e-4)
    loss.backward()
    # bound: ratio = exp(0) = 1 exactly, so the loss is a mean of exact numbers, one or two roundings of 1/6: we allow
    # 1e-7 (≈ 8 ulps)
    assert close(loss, 1 / 6, 1e-7), f"at θ = θ_old (ratio 1) the loss for advantages 1, -2, 0.5 is 1/6, not {loss.item():.4g}"
    expected = [-1 / 3, 2 / 3, -0.5 / 3]
    assert close(log_prob.grad, expected, 3e-7), (f"at ratio 1 the gradient must be DDPO_SF's: ∂loss/∂log π = "
                                            f"{[round(e, 4) for e in expected]}, not {[round(v, 4) for v in log_prob.grad.tolist()]}")
    assert approx_kl.item() == 0 and clipfrac.item() == 0, "the ratio must be 1 when θ = θ_old: approx_kl 0, clipfrac 0"


@pytest.mark.parametrize("advantage, ratio, loss, gradient, why", [
    # loss = the larger (pessimistic) of −A·ratio and −A·clip(ratio, 0.8, 1.2); ∂/∂log π worked out by hand
    (1.0, 1.5, -1.2, 0.0, "A > 0 and the ratio above 1 + ε: the sample was pushed far enough; no gradient"),
    (1.0, 0.5, -0.5, -0.5, "A > 0 and the ratio below 1 − ε: the clip must not stop the sample from recovering"),
    (-1.0, 0.5, 0.8, 0.0, "A < 0 and the ratio below 1 − ε: the sample was pushed far enough; no gradient"),
    (-1.0, 1.5, 1.5, 1.5, "A < 0 and the ratio above 1 + ε: the clip must not stop the sample from recovering"),
])
def test_exercise_5_the_clip_is_pessimistic(advantage, ratio, loss, gradient, why):
    log_prob = torch.tensor([math.log(ratio)], requires_grad=True)
    got, _, _ = ddpo.ddpo_is_loss(log_prob, torch.zeros(1), torch.tensor([advantage]), 0.2)
    got.backward()
    # bound: log then exp of the ratio (≤ 0.5u + 1 ulp), 1 ± ε in float32 (0.5u), ×A: ≈ 3u·1.5 = 2.7e-7; the clipped
    # gradients are exactly 0; we allow 5e-7 (+ 5e-7·|value|)
    assert close(got, loss, 5e-7), f"A = {advantage}, ratio = {ratio}, ε = 0.2: the loss must be {loss}, not {got.item():.4g} ({why})"
    assert close(log_prob.grad, [gradient], 5e-7), (f"A = {advantage}, ratio = {ratio}, ε = 0.2: ∂loss/∂log π must be "
                                              f"{gradient}, not {log_prob.grad.item():.4g} ({why})")


def test_exercise_5_approx_kl_and_clipfrac():
    logratio = torch.tensor([0.1, -0.3, 0.0, 0.5, 0.05])  # ratios 1.105, 0.741, 1, 1.649, 1.051; ε = 0.2 clips 2 of 5
    _, approx_kl, clipfrac = ddpo.ddpo_is_loss(logratio, torch.zeros(5), torch.ones(5), 0.2)
    # bound: the log-ratios' float32 (0.5u), squares, a 5-term mean, ×½: ≈ 5u·0.035 = 1e-8; clipfrac 2/5 one
    # rounding; we allow 1e-7
    assert close(approx_kl, 0.03525, 1e-7), f"approx_kl = half the mean squared log-ratio = 0.03525 here, not {float(approx_kl):.5g}"
    assert close(clipfrac, 0.4, 1e-7), f"clipfrac = the fraction of ratios outside [1 − ε, 1 + ε] = 0.4 here, not {float(clipfrac):.4g}"


# --------------------------------------------------------------------------------------------------------
# Exercise 6: RWR's weights (paper §4.2)
# --------------------------------------------------------------------------------------------------------

def test_exercise_6_exponential_weights_average_one():
    got = ddpo.rwr_exponential_weights(torch.tensor([0.0, math.log(2), math.log(4)]), 1.0)
    # bound: ln 2, ln 4 in float32 (0.7u through exp), exp ≤ 1 ulp, a 3-term sum, ÷, ×n: ≈ 6u·1.71 = 6e-7 in any
    # order; we allow 1e-6 (in this test and the next two)
    assert close(got, [3 / 7, 6 / 7, 12 / 7], 1e-6), (f"β = 1, r = 0, ln 2, ln 4: the weights are in the ratio 1 : 2 : 4 and "
                                                f"average 1, so 3/7, 6/7, 12/7, not {[round(v, 4) for v in got.tolist()]}")
    got = ddpo.rwr_exponential_weights(torch.tensor([0.0, math.log(2)]), 2.0)
    assert close(got, [0.4, 1.6], 1e-6), f"β = 2 squares the ratio: r = 0, ln 2 give 1 : 4, so 0.4, 1.6, not {got.tolist()}"
    assert close(ddpo.rwr_exponential_weights(torch.tensor([5.0, -3.0, 1.0]), 0.0), [1, 1, 1], 1e-6), "β = 0 weighs all alike"


def test_exercise_6_exponential_weights_do_not_overflow():
    got = ddpo.rwr_exponential_weights(torch.tensor([1000.0, 1001.0]), 1.0)
    # bound: x − max (or − mean) is exact here, exp(−1) ≤ 1 ulp, sum, ÷, ×2: ≈ 4u·1.46 = 3.5e-7; we allow 1e-6
    assert torch.isfinite(got).all() and close(got, [2 / (1 + math.e), 2 * math.e / (1 + math.e)], 1e-6), \
        f"rewards near 1000 must give finite weights 0.538, 1.462 (Z may be taken after subtracting the largest), not {got.tolist()}"


def test_exercise_6_sparse_weights_keep_the_rewards_at_or_above_c():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # bound: 0, 1 and 2 come out exact here (n/count = 2, 1); any order rounds ≤ twice: ≤ 1.5u·2; we allow 1e-6
    assert close(ddpo.rwr_sparse_weights(rewards, 3.0), [0, 0, 2, 2], 1e-6), \
        "C = 3 keeps r = 3 and 4, each weighted so the loss is the mean over the kept samples: 0, 0, 2, 2"
    assert close(ddpo.rwr_sparse_weights(rewards, 1.0), [1, 1, 1, 1], 1e-6), "C = 1 keeps every sample: weights 1"
    got = ddpo.rwr_sparse_weights(rewards, 5.0)
    assert torch.isfinite(got).all() and not got.any(), f"C = 5 keeps nothing: weights 0 (not NaN), not {got.tolist()}"


# --------------------------------------------------------------------------------------------------------
# Exercise 7: DPOK's KL (Fan et al. 2023 §4)
# --------------------------------------------------------------------------------------------------------

def test_exercise_7_kl_is_the_gaussians_kl_averaged_over_dimensions():
    g = torch.Generator().manual_seed(5)
    mean, mean_pre = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.2, 0.5, 1.0]).view(3, 1, 1, 1)
    got = ddpo.gaussian_kl(mean, mean_pre, sigma)
    assert got.shape == (3,), f"one KL per sample: shape (3,), not {tuple(got.shape)}"
    expected = kl_divergence(Normal(mean, sigma), Normal(mean_pre, sigma)).mean(dim=(1, 2, 3))
    hint = " Yours is 32 times too large: average over the 32 dimensions, as the log-prob does." if close(got, 32 * expected, 1e-4) else ""
    # bound: torch's ½(1 + (Δμ/σ)² − 1 − log 1) and any order of ours, ~4 roundings each of values ≤ 625 / 2 at σ =
    # 0.2, and the 32-term mean: ≈ 12u·|KL| (≤ 25) ≈ 1.8e-5; close(…, 2e-6) allows 2e-6 + 2e-6·25 = 5.2e-5
    assert close(got, expected, 2e-6), f"KL = {got.tolist()}, torch.distributions gives {expected.tolist()}.{hint}"
    assert not ddpo.gaussian_kl(mean, mean, sigma).any(), "the KL of a policy to itself must be 0"


def test_exercise_7_gradient_flows_into_the_fine_tuned_mean_only():
    mean, mean_pre = torch.randn(2, 3, 4, 4).requires_grad_(), torch.randn(2, 3, 4, 4).requires_grad_()
    ddpo.gaussian_kl(mean, mean_pre, torch.tensor(0.5)).sum().backward()
    assert mean_pre.grad is None or not mean_pre.grad.any(), "π_pre is fixed: no gradient may flow into μ_pre"
    assert mean.grad is not None and mean.grad.any(), "the KL must pull μ_θ: its gradient with respect to μ_θ is missing"


# --------------------------------------------------------------------------------------------------------
# Exercise 8: Flow-GRPO's SDE step on a flow model (Liu et al. 2025)
# --------------------------------------------------------------------------------------------------------

def flow_scheduler(steps=10, shift=3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(shift=shift)  # SD3's
    s.set_timesteps(steps)
    return s


def test_exercise_8_noise_level_zero_gives_the_schedulers_euler_step():
    g = torch.Generator().manual_seed(0)
    for j in (0, 4, 9):  # the first step (t = 1), an inner one, the last (to t = 0)
        sched = flow_scheduler()
        x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        t = sched.timesteps[j]
        expected = sched.step(v, t, x).prev_sample
        mean, std = ddpo.flow_sde_step(sched, v, x, t.expand(2), 0.0)
        # bound: x_t + Δt·v in another order: ≤ 2 roundings of |x_t + Δt v| ≤ 5: 1.5u·5 = 4.5e-7; we allow 5e-7
        # + 5e-7·|expected|
        assert close(mean, expected, 5e-7), (f"at a = 0 (σ_t = 0) the step must be FlowMatchEulerDiscreteScheduler's "
                                              f"x_t + Δt·v at step {j}; yours differs by {(mean - expected).abs().max():.3g}")
        assert close(std, 0.0), "at a = 0"  # exact: 0 times anything finite there is no noise: std 0"


def test_exercise_8_std_is_sigma_t_times_the_square_root_of_the_step():
    sched, a = flow_scheduler(), 0.7
    s = sched.sigmas.double().tolist()
    x = v = torch.zeros(3, 1, 2, 2)
    _, std = ddpo.flow_sde_step(sched, v, x, sched.timesteps[[0, 5, 9]], a)
    std = torch.as_tensor(std).flatten()
    # worked out by hand from the scheduler's sigmas s: a √(t/(1 − t)) √(t − (t + Δt)); at t = 1, 1 − t at s[1]
    expected = [a * math.sqrt(1 / (1 - s[1]) * (1 - s[1])), a * math.sqrt(s[5] / (1 - s[5]) * (s[5] - s[6])),
                a * math.sqrt(s[9] / (1 - s[9]) * s[9])]
    assert torch.isfinite(std).all(), (f"std {std.tolist()}: Δt < 0, so take √|Δt|; at t = 1 take 1 − t at the next "
                                       f"sigma")
    hint = " That is σ_t without √|Δt|." if close(std[1], expected[1] / math.sqrt(s[5] - s[6]), 1e-4) else ""
    # bound: ~8 roundings in any order (1 − s[1], s[5] − s[6] exact), stds ≤ 0.7: 8u·0.7 = 3.4e-7; we allow 1e-6
    assert close(std, expected, 1e-6), f"std = σ_t √|Δt| = {expected}, not {std.tolist()}.{hint}"


def test_exercise_8_the_sde_keeps_the_flows_marginals_on_gaussian_data():
    """x_0 ~ N(0.5, 0.6²), whose velocity E[ε − x_0 | x_t] is known in closed form: from x_1 ~ N(0, 1), 100 SDE steps
    must end with the data's mean and variance (up to Euler–Maruyama's error)."""
    m, s, n = 0.5, 0.6, 20_000
    sched = flow_scheduler(100, 1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, generator=g)
    for j, t in enumerate(sched.timesteps):
        tf = sched.sigmas[j].item()
        v = (tf - (1 - tf) * s**2) / ((1 - tf) ** 2 * s**2 + tf**2) * (x - (1 - tf) * m) - m
        mean, std = ddpo.flow_sde_step(sched, v, x, t.expand(n), 0.7)
        x = mean + std * torch.randn(n, 1, generator=g)
    # statistical: 0.02 is 4.7 standard errors of the mean (0.6/√20,000), 0.05 is 5 of the variance's relative one
    # (√(2/n) = 0.01), less Euler–Maruyama's bias
    assert abs(x.mean().item() - m) < 0.02 and abs(x.var().item() / s**2 - 1) < 0.05, (
        f"the samples end with mean {x.mean().item():.3f} and variance {x.var().item():.3f}, the data has {m} and "
        f"{s**2:.2f}: the drift needs the correction σ_t²/(2t)·(x_t + (1 − t)·v) that keeps the flow's marginals")
