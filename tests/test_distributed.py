"""Several processes (torchrun, gloo on CPU): N processes must take exactly the update of one.

Each case runs ddpo.main through this same file's worker, in pytest's own process on one thread and under
`torchrun --nproc_per_node 2`. Every process records what it sampled, scored and computed each epoch (see `probe`),
and the records are compared, epoch by epoch, from the same state: epoch 1 from the pretrained model, epoch 2 with
the two processes resuming the one process's checkpoint of epoch 1 (weights, optimizer, buffers, V_φ, generators).

What must be equal is made to compute alike, and compared with ==: the two processes sample in the same batches
as the one process (a process's share is a whole number of its sampling batches), so the two processes' samples,
put side by side, are the one process's bit for bit, and so are the rewards and every process's advantages.

The update is equal by construction in the EXACT cases: minibatches of 2 samples, one sample a backward (chunks of
--train-batch-size 1) and one trained timestep. One process then adds the two samples' gradients g_a + g_b; two
processes compute the same g_a and g_b, one each (or one holds both, in the same order, and the other adds zeros),
and the all-reduce adds them: g_a + g_b = g_b + g_a exactly in floating point. Clipping and AdamW then see the same
numbers, so the weights after the round are compared with ==, and a small wrong version of the sum (an all-reduce
in fp16, as torch's fp16_compress_hook does) fails. In the other cases the processes sum their gradients in another
order than one process does (chunks of several samples, a backward for each of several timesteps), so the gradient
norm and the weights after the round are compared with bounds derived beside them, which catch a share dropped or
doubled.

    python -m pytest -q tests/test_distributed.py
"""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository

COMMON = ["--epochs", "2", "--num-steps", "3", "--samples-per-epoch", "8", "--samples-per-prompt", "2",
          "--sample-batch-size", "4", "--prompts", "simple_animals", "--device", "cpu", "--seed", "3",
          "--buffer-size", "4", "--min-count", "4", "--save-every", "1", "--reward", "test_distributed:brightness"]
CASES = {
    # DDPO_IS: 12 samples, two minibatches of 6 accumulated in chunks of ≤ 4; per-prompt groups of 4, so samples
    # 4-7 form a group that spans the two processes; each process samples its 6 in two batches of 3
    "is": ["--algo", "is", "--samples-per-epoch", "12", "--samples-per-prompt", "4", "--num-minibatches", "2",
           "--train-batch-size", "4", "--sample-batch-size", "3"],
    # SF with batch advantages (the whole round's statistics)
    "sf": ["--algo", "sf", "--train-batch-size", "2", "--advantage", "batch"],
    # RWR in minibatches of 2: some hold no sample of one of the processes (that process still steps, with the
    # others' gradients; under fp16 its loss scaler too: test_paper_setup.py, as fp16 on CPU is 30x slower)
    "rwr": ["--algo", "rwr", "--num-minibatches", "4", "--train-batch-size", "1"],
    # DPOK's KL and value baseline (one trained timestep of the 3: int(0.34 · 3) = 1)
    "dpok": ["--algo", "is", "--num-minibatches", "4", "--train-batch-size", "1", "--timestep-fraction", "0.34",
             "--advantage", "value", "--kl-coef", "0.5", "--value-steps", "2", "--value-lr", "1e-2"],
    # Flow-GRPO: the tiny flow model's SDE policy, with DPOK's KL
    "flow": ["--model", "tiny-flow", "--algo", "is", "--num-minibatches", "4", "--train-batch-size", "1",
             "--timestep-fraction", "0.34", "--kl-coef", "0.5"],
}
EXACT = {"rwr", "dpok", "flow"}  # an update equal by construction (the module's docstring); the others are bounded


def flat_weights(models):
    return torch.cat([p.detach().flatten() for p in models.denoiser.parameters() if p.requires_grad]).clone()


