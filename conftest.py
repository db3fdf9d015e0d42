"""Shared test helpers, and one thread per test process when the suite runs in parallel (pytest -n 2)."""
import hashlib
import math
import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, and in every process they start
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import ddpo  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


# A short run before the flags under test: a check that wrongly lets a run through ends it in seconds, not after
# the default 150 epochs (the flags under test come later, and win)
SHORT_RUN = ["--epochs", "1", "--num-steps", "2", "--samples-per-epoch", "4", "--samples-per-prompt", "4"]


def file_digests(folder):
    """Every file under folder, by path relative to it, as its SHA-256. Compare these, not the bytes: when files
    differ, pytest's report on two dicts of PNG bytes runs difflib over them for minutes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def main_error(capsys):
    """main_error(*argv, entry=ddpo.main): runs a command's main in this process and returns its error line, after
    checking what a user sees: a non-zero exit, one line that starts with "error:", and nothing else on stderr (no
    traceback, no library warning). In-process, as a subprocess per case would spend most of its time importing torch."""
    def run(*argv, entry=None):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            (entry or ddpo.main)(list(argv))
        line = str(stop.value.code)
        assert stop.value.code not in (None, 0) and line.startswith("error: ") and "\n" not in line, line
        assert capsys.readouterr().err.strip() == "", "something besides the error line went to stderr"
        return line
    return run


def pytest_collection_modifyitems(items):
    """The torchrun tests first (stable sort): under pytest -n 2 their xdist group, the longest chain of the suite
    (one launch, then the two failure launches), starts at once on one worker while the other takes the rest."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)


def rescoring_rounding_bound(models, traj, rows, j, uncond, args):
    """How far rounding alone can move log π(x_{j+1} | x_j) of `rows` when they are re-scored as their own batch
    rather than in the batch of all of traj's samples they were drawn in, (b,). Derived per row from what it is made
    of, for either policy:
    - δ: the guided prediction ε̂ = ε_u + w (ε_c − ε_u) of the same inputs in the two layouts, measured (the kernels'
      blocking differs by batch size, so its low bits do too: this is the only input that differs);
    - μ is affine in ε̂ (DDIM eq. 12; the flow SDE's drift): δμ ≤ k δ, with k its slope, read off the step itself;
    - log π is the mean over the D values of −z²/2 − log σ − ½ log 2π with z = (x − μ)/σ, so a shift δμ moves it by
      at most mean|z| δμ/σ + δμ²/(2σ²), and mean|z| ≤ √(mean z²), which the stored log-prob itself gives;
    - plus the mean's own summation: D values of magnitude ≤ |log π| + 1 in any order, ≤ D · u · (|log π| + 1)."""
    x_t, t, w = traj.states[:, j], traj.timesteps[j].expand(len(traj.prompts)), args.guidance_scale

    def guided(r):  # the unconditional rows, then the conditional ones, in one call: the layout policy() uses
        both = {k: torch.cat([ddpo.repeat(uncond, len(r))[k], traj.cond[k][r]]) for k in traj.cond}
        e_u, e_c = ddpo.denoise(models, torch.cat([x_t[r], x_t[r]]), torch.cat([t[r], t[r]]), both).float().chunk(2)
        return e_u + w * (e_c - e_u)

    with torch.no_grad():
        delta = (guided(torch.arange(len(x_t)))[rows] - guided(rows)).abs().flatten(1).max(1).values  # (b,)
        step = ddpo.flow_sde_step if models.flow else ddpo.ddim_step
        zero, x, noise = torch.zeros_like(x_t[:1]), x_t[:1], ddpo.noise_scale(models, args)
        (mu_0, sigma), (mu_1, _) = step(models.scheduler, zero, x, t[:1], noise), step(models.scheduler, zero + 1, x, t[:1], noise)
    k, sigma = (mu_1 - mu_0).abs().max().double(), sigma.flatten()[0].double()
    old = traj.log_probs[rows, j].double()
    rms_z = (-2 * (old + sigma.log() + 0.5 * math.log(2 * math.pi))).clamp(min=0).sqrt()
    u, D, shift = 2.0**-24, x_t[0].numel(), k * delta.double()
    return (rms_z * shift / sigma + shift**2 / (2 * sigma**2) + D * u * (old.abs() + 1)).float()
