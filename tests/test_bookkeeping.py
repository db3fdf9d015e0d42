"""Tests of the bookkeeping around the formulas: which step's numbers a loss takes, flags whose 0 is a value, the
state a resumed run must carry over, and which epochs write a checkpoint or evaluate. Each against values set up
by hand or a run trained straight, never against a copy of the code under test.

    python -m pytest -q tests/test_bookkeeping.py
"""
import copy
import dataclasses
import json
import random

import numpy as np
import pytest
import torch

import ddpo
from world import tiny_world
from plumbing import training_run

SMALL = ["--num-steps", "2", "--samples-per-epoch", "4", "--samples-per-prompt", "2", "--sample-batch-size", "4",
         "--num-minibatches", "2", "--train-batch-size", "2"]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A Stable-Diffusion-1.x-shaped pipeline with random weights (as test_paper_setup's): LoRA can go on its UNet."""
    torch.manual_seed(0)
    return tiny_world.save_sd_style_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


# --------------------------------------------------------------------------------------------------------
# Per-step quantities are indexed by the trained step
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo, per_pass, variant", [
    pytest.param("is", 1, "", id="is-1"), pytest.param("sf", 1, "", id="sf-1"), pytest.param("is", 2, "", id="is-2"),
    pytest.param("sf", 3, "", id="sf-3"), pytest.param("is", 2, "kl", id="is-2-kl"),
    pytest.param("sf", 2, "per-sample", id="sf-2-per-sample")])
