"""A training run's life around the algorithm: its folder, its log, its checkpoints, its stop and its failure line.

ddpo.train() runs the epochs; a Run serves them, the same on every process under torchrun:
- process 0 alone writes the run's files: args.json, metrics.jsonl, reward_curve.png, the grids, the checkpoints;
- Ctrl-C or SIGTERM on any process: every process finishes the epoch, one checkpoint is written, all stop;
- a failure on any process (a reward that raises, a NaN, a full disk, a lost process) stops all of them, and
  process 0 says it in one line with the epoch and the last good checkpoint to resume from.
"""
import dataclasses
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from plumbing.checkpoints import checkpoints, holds_run, latest_checkpoint, load_checkpoint, read_metrics, save_checkpoint
from plumbing.files import RunError, check_writable, fail, why, write_text
from plumbing.pictures import plot_reward_curve
from plumbing.processes import CollectiveFailed, CtrlC, bars, distributed, gather_objects, together


class Run:
    """One run folder, args.out_dir / args.run_name. Refuses, before anything is loaded, a folder that already
    holds a run (a run is only ever continued, with --resume) and one that cannot be written."""

    def __init__(self, args):
        self.args, self.dir = args, Path(args.out_dir) / args.run_name
        self.rank, self.world = distributed()
        if not args.resume and holds_run(self.dir):
            fail(f"{self.dir} exists: continue it with --resume {self.dir}, or choose another --run-name")
        try:
            if self.rank == 0:
                check_writable(self.dir)
        except OSError as e:
            fail(f"cannot write the run folder {self.dir} ({why(e)})")
        self.start, self.epoch, self.history = 0, 0, []

    def resume(self, state):
        """The last checkpoint restored into state (everything a round depends on), and the metrics up to it; the
        epochs after it are done again. Returns the checkpoint's epoch."""
        self.start = self.epoch = load_checkpoint(latest_checkpoint(self.dir), *state)
        if self.start >= self.args.epochs:
            fail(f"{self.dir} has trained {self.start} epochs already; resume with --epochs above {self.start}")
        if self.rank == 0:
            self.history = [h for h in read_metrics(self.dir / "metrics.jsonl") if h["epoch"] <= self.start]
        return self.start

    def print(self, *lines):
        if self.rank == 0:
            print(*lines, sep="\n")

    def __enter__(self):
        self.ctrl_c = CtrlC().__enter__()
        return self

    def __exit__(self, kind, error, traceback):
        self.ctrl_c.__exit__()
        if isinstance(error, CollectiveFailed):  # a gather or all-reduce that could not complete
            fail(f"process {self.rank}: a collective did not complete in epoch {self.epoch} ({error}): another process "
                 f"stopped, or took longer than --collective-timeout {self.args.collective_timeout:g} s")
        if isinstance(error, (RunError, OSError)):  # a full disk while writing metrics or grids is an OSError
            if self.rank > 0:  # shared by together(), or raised alike on every process: process 0 says it
                sys.exit(1)
            kept = checkpoints(self.dir)
            what = error if isinstance(error, RunError) else why(error)
            fail(f"{what} in epoch {self.epoch}; " + (f"the last good checkpoint is {kept[-1]}: resume with --resume "
                                                      f"{self.dir}" if kept else "no checkpoint was written yet"))
        return False

    def epochs(self, evaluate):
        """The epochs to train, with a progress bar. A new run first writes args.json and evaluates the pretrained
        model (epoch 0); evaluate(epoch) samples the fixed eval prompts and returns their mean reward."""
        with together():
            if self.rank == 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                write_text(self.dir / "args.json", json.dumps(dataclasses.asdict(self.args), indent=2) + "\n")
                if not self.start:
                    self.write({"epoch": 0, "eval/reward_mean": evaluate(0)})
        self.bar = tqdm(range(self.start + 1, self.args.epochs + 1), desc="epochs", initial=self.start,
                        total=self.args.epochs, disable=bars())
        for self.epoch in self.bar:
            self.t0 = self.lap_start = time.time()
            self.times = {}
            yield self.epoch
        if self.rank == 0:
            print(f"eval reward {self.history[0]['eval/reward_mean']:.4g} → {self.history[-1]['eval/reward_mean']:.4g}; "
                  f"the fine-tuned model: --model {self.dir}")

    def lap(self, name):
        """Seconds since the epoch's last lap, logged as time/{name}_s."""
        now = time.time()
        self.times[f"time/{name}_s"], self.lap_start = now - self.lap_start, now

    def write(self, row):
        self.history.append(row)
        write_text(self.dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in self.history))
        plot_reward_curve(self.history, self.dir / "reward_curve.png")

    def log(self, epoch, rewards, metrics, evaluate):
        """Process 0 evaluates (the fixed eval samples' reward) and writes the epoch's row: the round's rewards,
        metrics, the laps' times. A full disk there stops every process."""
        with together():
            if self.rank == 0:
                r = rewards
                self.write({"epoch": epoch, "reward/mean": r.mean().item(), "reward/std": r.std(unbiased=False).item(),
                            "reward/min": r.min().item(), "reward/max": r.max().item(),
                            "eval/reward_mean": evaluate(epoch), **metrics, **self.times,
                            "time/epoch_s": time.time() - self.t0})
                line = self.history[-1]
                self.bar.set_postfix(reward=f"{line['reward/mean']:.4g}", eval=f"{line['eval/reward_mean']:.4g}")
                if self.bar.disable:  # no terminal (a log file, a batch job): one line per epoch instead of bars
                    print(f"epoch {epoch}/{self.args.epochs}: reward {line['reward/mean']:.4g}, eval "
                          f"{line['eval/reward_mean']:.4g} ({line['time/epoch_s']:.1f} s)", flush=True)

    def checkpoint(self, epoch, state):
        """Every --save-every epochs, after the last, and when Ctrl-C or SIGTERM came on any process: then all
        processes stop here, after the same epoch, with the checkpoint written."""
        stop = any(gather_objects(self.ctrl_c.requested))
        with together():
            if self.rank == 0 and (epoch % self.args.save_every == 0 or epoch == self.args.epochs or stop):
                save_checkpoint(self.dir, epoch, *state)
        if stop and epoch < self.args.epochs:
            sys.exit(f"interrupted after epoch {epoch}, checkpoint written: resume with --resume {self.dir}"
                     if self.rank == 0 else 1)
