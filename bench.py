"""Speed and memory of one DDPO round, and the cost of the rollout's log-probs. Prints figures; asserts nothing.

    python bench.py                         # the tiny model and a tiny SD-style pipeline, on this machine
    python bench.py --models sd14 --device cuda --mixed-precision fp16 --lora-rank 4 --batch-size 1
    python bench.py --models sd14 --save-to /tmp/bench && python bench.py --models /tmp/bench/sd14 ...  # CPU peak RSS without the build
    python bench.py --processes 1,2                 # whole epochs of ddpo.py by 1 and 2 processes (torchrun)

For each model: seconds per round split into sampling / reward / training, samples per second, peak memory,
and the time of ddpo.rollout (DDIM step + exact log-prob, trajectory stored) relative to a plain diffusers
DDIM sampling loop on the same model and steps (target: ≤ 1.05x). 'sd14' builds Stable Diffusion v1.4's exact
UNet / VAE / text-encoder configuration with random weights: speed and memory do not depend on the weights'
values, and no hub download is needed.

--processes N,M,…: samples per second of whole training epochs (sampling + reward + training, without the
per-epoch eval) of `python ddpo.py` with its defaults on the tiny model, run by one plain process and by torchrun
with N processes. On CPU the cores are shared: each of N processes gets cores / N threads. With --device cuda,
each process gets its own GPU.
"""
import argparse
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

import ddpo
import runfiles
import tiny_world


@torch.no_grad()
def plain_diffusers_loop(models, prompts, args, generator):
    """What a plain sampler does: guided ε, then DDIMScheduler.step; no log-probs, no stored trajectory."""
    sched = models.scheduler
    sched.set_timesteps(args.num_steps)
    cond = ddpo.encode_prompts(models, prompts)
    uncond = ddpo.encode_prompts(models, [""]).expand_as(cond)
    size, ch = models.unet.config.sample_size, models.unet.config.in_channels
    x = torch.randn((len(prompts), ch, size, size), generator=generator).to(models.device)
    for t in sched.timesteps:
        with models.autocast():
            eps_u, eps_c = models.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        eps = eps_u.float() + args.guidance_scale * (eps_c.float() - eps_u.float())
        x = sched.step(eps, t, x, eta=args.eta, variance_noise=torch.randn(x.shape, generator=generator).to(x.device)).prev_sample
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
            str(opts.num_steps), "--samples-per-epoch", str(opts.batch_size), "--sample-batch-size", str(opts.batch_size),
            "--train-batch-size", str(opts.batch_size), "--num-minibatches", "1", "--algo", "is"]
    if opts.lora_rank is not None:
        argv += ["--lora-rank", str(opts.lora_rank)]
    args = ddpo.parse_args(argv)
    cuda = args.device.startswith("cuda")
    reset_peak(cuda)
    models = ddpo.load_models(path, args.device, args.lora_rank, args.mixed_precision)
    reward_fn = ddpo.load_reward(args)
    prompts = random.Random(0).choices(ddpo.load_prompts(args.prompts), k=opts.batch_size)
    optimizer = torch.optim.AdamW([p for p in models.unet.parameters() if p.requires_grad], lr=1e-6)
    uncond = ddpo.encode_prompts(models, [""]).expand(opts.batch_size, -1, -1)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    loaded = peak_gib(cuda)  # loading: on CPU also the fp32 weights read before the cast to --mixed-precision
    noise = lambda: ddpo.noise_generators(0, range(len(prompts)))  # noqa: E731
    ddpo.rollout(models, prompts, args, noise())  # warm-up (kernels, allocator)
    plain_s, ours_s = [], []
    for _ in range(opts.repeats):  # alternated, and the fastest of each kept: the machine's drift hits both alike
        plain_s.append(timed(lambda: plain_diffusers_loop(models, prompts, args, g()), args.device)[0])
        reset_peak(cuda)
        t, traj = timed(lambda: ddpo.rollout(models, prompts, args, noise()), args.device)
        ours_s.append(t)
    plain, ours = min(plain_s), min(ours_s)
    images = ddpo.decode(models, traj.states[:, -1])
    sampling_peak = peak_gib(cuda)
    reward_s, (r, _) = timed(lambda: ddpo.compute_rewards(reward_fn, args.reward, images, prompts), args.device)
    advantages = torch.linspace(-1, 1, len(r)) if len(r) > 1 else torch.ones(1)  # the cost does not depend on them
    reset_peak(cuda)
    train_s, _ = timed(lambda: ddpo.train_round(models, optimizer, traj, advantages, r, args, g(), uncond),
                       args.device)
    peak = (f"{'GPU' if cuda else 'RSS'} {loaded:.2f} GiB loading, {sampling_peak:.2f} sampling, "
            f"{peak_gib(cuda):.2f} training")
    round_s = ours + reward_s + train_s
    print(f"{name:8s} | batch {opts.batch_size}, {args.num_steps} steps, LoRA {args.lora_rank}, {args.mixed_precision} | "
          f"round {round_s:.2f} s = sampling {ours:.2f} + reward {reward_s:.3f} + training {train_s:.2f} | "
          f"{opts.batch_size / round_s:.2f} samples/s | peak {peak} | rollout / plain diffusers loop {ours / plain:.3f}x")


