"""Speed and memory of one DDPO round, and the cost of the rollout's log-probs. Prints figures; asserts nothing.

    python bench.py --rounds                # ddpo.py's default rounds: the built-in model against the pixel-space one
    python bench.py                         # the tiny model and a tiny SD-style pipeline, on this machine
    python bench.py --models sd14 --device cuda --mixed-precision fp16 --lora-rank 4 --batch-size 1
    python bench.py --models sd35m --device cuda --mixed-precision bf16 --lora-rank 32 --batch-size 1 --num-steps 10 --resolution 512
    python bench.py --models sd14 --save-to /tmp/bench && python bench.py --models /tmp/bench/sd14 ...  # CPU peak RSS without the build
    python bench.py --processes 1,2                 # whole epochs of ddpo.py by 1 and 2 processes (torchrun)
    python bench.py --models tiny --batch-size 32 --timesteps-per-pass 1,10   # training at 1 and 10 timesteps a pass

--rounds: samples per second of whole training epochs (sampling + reward + training, without the per-epoch eval)
of `python ddpo.py` with its defaults, and each process's peak memory, for this checkout and for the checkout of
--old-commit (by default the last commit whose tiny_model/ was the 32x32 pixel-space model), each run by its own
code, alternately (--repeats times each, the fastest kept), so the machine's drift hits both alike.

For each model: seconds per round split into sampling / reward / training, samples per second, peak memory,
and the time of ddpo.rollout (DDIM step + exact log-prob, trajectory stored) relative to a plain diffusers
DDIM sampling loop on the same model and steps (target: ≤ 1.05x). 'sd14' builds Stable Diffusion v1.4's exact
UNet / VAE / text-encoder configuration with random weights: speed and memory do not depend on the weights'
values, and no hub download is needed. 'sd35m' does the same for Stable Diffusion 3.5 Medium's transformer, VAE and
CLIP text encoders (without T5); its rollout is the flow SDE step against FlowMatchEulerDiscreteScheduler.step.

--processes N,M,…: samples per second of whole training epochs of `python ddpo.py` with its defaults on the tiny
model, run by one plain process and by torchrun with N processes. On CPU the cores are shared: each of N processes
gets cores / N threads. With --device cuda, each process gets its own GPU.
"""
import argparse
import dataclasses
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from plumbing import checkpoints
import ddpo
from plumbing import model_checks
from world import tiny_world


@torch.no_grad()
def plain_diffusers_loop(models, prompts, args, generator):
    """What a plain sampler does: the guided prediction, then the scheduler's own step (DDIMScheduler.step with η, or
    FlowMatchEulerDiscreteScheduler.step, the flow's ODE); no log-probs, no stored trajectory."""
    sched = models.scheduler
    sched.set_timesteps(args.num_steps)
    cond, uncond = ddpo.encode_prompts(models, prompts), ddpo.repeat(ddpo.encode_prompts(models, [""]), len(prompts))
    both = {k: torch.cat([uncond[k], v]) for k, v in cond.items()}
    x = torch.randn((len(prompts), *ddpo.latent_shape(models, args.resolution)), generator=generator).to(models.device)
    for t in sched.timesteps:
        eps_u, eps_c = ddpo.denoise(models, torch.cat([x, x]), t.expand(2 * len(x)).to(x.device), both).float().chunk(2)
        eps = eps_u + args.guidance_scale * (eps_c - eps_u)
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        x = (sched.step(eps, t, x) if models.flow else sched.step(eps, t, x, eta=args.eta, variance_noise=noise)).prev_sample
    return x