def probe(records):
    """Wraps ddpo's functions to append, each epoch, what this process saw: its samples x_0, its rewards, the
    round's advantages, the logged losses and its weights after the round. Returns a function that unwraps them."""
    import ddpo

    originals = {}

    def wrap(name, record):
        real = originals[name] = getattr(ddpo, name)

        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            record(out, *args)
            return out
        setattr(ddpo, name, wrapped)

    def sampled(out, models, prompts, args, generators, batch_size, desc="sampling"):
        if desc == "sampling":  # training samples, not the evaluation grid's
            records.append({"x0": out[0].states[:, -1], "prompts": prompts, "before": flat_weights(models)})

    wrap("sample", sampled)
    wrap("gather", lambda out, x: records[-1].setdefault("r", out) if x.ndim == 1 else None)
    wrap("compute_advantages", lambda out, *a: records[-1].update(adv=out[0]))
    flat = lambda module: torch.cat([p.detach().flatten() for p in module.parameters()]).clone()  # noqa: E731
    wrap("value_advantages", lambda out, value, *a: records[-1].update(adv=out[0], value_before=flat(value)))
    wrap("train_round", lambda out, models, *a: records[-1].update(logs=out, weights=flat_weights(models)))
    wrap("fit_value", lambda out, value, *a: records[-1].update(value=flat(value)))
    return lambda: [setattr(ddpo, name, real) for name, real in originals.items()]


def brightness(images, prompts):
    """A smooth reward, so that samples equal to rounding get rewards equal to rounding (a JPEG size jumps a byte)."""
    return images.mean(dim=(1, 2, 3))


def raise_on_process_1(images, prompts):
    """A reward that fails on process 1 in epoch 2 (its second call), and is the JPEG reward elsewhere."""
    import rewards

    raise_on_process_1.calls = getattr(raise_on_process_1, "calls", 0) + 1
    if os.environ.get("RANK") == "1" and raise_on_process_1.calls >= 2:
        raise RuntimeError("the reward server went away")
    return rewards.jpeg_compressibility(images, prompts)


def slow_on_process_1(images, prompts):
    """A reward that takes 4 minutes on process 1: the others must stop at the gather after --collective-timeout."""
    import rewards

    if os.environ.get("RANK") == "1":
        time.sleep(240)
    return rewards.jpeg_compressibility(images, prompts)


def worker(out, *cases):
    """Runs each case (name=argv…) in this process (one of torchrun's, or alone) and saves the records. Besides
    ddpo's flags, argv may hold: --resume-after-1 (one epoch, then --resume for the second), with --keep-epoch-1 DIR
    (a copy of the run folder after epoch 1 goes to DIR); or --resume-from DIR (--resume a copy of that folder)."""
    import shutil

    import ddpo

    rank = os.environ.get("RANK", "0")
    for case in cases:
        name, argv = case.split("=", 1)
        records = []
        unwrap = probe(records)
        argv = argv.split()
        run = argv[argv.index("--out-dir") + 1] + "/" + argv[argv.index("--run-name") + 1]
        try:  # (in pytest's process, a failed run must not leave ddpo's functions wrapped for later tests)
            if "--resume-from" in argv:
                ddpo.main(["--resume", argv[argv.index("--resume-from") + 1], "--epochs", "2"])
            elif "--resume-after-1" in argv:
                argv.remove("--resume-after-1")
                keep = argv.pop(argv.index("--keep-epoch-1") + 1) if "--keep-epoch-1" in argv else None
                argv = [a for a in argv if a != "--keep-epoch-1"]
                ddpo.main(argv + ["--epochs", "1"])
                if keep:
                    shutil.copytree(run, keep)
                ddpo.main(["--resume", run, "--epochs", "2"])
            else:
                ddpo.main(argv)
        finally:
            unwrap()
        torch.save(records, Path(out) / f"{name}.rank{rank}.pt")


def worker_argv(tmp_path, tag, cases):
    """worker's arguments: its records folder out{tag}, then one name=argv per case, run in runs{tag}."""
    out = tmp_path / f"out{tag}"
    out.mkdir(exist_ok=True)
    runs = tmp_path / f"runs{tag}"
    return [str(out)] + [f"{name}={' '.join(COMMON + extra + ['--out-dir', str(runs), '--run-name', name])}"
                         for name, extra in cases]