def bench_processes(counts, opts):
    """samples/s of ddpo.py's epochs 2…E (epoch 1 warms up), by 1 plain process or N torchrun processes."""
    cores = os.cpu_count() or 1
    for n in counts:
        with tempfile.TemporaryDirectory() as out:
            launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else [])
            argv = [str(Path(__file__).with_name("ddpo.py")), "--epochs", str(opts.epochs), "--out-dir", out, "--run-name", "r",
                    "--device", opts.device, "--mixed-precision", opts.mixed_precision]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n))}
            start = time.time()
            done = subprocess.run(launcher + argv, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{n} process(es) failed:\n{done.stderr[-2000:]}")
            rows = [json.loads(line) for line in (Path(out) / "r" / "metrics.jsonl").read_text().splitlines()][2:]
            epoch_s = sum(r["time/sample_s"] + r["time/reward_s"] + r["time/train_s"] for r in rows) / len(rows)
            samples = ddpo.Args().samples_per_epoch
            print(f"{n} process(es) x {env['OMP_NUM_THREADS'] if opts.device == 'cpu' else 1} thread(s) | "
                  f"{epoch_s:.2f} s per epoch of {samples} samples, without eval | {samples / epoch_s:.2f} samples/s | "
                  f"whole command {time.time() - start:.0f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,tiny-sd",
                   help="comma-separated: tiny, tiny-sd, sd14, or a diffusers folder (e.g. one sd14 was saved to)")
    p.add_argument("--save-to", help="build tiny-sd / sd14 in this folder and keep it (to measure it in a fresh process)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--lora-rank", type=int, default=None, help="default: ddpo.py's (0 for tiny, 4 otherwise)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5, help="rollouts timed per loop, alternating (the fastest is printed)")
    p.add_argument("--processes", help="comma-separated process counts, e.g. 1,2: time ddpo.py's epochs under torchrun "
                                       "instead of the models above")
    p.add_argument("--epochs", type=int, default=4, help="with --processes: epochs per command (the first is not timed)")
    opts = p.parse_args()
    runfiles.quiet_libraries()
    print(f"torch {torch.__version__}, device {opts.device}"
          + (f" ({torch.cuda.get_device_name()})" if opts.device.startswith("cuda") else f", {torch.get_num_threads()} threads"))
    if opts.processes:
        return bench_processes([int(n) for n in opts.processes.split(",")], opts)
    for name in opts.models.split(","):
        if name in ("tiny-sd", "sd14"):  # random weights with the real shapes: built here, so this process's peak includes the build
            path = tiny_world.save_sd_style_pipeline(Path(opts.save_to or tempfile.mkdtemp()) / name, name == "sd14")
            if opts.save_to:
                print(f"saved {path}; measure it with: python bench.py --models {path} ...")
                continue
        else:
            path = name
        bench(Path(name).name, str(path), opts)


if __name__ == "__main__":
    main()