def reset_peak(cuda):
    """Start a new peak-memory window: CUDA's allocator counter, or on Linux the process's peak RSS (VmHWM)."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # not Linux: the peak then counts from the process's start


def peak_gib(cuda):
    """Peak memory since reset_peak: GPU memory allocated by tensors, or resident memory of this process."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 2**20  # kB
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def bench(name, path, opts):
    argv = ["--model", path, "--device", opts.device, "--mixed-precision", opts.mixed_precision, "--num-steps",
            str(opts.num_steps), "--samples-per-epoch", str(opts.batch_size), "--samples-per-prompt", str(opts.batch_size),
            "--sample-batch-size", str(opts.batch_size), "--train-batch-size", str(opts.batch_size), "--num-minibatches", "1", "--algo", "is",
            "--resolution", str(opts.resolution)]
    if opts.lora_rank is not None:
        argv += ["--lora-rank", str(opts.lora_rank)]
    args = ddpo.parse_args(argv)
    cuda = args.device.startswith("cuda")
    reset_peak(cuda)
    models = ddpo.load_models(path, args.device, args.lora_rank, args.mixed_precision)
    if problem := model_checks.resolution_problem(models, args.resolution):
        sys.exit(f"cannot bench {name}: its {problem}")
    reward_fn = ddpo.load_reward(args)
    prompts = random.Random(0).choices(ddpo.load_prompts(args.prompts), k=opts.batch_size)
    optimizer = torch.optim.AdamW([p for p in models.denoiser.parameters() if p.requires_grad], lr=1e-6)
    uncond = ddpo.repeat(ddpo.encode_prompts(models, [""]), opts.batch_size)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    loaded = peak_gib(cuda)  # loading: on CPU also the fp32 weights read before the cast to --mixed-precision
    noise = lambda: ddpo.noise_generators(0, range(len(prompts)))  # noqa: E731
    ddpo.rollout(models, prompts, args, noise())  # warm-up (kernels, allocator)
    plain_s, ours_s = [], []
    for _ in range(opts.repeats or 5):  # alternated, and the fastest of each kept: the machine's drift hits both alike
        plain_s.append(timed(lambda: plain_diffusers_loop(models, prompts, args, g()), args.device)[0])
        reset_peak(cuda)
        t, traj = timed(lambda: ddpo.rollout(models, prompts, args, noise()), args.device)
        ours_s.append(t)
    plain, ours = min(plain_s), min(ours_s)
    images = ddpo.decode(models, traj.states[:, -1])
    sampling_peak = peak_gib(cuda)
    reward_s, (r, _) = timed(lambda: ddpo.compute_rewards(reward_fn, args.reward, images, prompts), args.device)
    advantages = torch.linspace(-1, 1, len(r)) if len(r) > 1 else torch.ones(1)  # the cost does not depend on them
    per_pass = sorted(set(opts.timesteps_per_pass))
    train_s, train_peak = {k: [] for k in per_pass}, {}
    ddpo.train_round(models, optimizer, traj, advantages, r, dataclasses.replace(args, timesteps_per_pass=per_pass[0]), g(),
                     uncond)  # warm-up, not timed: the first backward allocates the gradients and the optimizer's state
    for _ in range((opts.repeats or 3) if len(per_pass) > 1 else 1):  # alternated: the drift hits each alike
        for k in per_pass:
            reset_peak(cuda)
            stacked = dataclasses.replace(args, timesteps_per_pass=k)
            train_s[k].append(timed(lambda: ddpo.train_round(models, optimizer, traj, advantages, r, stacked, g(), uncond),
                                    args.device)[0])
            # the first time round only, smallest k first: on CPU the allocator keeps a larger k's memory resident
            train_peak.setdefault(k, peak_gib(cuda))
    side = args.resolution or models.vae.config.sample_size  # the VAE's image size: the model's own
    for k in per_pass:
        train, first = min(train_s[k]), min(train_s[per_pass[0]])
        peak = (f"{'GPU' if cuda else 'RSS'} {loaded:.2f} GiB loading, {sampling_peak:.2f} sampling, "
                f"{train_peak[k]:.2f} training")
        round_s = ours + reward_s + train
        stacking = f", {k} timesteps a pass" if k > 1 else ""
        faster = f" ({first / train:.2f}x the training of {per_pass[0]} a pass)" if k != per_pass[0] else ""
        print(f"{name:8s} | {side}x{side}, batch {opts.batch_size}, {args.num_steps} steps{stacking}, LoRA {args.lora_rank}, "
              f"{args.mixed_precision} | round {round_s:.2f} s = sampling {ours:.2f} + reward {reward_s:.3f} + training "
              f"{train:.2f}{faster} | {opts.batch_size / round_s:.2f} samples/s | peak {peak} | rollout / plain diffusers "
              f"loop {ours / plain:.3f}x")


