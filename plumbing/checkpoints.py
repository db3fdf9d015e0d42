"""A run folder's files: its checkpoints (everything a round depends on, so a resumed run continues exactly as an
unbroken one), its metrics.jsonl, and whether a folder holds a run at all.

A checkpoint is written to epoch_NNNN.tmp and renamed (files.atomic_folder), so a checkpoint on disk is whole;
only the newest is kept.
"""
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from plumbing.files import RunError, atomic_folder, fail, why


def is_run(path):
    return (Path(path) / "args.json").is_file()


def holds_run(path):
    """Whether the folder holds any of a run's files: a new run there would overwrite one."""
    return any((Path(path) / name).exists() for name in ("args.json", "metrics.jsonl", "checkpoints"))


def checkpoints(run_dir):
    """The whole checkpoints of a run, oldest first (epoch_NNNN.tmp folders are unfinished and never count)."""
    return sorted((Path(run_dir) / "checkpoints").glob("epoch_[0-9][0-9][0-9][0-9]"))


def stopped_at_once(run_dir):
    """The line a run stopped by a second Ctrl-C or SIGTERM ends with: its last whole checkpoint, if any, is kept."""
    kept = checkpoints(run_dir)
    return (f"stopped; the last checkpoint ({kept[-1].name}) is kept: resume with --resume {run_dir}" if kept
            else "stopped before the first checkpoint was written; nothing to resume")


def latest_checkpoint(run_dir):
    done = checkpoints(run_dir)
    if not done:
        fail(f"{run_dir} has no checkpoint")
    return done[-1]


def trainable_state(models):
    """The weights that training changes: the whole UNet, or only its LoRA adapter."""
    return {n: p.detach().cpu().contiguous() for n, p in models.denoiser.named_parameters() if p.requires_grad}


def load_trainable(models, path):
    from safetensors.torch import load_file

    state = load_file(path)
    expected = trainable_state(models).keys()
    if state.keys() != expected:
        raise ValueError(f"{path} holds {len(state)} tensors, the model trains {len(expected)} (another model or LoRA rank?)")
    models.denoiser.load_state_dict(state, strict=False)


def load_run_weights(models, run_dir):
    """The trainable weights of a run's last checkpoint, into models loaded as its base model; one line if damaged."""
    checkpoint = latest_checkpoint(run_dir)
    try:
        load_trainable(models, checkpoint / "trainable.safetensors")
    except Exception as e:  # a truncated file fails in safetensors; a mismatch in load_trainable
        fail(f"checkpoint {checkpoint} is damaged ({why(e)})")


def numpy_rng_state():
    """numpy's global RNG state, its key as a list: torch.load(weights_only=True) takes no numpy array."""
    name, key, *rest = np.random.get_state()
    return (name, key.tolist(), *rest)


def save_checkpoint(run_dir, epoch, models, optimizer, tracker, rng, generator, scaler=None, value=None):
    """Everything a round depends on. A write that fails (a full disk) leaves no .tmp and the last checkpoint."""
    from safetensors.torch import save_file

    folder = Path(run_dir) / "checkpoints" / f"epoch_{epoch:04d}"
    try:
        with atomic_folder(folder) as tmp:
            save_file(trainable_state(models), tmp / "trainable.safetensors")
            torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(), "tracker": tracker.buffers,
                        "python_rng": rng.getstate(), "generator": generator.get_state(),
                        "torch_rng": torch.get_rng_state(),  # the global RNGs, which a reward of your own may draw from
                        "random_rng": random.getstate(), "numpy_rng": numpy_rng_state(),
                        "scaler": scaler.state_dict() if scaler else {},  # fp16's loss scale: {} when not in use
                        **({"value": value[0].state_dict(), "value_optimizer": value[1].state_dict()} if value else {})},
                       tmp / "state.pt")
    except Exception as e:  # OSError, or safetensors' own error for the same full disk
        raise RunError(f"cannot write checkpoint {folder} ({why(e)})") from e
    for old in checkpoints(run_dir)[:-1]:
        shutil.rmtree(old)


def load_checkpoint(folder, models, optimizer, tracker, rng, generator, scaler=None, value=None):
    """Restore everything a round depends on; returns the epoch the checkpoint was written after."""
    try:
        load_trainable(models, folder / "trainable.safetensors")
        state = torch.load(folder / "state.pt", weights_only=True, map_location="cpu")  # saved on any device
        optimizer.load_state_dict(state["optimizer"])  # moves its tensors to the parameters' device
        tracker.buffers = state["tracker"]
        rng.setstate(state["python_rng"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "numpy_rng" in state:  # not in the checkpoints written before python's and numpy's RNGs were saved
            random.setstate(state["random_rng"])
            name, key, *rest = state["numpy_rng"]  # as numpy_rng_state wrote it
            np.random.set_state((name, np.array(key, np.uint32), *rest))
        if scaler and scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if value:  # DPOK's V_φ and its optimizer
            value[0].load_state_dict(state["value"])
            value[1].load_state_dict(state["value_optimizer"])
        return state["epoch"]
    except Exception as e:  # a truncated file can fail in safetensors, pickle or the optimizer; all mean one thing
        fail(f"checkpoint {folder} is damaged ({why(e)})")


def read_metrics(path):
    """A run's metrics.jsonl, one dict per epoch; a damaged file is one line naming the file and the line."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read {path} ({why(e)})")
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{path} is damaged at line {number} ({e.msg}): restore it, or start a new run")
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            fail(f"{path} is damaged at line {number} (not an epoch's metrics): restore it, or start a new run")
        rows.append(row)
    return rows