def test_each_trained_step_takes_its_own_advantage_old_log_prob_and_states(monkeypatch, algo, per_pass, variant):
    """DPOK's per-step advantages (B, T) with --timestep-fraction 0.75: each sample trains on 3 of its T = 4 steps,
    drawn in its own order. The loss of sample i's step j must take A[i, j] and the stored log π_θold of step j, and
    rescore s_t = (states[i, j], timesteps[j], c_i) towards the action a_t = states[i, j + 1].

    --timesteps-per-pass k stacks k of each sample's steps into one pass (k = 2: passes of 2 and 1 steps; k = 3: one
    pass): the same (sample, step) pairs as one step a pass, each with the weight 1 / (3 steps · the minibatch's
    samples) in the gradient, and the logs weigh every step alike. Variants: with DPOK's KL (--kl-coef, to a reference
    model that differs from θ), and with one advantage per sample (B,), every step of sample i taking A_i."""
    models = ddpo.load_models("tiny", "cpu")
    flags = ["--num-steps", "4", "--algo", algo, "--timestep-fraction", "0.75", "--samples-per-epoch", "4",
             "--samples-per-prompt", "1", "--num-minibatches", "2", "--train-batch-size", "2"]
    flags += {"": ["--advantage", "value"], "kl": ["--advantage", "value", "--kl-coef", "0.5"], "per-sample": []}[variant]
    args = ddpo.parse_args([*flags, "--timesteps-per-pass", str(per_pass)])
    if variant == "kl":  # π_pre: the denoiser with every weight moved a little, so that each row's KL differs
        moved = torch.Generator().manual_seed(0)
        reference = copy.deepcopy(models.denoiser).requires_grad_(False)
        for p in reference.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=moved))
        models = dataclasses.replace(models, reference=reference)
    traj = ddpo.rollout(models, ["cat", "dog", "cow", "pig"], args, ddpo.noise_generators(0, range(4)))
    B, T, n = 4, 4, 3
    minibatch = 2 if algo == "is" else 4  # sf: one minibatch of the whole round (its data must come from θ), 2 chunks
    A = torch.arange(B * T, dtype=torch.float32).view(B, T) / 8 - 1  # a distinct advantage per (sample, step)
    if variant == "per-sample":
        A = A[:, 0] * 3 + 0.1  # (B,): a distinct advantage per sample, none equal to any A[i, j] of the (B, T) one
    assert len(set(traj.log_probs.flatten().tolist())) == B * T  # and a distinct old log-prob

    calls = []  # one per rescore: what went into its state, its action and the estimator after it
    real_rescore, real_policy, real_log_prob = ddpo.rescore, ddpo.policy, ddpo.gaussian_log_prob
    real_is, real_sf, real_backward = ddpo.ddpo_is_loss, ddpo.ddpo_sf_loss, ddpo.backward

    def rescore(m, tr, rows, steps, *rest):
        calls.append({"rows": rows.tolist(), "steps": steps.tolist()})
        log_prob, kl = real_rescore(m, tr, rows, steps, *rest)
        calls[-1].update(log_prob=log_prob.detach().clone(), kl=None if kl is None else kl.detach().clone())
        return log_prob, kl

    def policy(m, x_t, t, cond, *rest):  # θ's call, then (with the KL) π_pre's, each on the same states
        calls[-1].setdefault("policy", []).append(dict(
            model=(m.denoiser is models.denoiser, m.denoiser is models.reference), x_t=x_t.clone(), t=t.clone(),
            c=cond["encoder_hidden_states"].clone()))
        return real_policy(m, x_t, t, cond, *rest)

    def gaussian_log_prob(x_prev, *rest):
        calls[-1]["x_prev"] = x_prev.clone()
        return real_log_prob(x_prev, *rest)

    def is_loss(log_prob, old, adv, clip_range):
        calls[-1].update(loss_log_prob=log_prob.detach().clone(), old=old.clone(), adv=adv.clone())
        # the first row's old log-prob moved by 0.1, so that passes of 4 and 2 rows clip and diverge by different
        # fractions (at lr = 0 every ratio is 1 up to rounding): the logs' weighting of passes can then show
        out = real_is(log_prob, old - 0.1 * (torch.arange(len(old)) == 0), adv, clip_range)
        calls[-1].update(estimator=out[0].item(), approx_kl=out[1].item(), clipfrac=out[2].item())
        return out

    def sf_loss(log_prob, adv):
        calls[-1].update(loss_log_prob=log_prob.detach().clone(), adv=adv.clone())
        out = real_sf(log_prob, adv)
        calls[-1]["estimator"] = out.item()
        return out

    def backward(loss, scale, *rest):
        calls[-1].update(loss=loss.item(), scale=scale)
        return real_backward(loss, scale, *rest)

    for name, spy in (("rescore", rescore), ("policy", policy), ("gaussian_log_prob", gaussian_log_prob),
                      ("ddpo_is_loss", is_loss), ("ddpo_sf_loss", sf_loss), ("backward", backward)):
        monkeypatch.setattr(ddpo, name, spy)
    optimizer = torch.optim.SGD([p for p in models.denoiser.parameters() if p.requires_grad], lr=0.0)

    def train(args):
        calls.clear()
        logs = ddpo.train_round(models, optimizer, traj, A, torch.zeros(B), args, torch.Generator().manual_seed(0),
                                ddpo.encode_prompts(models, [""]))
        return logs, [(i, j) for call in calls for i, j in zip(call["rows"], call["steps"])]

    one_a_pass = train(ddpo.parse_args(flags))[1]  # --timesteps-per-pass 1: the steps as drawn
    logs, pairs = train(args)
    trained = {i: [] for i in range(B)}
    for call in calls:
        for m, (i, j) in enumerate(zip(call["rows"], call["steps"])):
            trained[i].append(j)
            assert call["adv"][m] == (A[i] if variant == "per-sample" else A[i, j]), (i, j)
            if algo == "is":
                assert call["old"][m] == traj.log_probs[i, j], (i, j)
            for state in call["policy"]:
                assert torch.equal(state["x_t"][m], traj.states[i, j]) and state["t"][m] == traj.timesteps[j]
                assert torch.equal(state["c"][m], traj.cond["encoder_hidden_states"][i])
            assert torch.equal(call["x_prev"][m], traj.states[i, j + 1]), (i, j)
        # θ first; π_pre (the reference model) second, only with the KL
        assert [state["model"] for state in call["policy"]] == [(True, False)] + [(False, True)] * (variant == "kl")
        assert torch.equal(call["loss_log_prob"], call["log_prob"])  # the estimator gets the rescored log-prob
        assert (call["kl"] is None) == (variant != "kl")
        if variant == "kl":  # the pass's loss: the estimator's + β_KL · the pass's mean KL, its rows weighed alike;
            # float32: the mean's rounding, then the sum's (×0.5 is exact), each ≤ 2^-24 of the magnitudes
            kl_term = 0.5 * call["kl"].mean().item()
            assert len(set(call["kl"].tolist())) == len(call["kl"])  # not one KL broadcast to every row
            # and the term far above the tolerance, or leaving it out would pass (measured: 3e-4 to 0.034 against
            # estimators of 0.38 to 0.68 in magnitude, 13,000 to 1.1 million times 2^-24 of them)
            assert kl_term > 1e3 * 2**-24 * abs(call["estimator"])
            assert abs(call["loss"] - (call["estimator"] + kl_term)) <= 4 * 2**-24 * (abs(call["estimator"]) + kl_term)
        # the loss is a mean over the pass's rows: each (sample, step) row weighs scale / rows; float64 rounding of
        # share · k / n_timesteps and of this quotient, a few units of 2^-53
        assert call["scale"] / len(call["rows"]) == pytest.approx(1 / (n * minibatch), rel=1e-12), call["scale"]
    assert all(len(set(steps)) == len(steps) == n for steps in trained.values()), trained  # 3 distinct steps each
    # the test can tell step j from the loop's index k and from step 0: some sample's k-th step is not k
    assert any(steps != [0, 1, 2] for steps in trained.values()), trained
    assert sorted(pairs) == sorted(one_a_pass)  # the same (sample, step) pairs, however stacked
    passes = [per_pass] * (n // per_pass) + ([n % per_pass] if n % per_pass else [])  # k = 2: [2, 1]; k = 3: [3]
    rows = [len(call["rows"]) for call in calls]  # each pass: its steps of both samples of a chunk; 2 chunks
    assert rows == [2 * k for k in passes] * 2, rows
    # the logged loss: the mean over every trained step (a pass of k steps counts k times); float64 sums of ≤ 6
    # values, each off by ≤ 2^-53 of the running sum of magnitudes
    weights = [len(call["rows"]) / 2 for call in calls]
    logged = {"loss": [call["loss"] for call in calls]}
    if algo == "is":
        logged.update(approx_kl=[call["approx_kl"] for call in calls], clipfrac=[call["clipfrac"] for call in calls])
    if variant == "kl":
        logged["kl"] = [call["kl"].mean().item() for call in calls]
    assert set(logged) <= set(logs), logs
    for name, values in logged.items():
        expected = sum(w * v for w, v in zip(weights, values)) / sum(weights)
        assert abs(logs[name] - expected) <= 1e-12 * max(map(abs, values)), (name, logs[name], expected)


# --------------------------------------------------------------------------------------------------------
# Flags whose 0 is a value, not "unset"
# --------------------------------------------------------------------------------------------------------

def test_rwr_threshold_zero_keeps_the_rewards_at_or_above_zero():
    """--rwr-threshold 0 is C = 0, not the default 90th percentile (which here would keep only r = 2)."""
    r = torch.tensor([-3.0, -1.0, 0.0, 2.0])
    args = ddpo.parse_args(["--algo", "rwr-sparse", "--rwr-threshold", "0"])
    assert args.rwr_threshold == 0.0
    assert torch.equal(ddpo.rwr_weights(args, r, torch.zeros(4)), torch.tensor([0.0, 0.0, 2.0, 2.0]))  # 2 of 4 kept


def test_rwr_beta_zero_weights_every_sample_alike():
    """--rwr-beta 0: w = exp(0)/Z = 1 for every sample (the plain DDPM loss), not the default β = 1."""
    args = ddpo.parse_args(["--algo", "rwr", "--rwr-beta", "0"])
    r = torch.tensor([0.0, 1.0, 3.0])
    assert torch.equal(ddpo.rwr_weights(args, r, torch.zeros(3)), torch.ones(3))


# --------------------------------------------------------------------------------------------------------
# State a resumed run must carry over
# --------------------------------------------------------------------------------------------------------

def noisy_reward(images, prompts):
    """A user's reward that draws from each global RNG it may use: torch's, numpy's and python's own."""
    n = len(prompts)
    return (images.mean((1, 2, 3)) + torch.rand(n) + torch.from_numpy(np.random.rand(n)).float()
            + torch.tensor([random.random() for _ in range(n)]))


def test_a_reward_drawing_from_the_global_rngs_gives_the_same_numbers_after_resume(tmp_path):
    """torch's, numpy's and python's global RNGs are seeded by --seed and saved in the checkpoint; so is the prompt
    drawer (ten prompts, two a round, so each round draws others)."""
    (tmp_path / "ten.txt").write_text("".join(f"{c}\n" for c in ("cat", "dog", "cow", "pig", "hen", "fox", "owl",
                                                                  "bee", "ant", "elk")))
    common = ["--reward", "test_bookkeeping:noisy_reward", *SMALL, "--prompts", str(tmp_path / "ten.txt"),
              "--seed", "5", "--save-every", "1", "--out-dir", str(tmp_path)]
    ddpo.main([*common, "--epochs", "2", "--run-name", "straight"])
    ddpo.main([*common, "--epochs", "1", "--run-name", "halves"])
    ddpo.main(["--resume", str(tmp_path / "halves"), "--epochs", "2"])
    straight, halves = metrics(tmp_path / "straight"), metrics(tmp_path / "halves")
    assert [r["epoch"] for r in halves] == [0, 1, 2]
    assert without_times(straight) == without_times(halves)


def test_a_run_continuing_a_lora_run_takes_that_run_as_pi_pre(sd_dir, tmp_path, monkeypatch):
    """--model RUN with a LoRA run and --kl-coef > 0: π_pre is RUN's model (base + RUN's adapter), as it is RUN's
    weights under full fine-tuning, not the base model with the adapter off. Its mean equals a separately loaded
    RUN's, and the first KL, at θ = RUN's, is 0."""
    ddpo.main(["--model", str(sd_dir), "--lora-rank", "4", "--lr", "1e-2", *SMALL, "--epochs", "1",
               "--out-dir", str(tmp_path), "--run-name", "first"])
    seen, real = [], ddpo.pretrained_mean

    def pretrained_mean(models, *state):
        seen.append((state, real(models, *state)))
        return seen[-1][1]

    monkeypatch.setattr(ddpo, "pretrained_mean", pretrained_mean)
    ddpo.main(["--model", str(tmp_path / "first"), "--kl-coef", "1", *SMALL, "--epochs", "1",
               "--out-dir", str(tmp_path), "--run-name", "second"])
    assert metrics(tmp_path / "second")[-1]["losses/kl"] > 0  # the adapter moved away from RUN's
    state, mean_pre = seen[0]
    first, base = ddpo.load_models(str(tmp_path / "first"), "cpu"), ddpo.load_models(str(sd_dir), "cpu")
    for models in (first, base):
        models.scheduler.set_timesteps(2)  # the policy step needs T, as rollout sets it
    with torch.no_grad():
        assert torch.equal(mean_pre, ddpo.policy(first, *state)[0])
        assert not torch.allclose(mean_pre, ddpo.policy(base, *state)[0])  # RUN's adapter does change the mean
        mean, sigma_t = ddpo.policy(first, *state)
    assert torch.equal(ddpo.gaussian_kl(mean, mean_pre, sigma_t), torch.zeros(len(mean)))


# --------------------------------------------------------------------------------------------------------
# Which epochs write a checkpoint, which evaluate
# --------------------------------------------------------------------------------------------------------

def run_recording(monkeypatch, argv):
    """ddpo.main(argv); returns the epochs it wrote a checkpoint after and the epochs it evaluated (its grids). An
    evaluation after --epochs fails at once (a run that ignored --epochs would otherwise train on to its default)."""
    saved, evaluated, last = [], [], int(argv[argv.index("--epochs") + 1])
    real_save, real_grid = training_run.save_checkpoint, ddpo.save_eval_grid

    def grid(*a):
        evaluated.append(int(a[-1].name.split("_")[1]))
        assert evaluated[-1] <= last, f"evaluated epoch {evaluated[-1]} of a run of --epochs {last}"
        return real_grid(*a)

    monkeypatch.setattr(training_run, "save_checkpoint", lambda d, epoch, *a: saved.append(epoch) or real_save(d, epoch, *a))
    monkeypatch.setattr(ddpo, "save_eval_grid", grid)
    try:
        ddpo.main(argv)
    finally:  # a second call (a resume) records with its own --epochs, not through this call's recorders
        monkeypatch.setattr(training_run, "save_checkpoint", real_save)
        monkeypatch.setattr(ddpo, "save_eval_grid", real_grid)
    return saved, evaluated


def test_checkpoints_every_save_every_epochs_and_after_the_last_and_evaluation_every_epoch(tmp_path, monkeypatch):
    """--epochs 5 --save-every 2: checkpoints after 2, 4 and 5 (only the newest stays on disk), an evaluation at the
    pretrained model (0) and after every epoch; resumed to 7, checkpoints after 6 and 7 and no second epoch 0."""
    common = [*SMALL, "--out-dir", str(tmp_path)]
    saved, evaluated = run_recording(monkeypatch, [*common, "--epochs", "5", "--save-every", "2", "--run-name", "r"])
    assert saved == [2, 4, 5] and evaluated == [0, 1, 2, 3, 4, 5]
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["epoch_0005"]
    saved, evaluated = run_recording(monkeypatch, ["--resume", str(tmp_path / "r"), "--epochs", "7"])
    assert saved == [6, 7] and evaluated == [6, 7]
    assert [r["epoch"] for r in metrics(tmp_path / "r")] == list(range(8))


def test_save_every_beyond_the_epochs_writes_one_checkpoint_after_the_last(tmp_path, monkeypatch):
    saved, evaluated = run_recording(monkeypatch, [*SMALL, "--out-dir", str(tmp_path), "--epochs", "3",
                                                   "--save-every", "5", "--run-name", "r"])
    assert saved == [3] and evaluated == [0, 1, 2, 3]