RANDOM_MODELS = {"tiny-sd": tiny_world.save_sd_style_pipeline, "sd14": lambda path: tiny_world.save_sd_style_pipeline(path, True),
                 "tiny-sd3": tiny_world.save_sd3_style_pipeline,
                 "sd35m": lambda path: tiny_world.save_sd3_style_pipeline(path, True)}
OLD_COMMIT = "708a1a3"  # the last commit whose tiny_model/ was the 32x32 pixel-space model (ddpo.py's defaults of then)


def ddpo_epochs(repo, launcher, argv, threads):
    """Run repo's ddpo.py with argv and its defaults otherwise; returns (seconds per epoch of epochs 2…E without the
    eval, samples per epoch, the process's peak RSS in GiB)."""
    with tempfile.TemporaryDirectory() as out:
        argv = [str(Path(repo) / "ddpo.py"), *argv, "--out-dir", out, "--run-name", "r"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        with tempfile.TemporaryFile("w+") as log:
            child = subprocess.Popen(launcher + argv, env=env, cwd=repo, stdout=log, stderr=subprocess.STDOUT, text=True)
            _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS (ru_maxrss, KiB on Linux)
            child.returncode = os.waitstatus_to_exitcode(status)
            if child.returncode:
                log.seek(0)
                sys.exit(f"{' '.join(launcher + argv)} failed:\n{log.read()[-2000:]}")
        rows = checkpoints.read_metrics(Path(out) / "r" / "metrics.jsonl")[2:]
        samples = json.loads((Path(out) / "r" / "args.json").read_text())["samples_per_epoch"]
    epoch_s = sum(r["time/sample_s"] + r["time/reward_s"] + r["time/train_s"] for r in rows) / len(rows)
    return epoch_s, samples, usage.ru_maxrss / 2**20


def bench_rounds(opts):
    """ddpo.py's default rounds on the built-in model, this checkout against --old-commit's, alternately."""
    here = Path(__file__).resolve().parent
    argv = ["--epochs", str(opts.epochs), "--device", opts.device, "--mixed-precision", opts.mixed_precision]
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run(["git", "-C", str(here), "archive", opts.old_commit], capture_output=True)
        if archive.returncode:
            sys.exit(f"cannot check out commit {opts.old_commit} ({archive.stderr.decode().strip()}): --rounds needs "
                     f"the repository's history (a full clone)")
        subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
        runs = {"this checkout": here, f"commit {opts.old_commit}": Path(old)}
        best = {}
        for _ in range(opts.repeats or 2):
            for name, repo in runs.items():
                epoch_s, samples, peak = ddpo_epochs(repo, [sys.executable], argv, threads)
                if name not in best or epoch_s < best[name][0]:
                    best[name] = (epoch_s, samples, peak)
    for name, (epoch_s, samples, peak) in best.items():
        print(f"{name:16s} | ddpo.py's defaults, {threads} threads | {epoch_s:.2f} s per epoch of {samples} samples, "
              f"without eval | {samples / epoch_s:.2f} samples/s | peak RSS {peak:.2f} GiB")
    (new_s, new_n, _), (old_s, old_n, _) = best.values()
    print(f"samples/s, this checkout / commit {opts.old_commit}: {(new_n / new_s) / (old_n / old_s):.2f}x "
          f"(the fastest of {opts.repeats or 2} runs each, {opts.epochs} epochs a run, the first not timed)")


def bench_processes(counts, opts):
    """samples/s of ddpo.py's epochs 2…E (epoch 1 warms up), by 1 plain process or N torchrun processes."""
    cores = os.cpu_count() or 1
    here = Path(__file__).resolve().parent
    for n in counts:
        launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else [])
        argv = ["--epochs", str(opts.epochs), "--device", opts.device, "--mixed-precision", opts.mixed_precision]
        threads = max(1, cores // n)
        start = time.time()
        epoch_s, samples, _ = ddpo_epochs(here, launcher, argv, threads)
        print(f"{n} process(es) x {threads if opts.device == 'cpu' else 1} thread(s) | "
              f"{epoch_s:.2f} s per epoch of {samples} samples, without eval | {samples / epoch_s:.2f} samples/s | "
              f"whole command {time.time() - start:.0f} s")


def counts(text):
    """A comma-separated list of counts ≥ 1, as ints (argparse's type: anything else is one line)."""
    if not all(k.strip().isdigit() and int(k) > 0 for k in text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of counts ≥ 1, e.g. 1,10")
    return [int(k) for k in text.split(",")]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,tiny-sd,tiny-flow,tiny-sd3",
                   help="comma-separated: tiny, tiny-flow, tiny-activities (tiny's shapes, so tiny's figures), tiny-sd, "
                        "sd14, tiny-sd3, sd35m, or a diffusers folder (e.g. one sd14 was saved to)")
    p.add_argument("--save-to", help="build tiny-sd / sd14 in this folder and keep it (to measure it in a fresh process)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--lora-rank", type=int, default=None, help="default: ddpo.py's (0 for tiny, 4 otherwise)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-steps", type=int, default=20)
    p.add_argument("--timesteps-per-pass", default="1", type=counts, help="ddpo.py's --timesteps-per-pass, or several, comma-separated "
                                                             "(e.g. 1,10): the round's training timed with each, alternately, and "
                                                             "compared with the smallest")
    p.add_argument("--resolution", type=int, default=0, help="image side in pixels; default: each model's own")
    p.add_argument("--repeats", type=int, help="rollouts timed per loop (default 5); with several --timesteps-per-pass, "
                                                "training rounds timed per k (default 3); with --rounds, runs of each "
                                                "checkout (default 2); alternating, the fastest printed")
    p.add_argument("--processes", type=counts, help="comma-separated process counts, e.g. 1,2: time ddpo.py's epochs under torchrun "
                                       "instead of the models above")
    p.add_argument("--epochs", type=int, default=4, help="with --processes or --rounds: epochs per command (the first "
                                                          "is not timed)")
    p.add_argument("--rounds", action="store_true", help="time ddpo.py's default rounds on the built-in model, this "
                                                          "checkout against --old-commit's, instead of the models above")
    p.add_argument("--old-commit", default=OLD_COMMIT, help="with --rounds: the commit to time against")
    opts = p.parse_args()
    if set(opts.timesteps_per_pass) != {1} and (opts.rounds or opts.processes):
        p.error("--timesteps-per-pass times one round of the models above: --rounds and --processes run ddpo.py's "
                "defaults")
    model_checks.quiet_libraries()
    print(f"torch {torch.__version__}, device {opts.device}"
          + (f" ({torch.cuda.get_device_name()})" if opts.device.startswith("cuda") else f", {torch.get_num_threads()} threads"))
    if opts.rounds:
        return bench_rounds(opts)
    if opts.processes:
        return bench_processes(opts.processes, opts)
    for name in opts.models.split(","):
        if name not in RANDOM_MODELS:
            bench(Path(name).name, name, opts)
            continue
        with tempfile.TemporaryDirectory() as tmp:  # random weights with the real shapes (SD3.5-M's: 10 GB), removed after
            path = RANDOM_MODELS[name](Path(opts.save_to or tmp) / name)  # built here: this process's peak includes the build
            if opts.save_to:
                print(f"saved {path}; measure it with: python bench.py --models {path} ...")
            else:
                bench(name, str(path), opts)


if __name__ == "__main__":
    main()