def start(tmp_path, processes, cases, tag=None):
    """Starts worker over cases under torchrun; returns a function that waits for it: (exit status, stderr). Its
    records go to out{tag} (default: the number of processes), its runs to runs{tag}."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # one thread each (2 cores), and the same float arithmetic in both
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # ddpo, from tests/
    tag = tag or str(processes)
    log = tmp_path / f"stderr{tag}.txt"
    with open(log, "w") as stderr:  # a file, not a pipe, which nobody reads while the reference runs
        proc = subprocess.Popen(torchrun + [__file__, *worker_argv(tmp_path, tag, cases)], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=ROOT)

    def wait(timeout=600):
        try:
            proc.wait(timeout=timeout)
        finally:  # torchrun and the processes it started: none is left running, whatever happened
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return proc.returncode, log.read_text()
    wait.proc = proc  # the launcher, to signal
    return wait


def launch(tmp_path, processes, cases, timeout=600):
    """Runs worker over cases under torchrun and waits; returns (exit status, stderr)."""
    return start(tmp_path, processes, cases)(timeout)


def in_this_process(tmp_path, cases):
    """The one-process reference, run in pytest's own process (no second import of torch and diffusers), on one
    thread like each torchrun process: each case's epoch 1, a copy of its run folder then (epoch1/NAME), epoch 2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    keep = lambda name: ["--resume-after-1", "--keep-epoch-1", str(tmp_path / "epoch1" / name)]  # noqa: E731
    try:
        worker(*worker_argv(tmp_path, "1", [(name, extra + keep(name)) for name, extra in cases]))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def records(request, tmp_path_factory):
    """The records of the cases the selected tests need (all of them in a full run; the mutation check selects one),
    from one process and from two: one torchrun launch running its cases one after the other, and meanwhile the
    same cases in this process. Its tests share one xdist group, so that under pytest -n 2 this runs once."""
    here = [item for item in request.session.items if item.module is request.module]
    compared = [name for name in CASES if any(getattr(item, "callspec", None) and item.callspec.params.get("case") == name
                                              for item in here)]  # one process against two
    resume = any(item.name.startswith("test_resume") for item in here)  # two processes, "is" unbroken and resumed
    tmp = tmp_path_factory.mktemp("dist")
    cases = [(name, CASES[name]) for name in compared]
    # two processes: each compared case's epoch 1; for the resume test, "is" unbroken over 2 epochs and resumed
    two = [(name, extra + ["--epochs", "1"]) for name, extra in cases] + \
        ([("is-unbroken", CASES["is"]), ("is-resumed", CASES["is"] + ["--resume-after-1"])] if resume else [])
    start_time = time.time()
    two_processes = start(tmp, 2, two)  # meanwhile the one-process reference runs here, on the other core
    try:
        if cases:
            in_this_process(tmp, cases)
            print(f"1 process: {time.time() - start_time:.1f} s")
    finally:
        code, stderr = two_processes()
    assert code == 0, stderr[-3000:]
    if cases:  # two processes take epoch 2 from the one process's state after epoch 1
        code, stderr = start(tmp, 2, [(name, ["--resume-from", str(tmp / "epoch1" / name)]) for name, _ in cases],
                             tag="2-epoch2")()
        assert code == 0, stderr[-3000:]
    print(f"2 processes: {time.time() - start_time:.1f} s")
    load = lambda name, tag, rank: torch.load(tmp / f"out{tag}" / f"{name}.rank{rank}.pt", weights_only=False)  # noqa: E731
    out = {name: {"one": load(name, "1", 0), "two": [load(name, "2", r) + load(name, "2-epoch2", r) for r in (0, 1)]}
           for name, _ in cases}
    out.update({name: {"two": [load(name, "2", r) for r in (0, 1)]} for name, _ in two if name not in out})
    return out, tmp


def optimizer_steps(case):
    """Optimizer steps in a round of the case: sf takes one, the others --num-minibatches (one inner epoch)."""
    argv = CASES[case]
    return 1 if "sf" in argv else int(argv[argv.index("--num-minibatches") + 1]) if "--num-minibatches" in argv else 2


def adam_rounding_bound(lr, steps, n_weights):
    """How far apart two Adam updates of n_weights weights can be when their gradients differ only by the order of
    their sums (the comment in test_two_processes_take_the_update_of_one derives it)."""
    return 2 * lr * steps * math.sqrt(2.5e-4 * n_weights + 10)


