"""Several processes under torchrun, and stopping them: joining the process group, gathering, summing
gradients, leaving together on an error, and Ctrl-C or SIGTERM on any process stopping all of them after the
same epoch. Knows nothing of DDPO.

Each process samples and scores its share of the round; every process gathers the round's rewards and computes
the same advantages; gradients are summed by all-reduce. So N processes take exactly the update of one. In a
plain `python ddpo.py` (one process) every function here is the identity.
"""
import contextlib
import dataclasses
import datetime
import os
import signal
import sys

import torch
from tqdm import tqdm

from plumbing.files import RunError, fail, why


def distributed():
    """(rank, number of processes): torchrun's, or (0, 1)."""
    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if d.is_available() and d.is_initialized() else (0, 1)


def bars():
    """tqdm's `disable`: process 0 shows bars where there is a terminal, the others none."""
    return None if distributed()[0] == 0 else True


def start_processes(args):
    """Under torchrun (WORLD_SIZE > 1 in the environment): join the process group and return args with this process's
    device: cuda → cuda:LOCAL_RANK with NCCL, cpu with gloo; a collective waits at most --collective-timeout seconds.
    A plain `python ddpo.py` (no WORLD_SIZE) is left as it is."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return args
    if args.device.startswith("cuda"):  # also a resumed run's saved cuda:0
        args = dataclasses.replace(args, device=f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
        torch.cuda.set_device(args.device)
    try:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo",
                                                 timeout=datetime.timedelta(seconds=args.collective_timeout))
        names = [args.run_name]  # the default name holds the time, which differs from process to process
        torch.distributed.broadcast_object_list(names, src=0)
    except Exception as e:  # an unreachable rendezvous, a timeout
        fail(f"process {os.environ.get('RANK')}: cannot join the other processes ({why(e)})")
    return dataclasses.replace(args, run_name=names[0])


def my_share(x):
    """This process's rows of a round-wide tensor: process r holds samples r·n … r·n + n − 1 of the round."""
    rank, world = distributed()
    n = len(x) // world
    return x[rank * n:(rank + 1) * n]


def gather(x):
    """Every process's share (first dimension), concatenated in rank order, on every process."""
    world = distributed()[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    with collective():
        torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def sum_gradients(params):
    """Add up the processes' gradients (all-reduce). A process's loss is its samples' share of the whole minibatch's
    mean (divided by the minibatch's size, not by its own count), so the sum is the gradient of that mean."""
    if distributed()[1] > 1:
        with collective():
            have = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
            torch.distributed.all_reduce(have)  # how many processes hold each parameter's gradient
            for p, n in zip(params, have.tolist()):
                if n and p.grad is None:  # a process that had none of this minibatch's samples adds zeros
                    p.grad = torch.zeros_like(p)
            for work in [torch.distributed.all_reduce(p.grad, async_op=True) for p in params if p.grad is not None]:
                work.wait()


class CollectiveFailed(Exception):
    """A gather or all-reduce that could not complete: another process stopped, or took longer than the timeout."""


@contextlib.contextmanager
def collective():
    try:
        yield
    except RuntimeError as e:  # gloo's and NCCL's timeouts and lost peers are RuntimeErrors (some DistErrors)
        raise CollectiveFailed(why(e)) from e


def gather_objects(obj):
    """[process 0's obj, process 1's, …] on every process, for small picklable things (logs, error lines, flags)."""
    out = [obj] * distributed()[1]
    if len(out) > 1:
        with collective():
            torch.distributed.all_gather_object(out, obj)
    return out


class Agreed(RunError):
    """An error raised on every process at once; process 0 says it, the others stop without a word."""


@contextlib.contextmanager
def together():
    """A block that all processes leave together: a RunError or OSError in any process's block is raised on every
    process (naming the process), so none is left waiting at the next gather. One process: the error as it is."""
    error = None
    try:
        yield
    except (RunError, OSError) as e:
        if distributed()[1] == 1:
            raise
        error = str(e) if isinstance(e, RunError) else why(e)
    for rank, e in enumerate(gather_objects(error)):
        if e is not None:
            raise Agreed(f"process {rank}: {e}")


class CtrlC:
    """Ctrl-C (SIGINT) or SIGTERM, the signal batch schedulers and container runtimes send before they kill: the
    first finishes the epoch, writes a checkpoint and exits; a second one stops at once (the last checkpoint stays).
    Under torchrun the launcher forwards either signal to every process, and all stop after the same epoch."""

    SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __enter__(self):
        self.requested = False
        self.previous = {signum: signal.signal(signum, self.handle) for signum in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"{self.SIGNALS[signum]}: finishing this epoch, then writing a checkpoint (Ctrl-C or SIGTERM again "
                   f"to stop now)")
        sys.stdout.flush()  # into a scheduler's log now, not at exit: a kill after its grace period would lose it

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)



def clear_bars():
    """Progress bars closed before an error line is printed, so nothing is left in front of it."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
