"""The command line's helpers: argparse with one-line errors and @config files (configs/*.txt), the numeric
ranges and the device checked before anything loads, and the start-up lines that spell out a run's batch
arithmetic. Settings are read by attribute name; nothing here imports ddpo.
"""
import argparse
import math
import os

import torch

from files import fail, first_line


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
    positive = ("clip_range", "num_steps", "samples_per_epoch", "samples_per_prompt", "sample_batch_size", "train_batch_size", "epochs",
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
        + (f"samples, one {'flow-matching' if flow else 'DDPM'}-loss pass each" if rwr else f"samples x {n_t} timesteps"),
    ] + ([f"DPOK: {', '.join(dpok)}"] if dpok else []) + ([processes] if processes else []))

