"""Several processes (torchrun, gloo on CPU): N processes must take exactly the update of one.

Each case runs ddpo.main twice through this same file's worker: once in pytest's own process on one thread, once
under `torchrun --nproc_per_node 2`. Every process records what it sampled, scored and computed each epoch (see
`probe`), and the records are compared: the two processes' samples and rewards, put side by side, must be the one
process's; every process's advantages, logged gradient norms and weights must be the one process's.

    python -m pytest -q test_distributed.py
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

COMMON = ["--epochs", "2", "--num-steps", "3", "--samples-per-epoch", "8", "--samples-per-prompt", "2",
          "--sample-batch-size", "4", "--prompts", "simple_animals", "--device", "cpu", "--seed", "3",
          "--buffer-size", "4", "--min-count", "4", "--save-every", "1", "--reward", "test_distributed:brightness"]
CASES = {
    # DDPO_IS: 12 samples, two minibatches of 6 accumulated in chunks of ≤ 4; per-prompt groups of 4, so samples
    # 4-7 form a group that spans the two processes; each process samples its 6 in batches of 4 and 2
    "is": ["--algo", "is", "--samples-per-epoch", "12", "--samples-per-prompt", "4", "--num-minibatches", "2",
           "--train-batch-size", "4"],
    # SF with batch advantages (the whole round's statistics)
    "sf": ["--algo", "sf", "--train-batch-size", "2", "--advantage", "batch"],
    # RWR in minibatches of 2: some hold no sample of one of the processes (that process still steps, with the
    # others' gradients; under fp16 its loss scaler too: test_paper_setup.py, as fp16 on CPU is 30x slower)
    "rwr": ["--algo", "rwr", "--num-minibatches", "4", "--train-batch-size", "2"],
    # DPOK's KL and value baseline
    "dpok": ["--algo", "is", "--num-minibatches", "2", "--advantage", "value", "--kl-coef", "0.5", "--value-steps", "2",
             "--value-lr", "1e-2"],
    # Flow-GRPO: the tiny flow model's SDE policy, with DPOK's KL
    "flow": ["--model", "tiny-flow", "--algo", "is", "--num-minibatches", "2", "--kl-coef", "0.5"],
}


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
    wrap("value_advantages", lambda out, *a: records[-1].update(adv=out[0]))
    wrap("train_round", lambda out, models, *a: records[-1].update(logs=out, weights=flat_weights(models)))
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
    """A reward that takes a minute on process 1: the others must stop at the gather after --collective-timeout."""
    import rewards

    if os.environ.get("RANK") == "1":
        time.sleep(60)
    return rewards.jpeg_compressibility(images, prompts)


def worker(out, *cases):
    """Runs each case (name=argv…) in this process (one of torchrun's, or alone) and saves the records."""
    import ddpo

    rank = os.environ.get("RANK", "0")
    for case in cases:
        name, argv = case.split("=", 1)
        records = []
        unwrap = probe(records)
        argv = argv.split()
        try:  # (in pytest's process, a failed run must not leave ddpo's functions wrapped for later tests)
            if "--resume-after-1" in argv:  # one epoch, then --resume for the second
                argv.remove("--resume-after-1")
                run = argv[argv.index("--out-dir") + 1] + "/" + argv[argv.index("--run-name") + 1]
                ddpo.main(argv + ["--epochs", "1"])
                ddpo.main(["--resume", run, "--epochs", "2"])
            else:
                ddpo.main(argv)
        finally:
            unwrap()
        torch.save(records, Path(out) / f"{name}.rank{rank}.pt")


def worker_argv(tmp_path, processes, cases):
    """worker's arguments: its records folder, then one name=argv per case."""
    out = tmp_path / f"out{processes}"
    out.mkdir(exist_ok=True)
    runs = tmp_path / f"runs{processes}"
    return [str(out)] + [f"{name}={' '.join(COMMON + extra + ['--out-dir', str(runs), '--run-name', name])}"
                         for name, extra in cases]


def start(tmp_path, processes, cases):
    """Starts worker over cases under torchrun; returns a function that waits for it: (exit status, stderr)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread each (2 cores), and the same float arithmetic in both
    log = tmp_path / f"stderr{processes}.txt"
    with open(log, "w") as stderr:  # a file, not a pipe, which nobody reads while the reference runs
        proc = subprocess.Popen(torchrun + [__file__, *worker_argv(tmp_path, processes, cases)], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=HERE)

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
    thread like each torchrun process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker(*worker_argv(tmp_path, 1, cases))
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
    two = cases + ([("is", CASES["is"])] if resume and "is" not in compared else []) + \
        ([("is-resumed", CASES["is"] + ["--resume-after-1"])] if resume else [])
    start_time = time.time()
    two_processes = start(tmp, 2, two)  # meanwhile the one-process reference runs here, on the other core
    try:
        if cases:
            in_this_process(tmp, cases)
            print(f"1 process: {time.time() - start_time:.1f} s")
    finally:
        code, stderr = two_processes()
    assert code == 0, stderr[-3000:]
    print(f"2 processes: {time.time() - start_time:.1f} s")
    load = lambda name, p, rank: torch.load(tmp / f"out{p}" / f"{name}.rank{rank}.pt", weights_only=False)  # noqa: E731
    return {name: {"one": load(name, 1, 0) if name in compared else None, "two": [load(name, 2, r) for r in (0, 1)]}
            for name, _ in two}, tmp


@pytest.mark.xdist_group("torchrun")
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_take_the_update_of_one(records, case):
    one, (p0, p1) = records[0][case]["one"], records[0][case]["two"]
    assert len(one) == len(p0) == len(p1) == 2  # epochs
    for epoch, (a, b0, b1) in enumerate(zip(one, p0, p1), 1):
        where = f"{case}, epoch {epoch}"
        # epoch 1 samples from the same weights: equal to rounding; epoch 2 from weights that differ by rounding
        # (see below), which moves samples by up to ~1e-4
        close = dict(atol=1e-6 if epoch == 1 else 5e-4, rtol=0)
        assert b0["prompts"] + b1["prompts"] == a["prompts"], f"{where}: the processes drew other prompts"
        assert len(b0["x0"]) == len(b1["x0"]) == len(a["x0"]) // 2, f"{where}: each process samples half the round"
        torch.testing.assert_close(torch.cat([b0["x0"], b1["x0"]]), a["x0"], **close,
                                   msg=f"{where}: the two processes' samples are not the one process's")
        for b in (b0, b1):
            torch.testing.assert_close(b["r"], a["r"], **close, msg=f"{where}: gathered rewards differ")
            torch.testing.assert_close(b["adv"], a["adv"], atol=1e-5 if epoch == 1 else 1e-2, rtol=0,
                                       msg=f"{where}: advantages differ (from one process's rewards only?)")
            assert b["logs"]["grad_norm"] == pytest.approx(a["logs"]["grad_norm"], rel=1e-3), \
                f"{where}: gradient norm {b['logs']['grad_norm']} with two processes, {a['logs']['grad_norm']} with one"
            # the round's update, compared as a whole: Adam moves a weight by ≈ lr·sign(g) even where g is 1e-12, so
            # float rounding that flips such a g's sign moves that one weight by up to 2·lr (measured: 10 weights
            # in 1.4M for sf, 0.8% for dpok, whose V_φ passes the same rounding on to the advantages)
            update, reference = b["weights"] - a["before"], a["weights"] - a["before"]
            assert (update - reference).norm() < 0.02 * reference.norm(), f"{where}: the update differs from one process's"
        assert torch.equal(b0["weights"], b1["weights"]), f"{where}: the two processes hold different weights"


@pytest.mark.xdist_group("torchrun")
def test_resume_under_two_processes_equals_an_unbroken_run(records):
    unbroken, resumed = records[0]["is"]["two"], records[0]["is-resumed"]["two"]
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
    beside it) is no failure, and for the slow reward well under its minute."""
    import re

    start = time.time()
    code, stderr = launch(tmp_path, 2, [("run", ["--algo", "is", "--reward", f"test_distributed:{reward}",
                                                 "--collective-timeout", str(timeout)])], timeout=120)
    assert code != 0
    ours = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and re.match(expected, ours[0]), stderr[-3000:]
    assert time.time() - start < 60  # well before the slow reward's minute
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
