"""A run's pictures: the captioned sample grids of every evaluation, the reward curve, and the before/after pair
that the README shows.
"""
import json
import math
from pathlib import Path

import numpy as np

from plumbing.checkpoints import read_metrics
from plumbing.files import atomic_file, write_text
from rewards import to_pil


def save_grid(images, captions, path, columns=4, cell=128):
    """Images (B, 3, H, W) in [0, 1] as a captioned grid PNG (nearest-neighbour upscaling keeps pixels visible).
    A caption's lines ('\n') each get a 14-pixel strip of their own under the picture, cut to what fits."""
    from PIL import Image, ImageDraw

    pils = to_pil(images)
    rows, strip = math.ceil(len(pils) / columns), 14 * max([c.count("\n") + 1 for c in captions] or [1])
    grid = Image.new("RGB", (columns * cell, rows * (cell + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, caption) in enumerate(zip(pils, captions)):
        x, y = (i % columns) * cell, (i // columns) * (cell + strip)
        grid.paste(img.resize((cell, cell), Image.NEAREST), (x, y))
        for k, line in enumerate(caption.split("\n")):
            draw.text((x + 2, y + cell + 1 + 14 * k), line[: cell // 6], fill="black")
    with atomic_file(path) as tmp:
        grid.save(tmp)


def save_eval_grid(images, prompts, rewards, extras, stem):
    """The fixed evaluation samples: stem.png captioned with reward and prompt, and stem.json with each cell's prompt,
    reward and the reward's extras (e.g. the VLM's answer: why each image scored so)."""
    save_grid(images, [f"{v:.3g} {p}" for v, p in zip(rewards.tolist(), prompts)], stem.with_suffix(".png"))
    cells = [{"prompt": p, "reward": v, **{k: extras[k][i] for k in extras}} for i, (p, v) in enumerate(zip(prompts, rewards.tolist()))]
    write_text(stem.with_suffix(".json"), json.dumps(cells, indent=1) + "\n")


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


def before_after(run_dir, path, label):
    """The run's first and last sample grids side by side, captioned with their mean eval reward: the README's
    pictures. python -c "from plumbing import pictures; pictures.before_after('runs/NAME', 'docs/x.png', 'DDPO_IS')"."""
    from PIL import Image, ImageDraw

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
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

