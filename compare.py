"""The paper's Fig. 4 on a laptop: the four estimators side by side, reward against the number of samples seen.

Every estimator trains the same model with the same flags, samples per epoch and seeds (only --algo differs),
through ddpo.main, so each run is an ordinary run folder. The figure plots the mean reward of each epoch's
training samples (drawn before that epoch's update) against the samples seen so far: the mean over seeds, with
the range between the lowest and highest seed shaded.

    python compare.py                                      # incompressibility: 4 estimators x 2 seeds x 20 epochs of 64
    python compare.py --reward jpeg --seeds 0 1 2 --epochs 10 -- --lr 3e-4   # after --: flags for every run
    python compare.py --vs-flow-grpo --model tiny-flow --reward jpeg        # ddpo.py's defaults against Flow-GRPO's

--vs-flow-grpo compares two settings of DDPO_IS instead of the estimators: ddpo.py's defaults, and Flow-GRPO's
SD3.5-M settings where a 64-sample round can hold them (FLOW_GRPO below: 10 SDE steps trained on 9, w = 4.5, KL
β = 0.04, clip range 1e-4; its group of 24 does not divide 64, so groups of 16).

At the end it prints each estimator's final reward (the mean training reward of its last 3 epochs) per seed, the
range between its seeds, and the gap between the best and the worst estimator: the order says something only
when every range is smaller than that gap.

Writes runs/compare__{reward}__{time}/: one run folder per (estimator, seed), compare.png and compare.json.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from plumbing import checkpoints
import ddpo

NAMES = {"is": "DDPO_IS", "sf": "DDPO_SF", "rwr": "RWR", "rwr-sparse": "RWR sparse"}
FLOW_GRPO = ["--num-steps", "10", "--timestep-fraction", "0.99", "--guidance-scale", "4.5", "--noise-level", "0.7",
             "--kl-coef", "0.04", "--clip-range", "1e-4", "--samples-per-prompt", "16", "--buffer-size", "16",
             "--min-count", "16"]
SETTINGS = {"ours": ("ddpo.py's defaults", []), "flow-grpo": ("Flow-GRPO's settings", FLOW_GRPO)}  # --vs-flow-grpo


def curves(folder, algos, seeds):
    """{run: (samples seen (E,), training reward per seed (S, E), eval reward per seed (S, E+1))}; a run is an
    estimator's name, or a key of SETTINGS."""
    out = {}
    for algo in algos:
        rows = [checkpoints.read_metrics(folder / f"{algo}__{seed}" / "metrics.jsonl") for seed in seeds]
        args = ddpo.load_run_args(folder / f"{algo}__{seeds[0]}")
        train = np.array([[r["reward/mean"] for r in run if "reward/mean" in r] for run in rows])
        evals = np.array([[r["eval/reward_mean"] for r in run] for run in rows])
        out[algo] = (np.arange(1, train.shape[1] + 1) * args.samples_per_epoch, train, evals)
    return out


def plot(data, reward, path, names, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for algo, (seen, train, _) in data.items():
        ax.plot(seen, train.mean(0), ".-", label=f"{names[algo]} ({len(train)} seeds)")
        ax.fill_between(seen, train.min(0), train.max(0), alpha=0.15)
    ax.set(xlabel="samples seen (reward queries)", ylabel=f"{reward} reward of the epoch's samples",
           title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reward", default="incompressibility", help="the reward every estimator is trained on")
    p.add_argument("--algos", nargs="+", default=list(NAMES), choices=list(NAMES), help="the estimators to compare")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="one run per estimator and seed")
    p.add_argument("--epochs", type=int, default=20, help="epochs of each run (20 x 64 = 1,280 samples with the defaults)")
    p.add_argument("--model", default="tiny", help="the model every run trains (ddpo.py --model)")
    p.add_argument("--vs-flow-grpo", action="store_true", help="compare ddpo.py's defaults with Flow-GRPO's settings "
                   "(DDPO_IS both), instead of the estimators")
    p.add_argument("--out-dir", default="runs", help="the comparison's folder is made here")
    opts = p.parse_args(argv[:split])
    extra = argv[split + 1:]
    folder = Path(opts.out_dir) / f"compare__{opts.reward}__{int(time.time())}"
    if opts.vs_flow_grpo:
        runs = {key: (label, ["--algo", "is", *flags]) for key, (label, flags) in SETTINGS.items()}
    else:
        runs = {algo: (NAMES[algo], ["--algo", algo]) for algo in opts.algos}
    names = {key: label for key, (label, _) in runs.items()}
    for key, (label, flags) in runs.items():
        for seed in opts.seeds:
            print(f"--- {label}, seed {seed}", flush=True)
            ddpo.main(["--model", opts.model, "--reward", opts.reward, *flags, "--seed", str(seed), "--epochs",
                       str(opts.epochs), "--out-dir", str(folder), "--run-name", f"{key}__{seed}", *extra])
    data = curves(folder, list(runs), opts.seeds)
    what = "ddpo.py's defaults and Flow-GRPO's" if opts.vs_flow_grpo else "the four estimators"
    plot(data, opts.reward, folder / "compare.png", names, f"{what} on {opts.model}: {opts.reward}")
    summary = {names[a]: {"samples_seen": seen.tolist(), "train_reward_mean": train.mean(0).tolist(),
                          "eval_first": evals[:, 0].mean().item(), "eval_last": evals[:, -1].mean().item(),
                          "train_last_epoch_per_seed": train[:, -1].tolist()}
               for a, (seen, train, evals) in data.items()}
    final = {names[a]: train[:, -3:].mean(1) for a, (_, train, _) in data.items()}  # (seeds,): last 3 epochs' mean
    order = sorted(final, key=lambda n: -final[n].mean())
    gap = final[order[0]].mean() - final[order[-1]].mean()
    for n in order:
        summary[n]["final_per_seed"] = final[n].tolist()
        print(f"{n:>10}: final training reward {final[n].mean():.4g} (seeds {', '.join(f'{v:.4g}' for v in final[n])}; "
              f"range {np.ptp(final[n]):.3g}), eval {summary[n]['eval_first']:.4g} -> {summary[n]['eval_last']:.4g}")
    widest = max(np.ptp(v) for v in final.values())
    verdict = ("one seed: no range between seeds to hold the gap against" if len(opts.seeds) < 2 else
               "every range is smaller than the gap" if widest < gap else "the seeds overlap the gap: the order is not settled")
    print(f"order, best first: {' > '.join(order)}; best - worst {gap:.3g}, widest seed range {widest:.3g}: {verdict}")
    (folder / "compare.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"figure: {folder / 'compare.png'}")
    return summary


if __name__ == "__main__":
    main()
