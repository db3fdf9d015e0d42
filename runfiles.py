"""A run's plumbing, kept out of ddpo.py's reading order: atomic files and folders, the sample grids, the
reward curve, the check that the run folder can be written before any model is loaded, Ctrl-C, and the one
line that says why a model folder or hub id could not be loaded.

Every file here is written under a temporary name, flushed (fsync) and renamed, so a process that is killed or
runs out of disk leaves the previous version in place, never a half-written one.
"""
import contextlib
import math
import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm


def fsync(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its files were synced
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(folder):
    """Yields folder.tmp to fill; on success its files are fsynced and it is renamed to folder (replacing an
    older one). On any failure, Ctrl-C included, the .tmp folder is removed and folder is left as it was."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # an unfinished one from a process that was killed
    try:
        tmp.mkdir(parents=True)
        yield tmp
        for path in [*tmp.iterdir(), tmp]:
            fsync(path)  # on disk before the rename, so not even a power cut leaves a renamed but empty folder
        old = folder.with_name(folder.name + ".old")
        if folder.exists():  # set aside, not deleted, until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        fsync(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path):
    """Yields a temporary path beside `path` to write; renamed over `path` only once it is whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")  # keeps the suffix: PIL and matplotlib read it
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path, text):
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def check_writable(folder):
    """Fails (OSError) unless `folder` exists as a writable folder or can be created: tried with a real file,
    since permission bits say nothing for root or a read-only mount. Creates nothing that stays."""
    folder = Path(folder).absolute()
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{existing} is a file, not a folder")
    fd, probe = tempfile.mkstemp(dir=existing, prefix=".ddpo-write-test")
    os.close(fd)
    os.unlink(probe)


def save_grid(images, captions, path, columns=4, cell=128):
    """Images (B, 3, H, W) in [0, 1] as a captioned grid PNG (nearest-neighbour upscaling keeps pixels visible)."""
    from PIL import Image, ImageDraw

    import rewards

    pils = rewards.to_pil(images)
    rows = math.ceil(len(pils) / columns)
    grid = Image.new("RGB", (columns * cell, rows * (cell + 14)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, caption) in enumerate(zip(pils, captions)):
        x, y = (i % columns) * cell, (i // columns) * (cell + 14)
        grid.paste(img.resize((cell, cell), Image.NEAREST), (x, y))
        draw.text((x + 2, y + cell + 1), caption[: cell // 6], fill="black")
    with atomic_file(path) as tmp:
        grid.save(tmp)


def before_after(run_dir, path, label):
    """The run's first and last sample grids side by side, captioned with their mean eval reward: the README's
    pictures. python -c "import runfiles; runfiles.before_after('runs/NAME', 'docs/x.png', 'DDPO_IS')"."""
    import json

    from PIL import Image, ImageDraw

    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    grids = [Image.open(run_dir / f"grid_{r['epoch']:03d}.png") for r in (first, last)]
    w, h = grids[0].size
    out = Image.new("RGB", (2 * w + 12, h + 16), "white")
    draw = ImageDraw.Draw(out)
    for i, (grid, text) in enumerate(zip(grids, [
            f"before (pretrained): eval reward {first['eval/reward_mean']:.4g}",
            f"after {last['epoch']} epochs of {label}: {last['eval/reward_mean']:.4g}"])):
        out.paste(grid, (i * (w + 12), 16))
        draw.text((i * (w + 12) + 2, 2), text, fill="black")
    with atomic_file(path) as tmp:
        out.save(tmp)


def plot_reward_curve(history, path):
    """The training reward (mean ± std) and the fixed evaluation samples' reward, per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if "reward/mean" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        e, m, s = (np.array([h[k] for h in train]) for k in ("epoch", "reward/mean", "reward/std"))
        ax.plot(e, m, ".-", label="training samples (mean ± std)")
        ax.fill_between(e, m - s, m + s, alpha=0.2)
    ax.plot([h["epoch"] for h in history], [h["eval/reward_mean"] for h in history], "o-", label="fixed eval samples")
    ax.set(xlabel="epoch", ylabel="reward")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def why(error):
    """An exception in one line: "TypeName: the first line of its message"."""
    return f"{type(error).__name__}: {first_line(error)}"


def model_load_error(name, error):
    """One line on why --model could not be loaded: a local folder that is no pipeline, an unreachable hub, or else."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    chain = [error]  # the hub's own exception, and the network error under it, sit in the __cause__ chain
    while len(chain) < 20 and (chain[-1].__cause__ or chain[-1].__context__):
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if Path(name).exists():
        damaged = [path for path in sorted(Path(name).glob("*/*.safetensors")) if not readable_safetensors(path)]
        if damaged:
            return f"cannot load model folder {name}: weights file {damaged[0]} is damaged"
        return f"cannot load model folder {name} ({first_line(error)}): it needs a diffusers pipeline layout"
    if any(isinstance(e, LocalEntryNotFoundError) for e in chain):
        return (f"cannot load model {name!r}: no such local folder, and the hub is unreachable ({first_line(chain[-1])}) "
                f"with no cached copy; --model tiny or a local folder works offline")
    return (f"cannot load model {name!r} ({first_line(error)}); if it is a hub id, the hub may be unreachable: "
            f"--model tiny or a local folder works offline")


def readable_safetensors(path):
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            for key in f.keys():
                f.get_tensor(key)  # every tensor's bytes, so a truncated file shows
        return True
    except Exception:
        return False


class CtrlC:
    """First Ctrl-C: finish the epoch, write a checkpoint, exit. A second one stops at once (the last one stays)."""

    def __enter__(self):
        self.requested, self.previous = False, signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: finishing this epoch, then writing a checkpoint (Ctrl-C again to stop now)")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def quiet_libraries():
    """Our own progress bars and error lines are the ones that matter; silence the libraries' loading chatter."""
    import warnings

    import diffusers
    import huggingface_hub
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()  # its retry messages while the hub is unreachable
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)  # diffusers → hub