@pytest.mark.xdist_group("torchrun")
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_take_the_update_of_one(records, case):
    one, (p0, p1) = records[0][case]["one"], records[0][case]["two"]
    assert len(one) == len(p0) == len(p1) == 2  # epochs
    for epoch, (a, b0, b1) in enumerate(zip(one, p0, p1), 1):
        where = f"{case}, epoch {epoch}"
        assert b0["prompts"] + b1["prompts"] == a["prompts"], f"{where}: the processes drew other prompts"
        assert len(b0["x0"]) == len(b1["x0"]) == len(a["x0"]) // 2, f"{where}: each process samples half the round"
        # the same state: epoch 1's pretrained weights, epoch 2's resumed from the one process's checkpoint
        assert torch.equal(b0["before"], a["before"]) and torch.equal(b1["before"], a["before"]), where
        # the same weights, noise and sampling batches: the same numbers, bit for bit, on any machine
        assert torch.equal(torch.cat([b0["x0"], b1["x0"]]), a["x0"]), \
            f"{where}: the two processes' samples are not the one process's"
        for b in (b0, b1):
            assert torch.equal(b["r"], a["r"]), f"{where}: gathered rewards differ"
            assert torch.equal(b["adv"], a["adv"]), f"{where}: advantages differ (from one process's rewards only?)"
            if case in EXACT:  # the same additions of the same numbers (the module's docstring)
                assert torch.equal(b["weights"], a["weights"]), \
                    f"{where}: the update differs from one process's by {(b['weights'] - a['weights']).norm():.3g}"
            else:
                # The gradient is the same sum in another order: a chunk's backward reduces over its rows and
                # positions, and the processes' parts are added by all-reduce. Reordering a float32 sum of n terms
                # moves it by at most 2 n u Σ|terms| (u = 2^-24). The longest reduction here is a convolution weight's
                # gradient over a chunk: n ≤ 4 rows × 8 × 8 positions = 256, so ≤ 3e-5 of Σ|terms|; with terms that
                # cancel to a tenth of their size and about ten layers passing it on, the norm may move by 3e-3 of
                # itself. We allow 1e-2; a process that drops its share or double-counts moves it by a factor.
                assert b["logs"]["grad_norm"] == pytest.approx(a["logs"]["grad_norm"], rel=1e-2), \
                    f"{where}: gradient norm {b['logs']['grad_norm']} with two processes, {a['logs']['grad_norm']} with one"
                # The round's update, as a whole. Adam moves a weight by lr·m̂/(√v̂ + 1e-8): by lr·sign(g) in its
                # first step, and in its second by lr times a ratio of the two gradients that does not depend on
                # their scale. A gradient's relative rounding δ moves its weight's step by about lr·δ, ~1e-8 for a typical
                # δ of 5e-5 (√n·u = 6e-6 over a sum of ~10^4 terms, cancelled tenfold): most of the difference
                # measured here, where 17% of 1.4M weights differ, each by ~5e-9 (a norm of 2e-7 to 1.2e-4 over the
                # cases). A step moves by up to 2·lr only where the gradient is within its rounding, 3e-5·Σ|terms|
                # (above), of 0. Gradients spread around 0 on the scale of their cancelled size, 0.1·Σ|terms|, with
                # a normal density there (0.4 / scale), put 2 · 3e-5 / 0.1 · 0.4 ≈ 2.4e-4 of the weights that close
                # to 0. adam_rounding_bound allows 2.5e-4 of them to move by 2·lr a step, and 10 more. That separates
                # a share dropped or doubled (every weight's step moves), not a small wrong version of the sum such
                # as an all-reduce in fp16 (1.4e-3 to 5.1e-3, under the bound): the EXACT cases catch that.
                update, reference = b["weights"] - a["before"], a["weights"] - a["before"]
                assert (update - reference).norm() <= adam_rounding_bound(2e-4, optimizer_steps(case), len(reference)), \
                    f"{where}: the update differs from one process's"
            if "value" in a:  # DPOK's V_φ: the same before its fit; its fit sums each process's whole share in one
                # backward, so it is bounded as the policy's update is (its Adam steps: the same argument)
                assert torch.equal(b["value_before"], a["value_before"]), f"{where}: V_φ differs before its fit"
                v_update, v_reference = b["value"] - a["value_before"], a["value"] - a["value_before"]
                assert (v_update - v_reference).norm() <= adam_rounding_bound(1e-2, 2, len(v_reference)), \
                    f"{where}: V_φ's fit differs"
        assert torch.equal(b0["weights"], b1["weights"]), f"{where}: the two processes hold different weights"
        if "value" in a:
            assert torch.equal(b0["value"], b1["value"]), f"{where}: the two processes hold different V_φ"


