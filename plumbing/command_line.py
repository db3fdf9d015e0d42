"""The command line: flags and @config files (configs/*.txt) to a ddpo.Args, argparse with one-line errors,
--resume's refusals, every setting checked before anything loads (names, ranges, the device, the batch arithmetic),
the derived settings filled in, a run's saved settings read back, and the start-up lines that spell out a run's
batch arithmetic. ddpo.Args is passed in where one is made; nothing here imports ddpo.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import rewards
from plumbing.checkpoints import is_run
from plumbing.files import fail, first_line, why
from world import JUDGE_OPTIONS, MODEL_JUDGES, TINY_MODELS


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        fail(f"{message} (see --help)")

    def convert_arg_line_to_args(self, line):
        """@file arguments (configs/*.txt): flags and values split on white space; '#' starts a comment."""
        return line.split("#", 1)[0].split()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: …)" only where there is one; the help text explains the rest
        return action.help if action.default in (None, "", ()) else super()._get_help_string(action)


def range_problem(args):
    """The first numeric setting out of its range, as one line naming the flag, or None."""
    positive = ("clip_range", "num_steps", "samples_per_epoch", "samples_per_prompt", "sample_batch_size", "train_batch_size", "timesteps_per_pass", "epochs",
                "num_minibatches", "inner_epochs", "buffer_size", "min_count", "adv_clip", "max_grad_norm", "save_every",
                "value_steps")
    finite = ("eta", "noise_level", "guidance_scale", "adv_clip", "lr", "max_grad_norm", "timestep_fraction", "clip_range",
              "rwr_beta", "rwr_threshold", "kl_coef", "value_lr", "collective_timeout")
    checks = {**{name: (getattr(args, name) > 0, "> 0") for name in positive},
              "lr": (args.lr >= 0, "≥ 0"), "rwr_beta": (args.rwr_beta >= 0, "≥ 0"), "kl_coef": (args.kl_coef >= 0, "≥ 0"),
              "value_lr": (args.value_lr >= 0, "≥ 0"), "seed": (args.seed >= 0, "≥ 0"),
              "resolution": (args.resolution >= 0, "≥ 0"), "collective_timeout": (args.collective_timeout > 0, "> 0"),
              "eta": (0 < args.eta <= 1, "0 < η ≤ 1"), "noise_level": (args.noise_level > 0, "> 0"), "timestep_fraction": (0 < args.timestep_fraction <= 1, "in (0, 1]"),
              "lora_rank": (args.lora_rank is None or args.lora_rank >= 0, "≥ 0")}
    checks.update({name: (False, "finite") for name in finite
                   if getattr(args, name) is not None and not math.isfinite(getattr(args, name))})
    return next((f"--{name.replace('_', '-')} {getattr(args, name)} is out of range (must be {allowed})"
                 for name, (ok, allowed) in checks.items() if not ok), None)


def device_problem(device):
    """--device as one line if this machine cannot run on it (under torchrun, cuda means cuda:LOCAL_RANK), or None."""
    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError) as e:
        return f"--device {device!r} is not a torch device ({first_line(e)})"
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {device}: this machine has no CUDA GPU that torch {torch.__version__} can use"
        index = kind.index if kind.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        if index >= torch.cuda.device_count():
            return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), cuda:0 to " \
                   f"cuda:{torch.cuda.device_count() - 1}" + (" (under torchrun, one per process)" if kind.index is None else "")
    elif kind.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {device}: this machine has no MPS (Apple GPU) that torch can use"
    elif kind.type not in ("cpu", "cuda", "mps"):
        return f"--device {device}: only cpu, cuda, cuda:N and mps are supported"
    return None


def describe(args, n_prompts, plan, world=1, flow=False):
    """The batch arithmetic of ddpo.round_plan's plan (minibatches, inner epochs, timesteps), printed at start-up;
    world: the number of processes (torchrun); flow: a flow model's (Flow-GRPO's SDE steps), else DDIM's."""
    rwr = args.algo.startswith("rwr")
    n_mb, inner, n_t = plan
    mb = args.samples_per_epoch // n_mb
    batch = min(args.sample_batch_size, args.samples_per_epoch // world)
    name = {"sf": "DDPO_SF", "is": "DDPO_IS", "rwr": "RWR", "rwr-sparse": "RWR (sparse)"}[args.algo]
    dpok = [part for part, on in ((f"KL to the pretrained model x β={args.kl_coef}", args.kl_coef > 0),
                                  (f"value baseline V_φ (lr {args.value_lr}, {args.value_steps} steps a round)",
                                   args.advantage == "value")) if on]
    processes = (f"{world} processes (torchrun), each sampling {args.samples_per_epoch // world} and training on its own "
                 f"samples; rewards gathered, gradients summed" if world > 1 else "")
    return "\n".join([
        f"{name} | model {args.model} | reward {args.reward} | prompts {args.prompts} ({n_prompts}) | {args.device}",
        f"sampling: {args.samples_per_epoch} samples per epoch ({args.samples_per_epoch // args.samples_per_prompt} "
        f"prompts x {args.samples_per_prompt}) = {math.ceil(args.samples_per_epoch / world / batch)} "
        f"batch(es) of {batch}{' per process' if world > 1 else ''}, {args.num_steps} "
        + (f"SDE steps (a={args.noise_level}" if flow else f"DDIM steps (η={args.eta}") + f", w={args.guidance_scale})",
        f"training: {inner} inner epoch(s) x {n_mb} minibatch(es) of {mb} samples = {inner * n_mb} optimizer steps "
        f"per epoch; each minibatch = {math.ceil(mb / args.train_batch_size)} forward chunk(s) of ≤{args.train_batch_size} "
        + (f"samples, one {'flow-matching' if flow else 'DDPM'}-loss pass each" if rwr else f"samples x {n_t} timesteps"
           + (f", {min(args.timesteps_per_pass, n_t)} a pass" if min(args.timesteps_per_pass, n_t) > 1 else "")),
    ] + ([f"DPOK: {', '.join(dpok)}"] if dpok else []) + ([processes] if processes else []))


CHOICES = {"algo": ("sf", "is", "rwr", "rwr-sparse"), "advantage": ("per-prompt", "batch", "value"),
           "rwr_weights": ("reward", "advantage"), "mixed_precision": ("no", "fp16", "bf16")}
RESUME_MAY_CHANGE = ("epochs", "save_every", "device")


def flag(name):
    return "--" + name.replace("_", "-")


def known_reward(name):
    """A reward in rewards.py, or your own to import (module:function, path/to/file.py:function)."""
    return name in rewards.REWARDS or ":" in name


def parse_args(Args, round_plan, argv, description):
    """An Args (ddpo.Args, the class) from the command line: --flags, and @file for a file of them (configs/*.txt,
    argparse's own fromfile_prefix_chars). --resume takes the run's saved settings; a typed flag that would change
    them is refused. round_plan: ddpo's, for complete."""
    p = ArgumentParser(description=description, formatter_class=HelpFormatter, fromfile_prefix_chars="@")
    for f in dataclasses.fields(Args):
        kind = {"rwr_threshold": float, "lora_rank": int}.get(f.name, f.type)
        p.add_argument(flag(f.name), type=kind, default=f.default, choices=CHOICES.get(f.name), help=f.metadata["help"])
    argv = sys.argv[1:] if argv is None else list(argv)
    # --help shows the values in effect (after `@configs/x.txt`: the paper's), not only the built-in defaults
    p.set_defaults(**vars(p.parse_known_args([a for a in argv if a not in ("-h", "--help")])[0]))
    args = Args(**vars(p.parse_args(argv)))
    unset = object()  # argparse fills in no default where the namespace already has a value
    given = vars(p.parse_args(argv, argparse.Namespace(**{f.name: unset for f in dataclasses.fields(Args)})))
    typed = {name for name, value in given.items() if value is not unset}  # typed, even if equal to the default
    if args.resume:  # the run's own settings; a typed flag that would change one of the others is refused
        saved = load_run_args(Args, args.resume)
        refused = sorted(k for k in typed - {"resume", *RESUME_MAY_CHANGE} if getattr(args, k) != getattr(saved, k))
        if refused:
            p.error(f"--resume continues {args.resume} with its own settings: {', '.join(map(flag, refused))} cannot "
                    f"change (only {', '.join(map(flag, RESUME_MAY_CHANGE))} can)")
        args = dataclasses.replace(saved, resume=args.resume, out_dir=str(Path(args.resume).parent),
                                   run_name=Path(args.resume).name,
                                   **{k: getattr(args, k) for k in typed & set(RESUME_MAY_CHANGE)})
    return complete(args, round_plan, typed, p.error)


def complete(args, round_plan, typed=frozenset(), error=fail):
    """Every setting checked, with one line naming a bad one, and the derived ones filled in (default prompts, LoRA
    rank, run name). parse_args calls it, and train() for an Args made in Python. round_plan: ddpo's (a round's
    minibatches must divide it); typed: the flags typed."""
    args = dataclasses.replace(args)
    if not known_reward(args.reward):
        error(f"unknown reward {args.reward!r}: one of {', '.join(rewards.REWARDS)}, or module:function")
    for name, allowed in CHOICES.items():  # argparse checks these on the command line; an Args made in Python too
        if getattr(args, name) not in allowed:
            error(f"{flag(name)} {getattr(args, name)!r} is not one of {', '.join(allowed)}")
    if problem := range_problem(args):
        error(problem)
    if problem := device_problem(args.device):
        error(problem + ("; the run was made there: resume it here with --device cpu"
                         if args.resume and "device" not in typed else ""))
    if args.advantage == "per-prompt" and args.min_count > args.buffer_size:
        error(f"--min-count {args.min_count} is more than --buffer-size {args.buffer_size}: a prompt's buffer could "
              f"never hold enough rewards for its own statistics")
    minibatches, world = round_plan(args, args.num_steps)[0], int(os.environ.get("WORLD_SIZE", 1))
    sample_batch = args.sample_batch_size if args.sample_batch_size < args.samples_per_epoch // world else 1  # or one batch
    for name, n in (("--sample-batch-size", sample_batch), ("--samples-per-prompt", args.samples_per_prompt),
                    ("--num-minibatches", minibatches), ("the number of processes (torchrun)", world)):
        if args.samples_per_epoch % n:
            error(f"--samples-per-epoch {args.samples_per_epoch} is not a multiple of {name} {n}")
    if args.algo.startswith("rwr") and (args.advantage == "value" or args.kl_coef or args.timesteps_per_pass > 1):
        error(f"--advantage value, --kl-coef and --timesteps-per-pass act on the per-step policy: they need --algo sf or "
              f"is, not {args.algo}")
    args.prompts = args.prompts or rewards.DEFAULT_PROMPTS.get(args.reward, "simple_animals")
    base = args.model
    if is_run(args.model):  # a run folder continues its own trainable weights: its LoRA adapter, or its full denoiser
        run = load_run_args(type(args), args.model)
        if "lora_rank" in typed and args.lora_rank != run.lora_rank:
            error(f"--model {args.model} is a run trained with LoRA rank {run.lora_rank}; --lora-rank {args.lora_rank} "
                    f"cannot change that")
        args.lora_rank, base = run.lora_rank, run.model
    elif args.lora_rank is None:
        args.lora_rank = 0 if args.model in TINY_MODELS else 4
    for name in JUDGE_OPTIONS:  # '' (unset): a tiny model's own judges (its world's), the hub's model otherwise
        if not getattr(args, name):
            setattr(args, name, MODEL_JUDGES[base] if base in TINY_MODELS else rewards.MODEL_OPTIONS[name][0])
    reward = "".join(c if c.isalnum() or c in "._-" else "-" for c in args.reward)  # module:fn, path/file.py:fn
    args.run_name = args.run_name or f"{reward}__{args.algo}__{args.seed}__{int(time.time())}"
    return args


def load_run_args(Args, run_dir):
    """A run's saved settings (args.json) as an Args (ddpo.Args, the class); names this ddpo.py does not know (a
    reward, an algorithm) are refused, and settings it no longer has are ignored."""
    path = Path(run_dir) / "args.json"
    if not path.is_file():
        fail(f"{run_dir} is not a run folder (no args.json)")
    try:
        saved = json.loads(path.read_text())
        args = Args(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(Args)}})
    except (ValueError, TypeError, AttributeError) as e:
        fail(f"{path} is damaged ({why(e)})")
    for name, allowed in {**CHOICES, "reward": list(rewards.REWARDS)}.items():
        if getattr(args, name) not in allowed and not (name == "reward" and known_reward(args.reward)):
            fail(f"{run_dir} was made with {flag(name)} {getattr(args, name)!r}, which this ddpo.py does not know "
                 f"(known: {', '.join(allowed)})")
    return args