@pytest.mark.xdist_group("torchrun")
def test_resume_under_two_processes_equals_an_unbroken_run(records):
    unbroken, resumed = records[0]["is-unbroken"]["two"], records[0]["is-resumed"]["two"]
    for rank in (0, 1):
        assert len(resumed[rank]) == 2
        torch.testing.assert_close(resumed[rank][1]["x0"], unbroken[rank][1]["x0"], atol=0, rtol=0)
        torch.testing.assert_close(resumed[rank][1]["adv"], unbroken[rank][1]["adv"], atol=0, rtol=0)
        torch.testing.assert_close(resumed[rank][1]["weights"], unbroken[rank][1]["weights"], atol=0, rtol=0)
    runs = records[1] / "runs2"
    assert sorted(p.name for p in (runs / "is-resumed" / "checkpoints").iterdir()) == ["epoch_0002"]
    metrics = (runs / "is-resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 3  # epoch 0 (the base), 1 and 2: written once, by process 0


@pytest.mark.xdist_group("torchrun")  # after the fixture's launch, not beside it: a 2-core machine stalls 5 torch processes
@pytest.mark.parametrize("reward, timeout, expected", [
    ("raise_on_process_1", 30, r"^error: process 1: reward '.*raise_on_process_1' raised RuntimeError: the reward "
                               r"server went away on sample 0 \(prompt '.*'\) in epoch 2; the last good checkpoint is .*epoch_0001"),
    ("slow_on_process_1", 10, r"^error: process 0: a collective did not complete in epoch 1 \(.*\): another process "
                              r"stopped, or took longer than --collective-timeout 10 s"),
])
def test_a_failure_on_one_process_stops_both_with_one_line(tmp_path, reward, timeout, expected):
    """--collective-timeout: long enough that a busy machine's stall (process 0 writing epoch 0's grid, a worker
    beside it) is no failure, and for the slow reward well under its 4 minutes (the launch itself, torch's import and
    epoch 0's evaluation, takes up to a minute on a loaded 2-core machine)."""
    import re

    start = time.time()
    code, stderr = launch(tmp_path, 2, [("run", ["--algo", "is", "--reward", f"test_distributed:{reward}",
                                                 "--collective-timeout", str(timeout)])], timeout=150)
    assert code != 0
    ours = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and re.match(expected, ours[0]), stderr[-3000:]
    assert time.time() - start < 150  # well before the slow reward's 4 minutes (each case takes ~45 s alone)
    if reward == "raise_on_process_1":
        assert [p.name for p in (tmp_path / "runs2" / "run" / "checkpoints").iterdir()] == ["epoch_0001"]



@pytest.mark.xdist_group("torchrun")
def test_sigterm_to_torchrun_stops_every_process_after_the_same_epoch_with_one_checkpoint(tmp_path):
    """A real SIGTERM to the launcher, as a batch scheduler sends it: torchrun forwards it to both processes, which
    agree to stop after the same epoch (a process stopping alone would leave the other at a collective until
    --collective-timeout); process 0 writes one checkpoint and says how to resume."""
    wait = start(tmp_path, 2, [("run", ["--algo", "is", "--epochs", "50", "--save-every", "100"])])
    run = tmp_path / "runs2" / "run"
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
        assert wait.proc.poll() is None and time.time() < deadline, "the run ended or stalled before the signal"
        time.sleep(0.05)
    wait.proc.send_signal(signal.SIGTERM)
    code, stderr = wait(120)
    epoch = len((run / "metrics.jsonl").read_text().splitlines()) - 1
    ours = [line for line in stderr.splitlines() if "interrupted after epoch" in line or line.startswith("error:")]
    assert code != 0 and ours == [f"interrupted after epoch {epoch}, checkpoint written: resume with --resume {run}"], \
        stderr[-3000:]
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"epoch_{epoch:04d}"]

if __name__ == "__main__":
    worker(sys.argv[1], *sys.argv[2:])
