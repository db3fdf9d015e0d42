"""A run's plumbing, kept out of ddpo.py's reading order: atomic files and folders, checkpoint folders, prompt
files, the sample grids, the reward curve, `--eval`'s side-by-side grids, `--export` to diffusers' formats, the
check that the run folder can be written before any model is loaded, Ctrl-C, the one line that says why a
model could not be loaded, and torchrun's process group (joining it, and leaving it together on an error).

Every file here is written under a temporary name, flushed (fsync) and renamed, so a process that is killed or
runs out of disk leaves the previous version in place, never a half-written one.
"""
import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


def fail(message):
    """Stop with one clear line on stderr and a non-zero exit."""
    raise SystemExit(f"error: {message}")


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


class RunError(Exception):
    """A failure that ends a run: a reward that raises or returns NaN, non-finite numbers, a disk that is full.
    train() adds which epoch it was and where the last good checkpoint is."""


PROMPTS = Path(__file__).resolve().parent / "prompts"  # the prompt sets: <name>.txt, one prompt a line


def read_prompt_file(path):
    """One prompt a line (blank lines skipped); a missing, unreadable, binary or empty file is one line."""
    path = Path(path)
    if not path.is_file():
        fail(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"prompt file {path} cannot be read as UTF-8 text ({why(e)})")
    if "\0" in text:
        fail(f"prompt file {path} is not a text file (it holds NUL bytes)")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        fail(f"prompt file {path} has no prompts")
    return prompts


def alignment_prompts(activities_file):
    """Paper §5.3: "a(n) [animal] [activity]" from the 45 simple animals and a file of activities."""
    animals = read_prompt_file(PROMPTS / "simple_animals.txt")
    return [f"{'an' if a[0] in 'aeiou' else 'a'} {a} {act}" for a in animals for act in read_prompt_file(activities_file)]


PROMPT_SETS = {  # sets built from two files; every prompts/<name>.txt is a set too
    "alignment": lambda: alignment_prompts(PROMPTS / "activities.txt"),
    "alignment_unseen_activities": lambda: alignment_prompts(PROMPTS / "unseen_activities.txt"),
}


def load_prompts(spec):
    """A prompt set by name (prompts/<name>.txt or PROMPT_SETS) or a path to a text file, one prompt a line."""
    if spec in PROMPT_SETS:
        return PROMPT_SETS[spec]()
    if (PROMPTS / f"{spec}.txt").is_file():
        return read_prompt_file(PROMPTS / f"{spec}.txt")
    if not Path(spec).is_file():
        names = sorted([p.stem for p in PROMPTS.glob("*.txt")] + list(PROMPT_SETS))
        fail(f"prompt file or set {spec!r} does not exist; known sets: {', '.join(names)}")
    return read_prompt_file(spec)


def checkpoints(run_dir):
    """The whole checkpoints of a run, oldest first (epoch_NNNN.tmp folders are unfinished and never count)."""
    return sorted((Path(run_dir) / "checkpoints").glob("epoch_[0-9][0-9][0-9][0-9]"))


def latest_checkpoint(run_dir):
    done = checkpoints(run_dir)
    if not done:
        fail(f"{run_dir} has no checkpoint")
    return done[-1]


# Checkpoints: written to a temp folder and renamed (atomic_folder), so a checkpoint on disk is whole.
# ddpo.train() passes everything a round depends on; a resumed run continues exactly as an unbroken one.

def trainable_state(models):
    """The weights that training changes: the whole UNet, or only its LoRA adapter."""
    return {n: p.detach().cpu().contiguous() for n, p in models.unet.named_parameters() if p.requires_grad}


def load_trainable(models, path):
    from safetensors.torch import load_file

    state = load_file(path)
    expected = trainable_state(models).keys()
    if state.keys() != expected:
        raise ValueError(f"{path} holds {len(state)} tensors, the model trains {len(expected)} (another model or LoRA rank?)")
    models.unet.load_state_dict(state, strict=False)


def save_checkpoint(run_dir, epoch, models, optimizer, tracker, rng, generator, scaler=None, value=None):
    """Everything a round depends on. A write that fails (a full disk) leaves no .tmp and the last checkpoint."""
    from safetensors.torch import save_file

    folder = Path(run_dir) / "checkpoints" / f"epoch_{epoch:04d}"
    try:
        with atomic_folder(folder) as tmp:
            save_file(trainable_state(models), tmp / "trainable.safetensors")
            torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(), "tracker": tracker.buffers,
                        "python_rng": rng.getstate(), "generator": generator.get_state(),
                        "torch_rng": torch.get_rng_state(),
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
        if scaler and scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if value:  # DPOK's V_φ and its optimizer
            value[0].load_state_dict(state["value"])
            value[1].load_state_dict(state["value_optimizer"])
        return state["epoch"]
    except Exception as e:  # a truncated file can fail in safetensors, pickle or the optimizer; all mean one thing
        fail(f"checkpoint {folder} is damaged ({why(e)})")


def start_processes(args):
    """Under torchrun (WORLD_SIZE > 1 in the environment): join the process group and return args with this process's
    device: cuda → cuda:LOCAL_RANK with NCCL, cpu with gloo; a collective waits at most --collective-timeout seconds.
    A plain `python ddpo.py` (no WORLD_SIZE) is left as it is."""
    import dataclasses
    import datetime

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


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        fail(f"{message} (see --help)")

    def convert_arg_line_to_args(self, line):
        """@file arguments (configs/*.txt): flags and values split on white space; '#' starts a comment."""
        return line.split("#", 1)[0].split()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: …)" only where there is one; the help text explains the rest
        return action.help if action.default in (None, "", ()) else super()._get_help_string(action)


def check_scheduler(scheduler, num_steps):
    """Why ddim_step cannot serve this scheduler as a policy with a density equal to DDIMScheduler.step, or None:
    σ_t = 0 at the last step, thresholding (dynamic x̂_0 clipping for pixel-space models: not implemented
    here), or a timestep spacing whose next timestep is not the one DDIMScheduler.step steps to (t − 1000 // T)."""
    import ddpo

    config = scheduler.config
    if config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        return f"prediction_type {config.prediction_type!r} is not one of epsilon, v_prediction, sample"
    if config.set_alpha_to_one:
        return ("set_alpha_to_one=True makes the last DDIM step deterministic (σ_t = 0, no density); set it to false "
                "in scheduler/scheduler_config.json, as Stable Diffusion does")
    if config.thresholding:
        return "thresholding=True is not supported (set it to false in scheduler/scheduler_config.json)"
    try:
        scheduler.set_timesteps(num_steps)
    except ValueError as e:  # e.g. more steps than the model's training timesteps
        return f"scheduler refuses {num_steps} steps ({first_line(e)})"
    t = scheduler.timesteps
    if not torch.equal(ddpo.prev_timestep(scheduler, t[:-1]), t[1:]) or ddpo.prev_timestep(scheduler, t[-1]) >= 0:
        return (f"timestep_spacing={config.timestep_spacing!r} with {num_steps} steps gives timesteps that "
                f"DDIMScheduler.step does not step between; use 'leading' or 'trailing' with a T that divides "
                f"{config.num_train_timesteps}")
    return None


def mismatched_components(models):
    """Why a pipeline's components cannot work together, or None: the UNet must take the VAE's latents (channels,
    and the VAE's image size divided by its downsampling), the text encoder's states must be the size its
    cross-attention takes, and every token id must be one the text encoder has."""
    unet, vae, text = models.unet.config, models.vae.config, models.text_encoder.config
    factor = 2 ** (len(vae.block_out_channels) - 1)  # each VAE level but the last halves the image
    if vae.latent_channels != unet.in_channels:
        return f"its VAE has {vae.latent_channels} latent channels and its UNet takes {unet.in_channels} input channels"
    if unet.sample_size * factor != vae.sample_size:
        return (f"its UNet's sample size {unet.sample_size} is not its VAE's image size {vae.sample_size} divided by "
                f"the VAE's downsampling {factor} ({vae.sample_size / factor:g})")
    if text.hidden_size != unet.cross_attention_dim:
        return (f"its text encoder's hidden size {text.hidden_size} is not its UNet's cross-attention size "
                f"{unet.cross_attention_dim}")
    if len(models.tokenizer) > text.vocab_size:
        return f"its tokenizer has {len(models.tokenizer)} tokens and its text encoder only {text.vocab_size}"
    return None


def distributed():
    """(rank, number of processes): torchrun's, or (0, 1)."""
    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if d.is_available() and d.is_initialized() else (0, 1)


def bars():
    """tqdm's `disable`: process 0 shows bars where there is a terminal, the others none."""
    return None if distributed()[0] == 0 else True


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


def is_run(path):
    return (Path(path) / "args.json").is_file()


def holds_run(path):
    """Whether the folder holds any of a run's files: a new run there would overwrite one."""
    return any((Path(path) / name).exists() for name in ("args.json", "metrics.jsonl", "checkpoints"))


def load_run_args(run_dir):
    """A run's saved settings (args.json); names this ddpo.py does not know (a reward, an algorithm) are refused,
    and settings it no longer has are ignored."""
    import dataclasses

    import ddpo
    import rewards

    path = Path(run_dir) / "args.json"
    if not path.is_file():
        fail(f"{run_dir} is not a run folder (no args.json)")
    try:
        saved = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(ddpo.Args)}
        args = ddpo.Args(**{k: v for k, v in saved.items() if k in known})
    except (ValueError, TypeError, AttributeError) as e:
        fail(f"{path} is damaged ({why(e)})")
    for name, allowed in {**ddpo.CHOICES, "reward": list(rewards.REWARDS)}.items():
        if getattr(args, name) not in allowed and not (name == "reward" and ddpo.known_reward(args.reward)):
            fail(f"{run_dir} was made with --{name.replace('_', '-')} {getattr(args, name)!r}, which this ddpo.py "
                 f"does not know (known: {', '.join(allowed)})")
    return args


def compute_rewards(reward_fn, name, images, prompts):
    """r(x_0, c) and per-sample extras; stops the run on an exception, a wrong shape or a non-finite value,
    naming the sample (a batch that raises is retried one sample at a time to find it)."""
    try:
        out = reward_fn(images, prompts)
    except Exception as e:
        traceback.print_exc()  # the reward's own traceback, then our one line
        culprit = next((i for i in range(len(prompts)) if raises(reward_fn, images[i:i + 1], prompts[i:i + 1])), None)
        which = f"sample {culprit} (prompt {prompts[culprit]!r})" if culprit is not None else f"a batch of {len(prompts)}"
        raise RunError(f"reward {name!r} raised {why(e)} on {which}") from e
    r, extras = out if isinstance(out, tuple) else (out, {})
    if isinstance(r, torch.Tensor):  # a score, not a loss: DDPO's gradient never flows through the reward (§4)
        r = r.detach()
    try:
        r = torch.as_tensor(r, dtype=torch.float32).cpu()
    except (TypeError, ValueError, RuntimeError) as e:  # strings, None, ragged lists, …
        raise RunError(f"reward {name!r} returned {type(r).__name__} that is not numbers ({why(e)}): it must return "
                       f"{len(prompts)} numbers") from e
    if r.shape != (len(prompts),):
        raise RunError(f"reward {name!r} returned shape {tuple(r.shape)}, expected ({len(prompts)},)")
    bad = torch.nonzero(~torch.isfinite(r)).flatten()
    if len(bad):
        i = bad[0].item()
        raise RunError(f"reward {name!r} returned {r[i].item()} for sample {i} (prompt {prompts[i]!r})")
    return r, extras


def raises(fn, *inputs):
    try:
        fn(*inputs)
        return False
    except Exception:
        return True


def range_problem(args):
    """The first numeric setting out of its range, as one line naming the flag, or None."""
    positive = ("clip_range", "num_steps", "samples_per_epoch", "samples_per_prompt", "sample_batch_size", "train_batch_size", "epochs",
                "num_minibatches", "inner_epochs", "buffer_size", "min_count", "adv_clip", "max_grad_norm", "save_every",
                "value_steps")
    finite = ("eta", "guidance_scale", "adv_clip", "lr", "max_grad_norm", "timestep_fraction", "clip_range",
              "rwr_beta", "rwr_threshold", "kl_coef", "value_lr", "collective_timeout")
    checks = {**{name: (getattr(args, name) > 0, "> 0") for name in positive},
              "lr": (args.lr >= 0, "≥ 0"), "rwr_beta": (args.rwr_beta >= 0, "≥ 0"), "kl_coef": (args.kl_coef >= 0, "≥ 0"),
              "value_lr": (args.value_lr >= 0, "≥ 0"), "seed": (args.seed >= 0, "≥ 0"),
              "collective_timeout": (args.collective_timeout > 0, "> 0"),
              "eta": (0 < args.eta <= 1, "0 < η ≤ 1"), "timestep_fraction": (0 < args.timestep_fraction <= 1, "in (0, 1]"),
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


def describe(args, n_prompts, plan, world=1):
    """The batch arithmetic of ddpo.round_plan's plan (minibatches, inner epochs, timesteps), printed at start-up;
    world: the number of processes (torchrun)."""
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
        f"batch(es) of {batch}{' per process' if world > 1 else ''}, {args.num_steps} DDIM steps (η={args.eta}, w={args.guidance_scale})",
        f"training: {inner} inner epoch(s) x {n_mb} minibatch(es) of {mb} samples = {inner * n_mb} optimizer steps "
        f"per epoch; each minibatch = {math.ceil(mb / args.train_batch_size)} forward chunk(s) of ≤{args.train_batch_size} "
        + ("samples, one DDPM-loss pass each" if rwr else f"samples x {n_t} timesteps"),
    ] + ([f"DPOK: {', '.join(dpok)}"] if dpok else []) + ([processes] if processes else []))


def save_eval_grid(images, prompts, rewards, extras, stem):
    """The fixed evaluation samples: stem.png captioned with reward and prompt, and stem.json with each cell's prompt,
    reward and the reward's extras (e.g. the VLM's answer: why each image scored so)."""
    save_grid(images, [f"{v:.3g} {p}" for v, p in zip(rewards.tolist(), prompts)], stem.with_suffix(".png"))
    cells = [{"prompt": p, "reward": v, **{k: extras[k][i] for k in extras}} for i, (p, v) in enumerate(zip(prompts, rewards.tolist()))]
    write_text(stem.with_suffix(".json"), json.dumps(cells, indent=1) + "\n")


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


def base_and_tuned(run, args):
    """("base", models), then ("tuned", models). With LoRA they are one model, its adapter switched off for the
    base (exactly the base model, tested): one UNet in memory and one load. A fully fine-tuned UNet is loaded
    after the base one is released."""
    import ddpo

    if run.lora_rank > 0:
        models = ddpo.load_models(args.eval, args.device, mixed_precision=args.mixed_precision)  # base + adapter
        models.unet.disable_adapters()
        yield "base", models
        models.unet.enable_adapters()
        yield "tuned", models
    else:
        yield "base", ddpo.load_models(run.model, args.device, mixed_precision=args.mixed_precision)
        yield "tuned", ddpo.load_models(args.eval, args.device, mixed_precision=args.mixed_precision)


def evaluate_run(args):
    """--eval: the paper's Fig. 3 and its generalisation figure in one command: base | fine-tuned, same seeds."""
    import ddpo  # ddpo.py registers itself under this name when it runs as a script
    import rewards

    quiet_libraries()
    run = ddpo.load_run_args(args.eval)
    run.device, run.mixed_precision = args.device, args.mixed_precision  # parse_args: the run's, unless given
    reward_fn = ddpo.load_reward(run)
    names = {"train": run.prompts, "heldout": args.eval_prompts or rewards.HELDOUT_PROMPTS.get(run.reward, "unseen_animals")}
    prompt_sets = {name: load_prompts(spec) for name, spec in names.items()}
    out = Path(args.eval) / "eval"
    out.mkdir(exist_ok=True)
    results = {}
    for which, models in base_and_tuned(run, args):
        for name, prompt_set in prompt_sets.items():
            prompts = random.Random(args.seed).choices(prompt_set, k=16)
            if problem := ddpo.check_scheduler(models.scheduler, run.num_steps):
                fail(f"cannot use model {run.model}: its {problem}")
            noise = ddpo.noise_generators(args.seed, range(len(prompts)), stream=2)  # the same for base and tuned
            _, images = ddpo.sample(models, prompts, run, noise, run.sample_batch_size, f"{which} {name}")
            r, _ = ddpo.compute_rewards(reward_fn, run.reward, images, prompts)
            results.setdefault(name, {"prompts": prompts})[which] = (images, r)
        del models  # one UNet in memory at a time
    summary = {}
    for name, res in results.items():
        (base_images, base_r), (tuned_images, tuned_r) = res["base"], res["tuned"]
        images = torch.stack([base_images, tuned_images], 1).flatten(0, 1)  # base, tuned, base, tuned, …
        captions = [f"{w} {v:.3g}" for b, t in zip(base_r.tolist(), tuned_r.tolist()) for w, v in (("base", b), ("tuned", t))]
        save_grid(images, captions, out / f"{name}.png")
        summary[name] = {"prompts": names[name], "base_reward_mean": base_r.mean().item(),
                         "tuned_reward_mean": tuned_r.mean().item()}
        print(f"{name:8s} ({summary[name]['prompts']}): base {base_r.mean():.4g} → fine-tuned {tuned_r.mean():.4g}")
    write_text(out / "eval.json", json.dumps(summary, indent=2) + "\n")
    print(f"grids and eval.json in {out}")
    return summary


def export(run_dir, out):
    """--export RUN OUT: the fine-tuned model in diffusers' own formats, written by diffusers itself. LoRA: its adapter as
    pytorch_lora_weights.safetensors with peft's metadata (StableDiffusionPipeline.save_lora_weights), which
    pipe.load_lora_weights(OUT) loads into the run's base pipeline. Full fine-tuning: a whole StableDiffusionPipeline
    folder with the tuned UNet (save_pretrained)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    import ddpo  # ddpo.py registers itself under this name when it runs as a script

    run = ddpo.load_run_args(run_dir)
    if Path(out).exists():
        fail(f"{out} exists; --export writes a new folder")
    models = ddpo.load_models(run_dir, "cpu")  # the base model with the run's last checkpoint, fp32
    with atomic_folder(out) as tmp:
        if run.lora_rank > 0:
            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(models.unet))  # diffusers' key names
            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers,
                                                      unet_lora_adapter_metadata=models.unet.peft_config["default"].to_dict())
        else:
            StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                    unet=models.unet, scheduler=models.scheduler, safety_checker=None,
                                    feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp)
    print(f"wrote {out} ({'LoRA adapter' if run.lora_rank else 'pipeline folder'}, from {latest_checkpoint(run_dir)})")
    return Path(out)


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
        weights = sorted(Path(name).glob("*/*.safetensors")) + sorted(Path(name).glob("*/*.bin"))
        damaged = [path for path in weights if not readable_weights(path)]
        if damaged:
            return f"cannot load model folder {name}: weights file {damaged[0]} is damaged"
        return f"cannot load model folder {name} ({first_line(error)}): it needs a diffusers pipeline layout"
    if any(isinstance(e, LocalEntryNotFoundError) for e in chain):
        return (f"cannot load model {name!r}: no such local folder, and the hub is unreachable ({first_line(chain[-1])}) "
                f"with no cached copy; --model tiny or a local folder works offline")
    return (f"cannot load model {name!r} ({first_line(error)}); if it is a hub id, the hub may be unreachable: "
            f"--model tiny or a local folder works offline")


def readable_weights(path):
    """Whether a weights file reads whole: safetensors (every tensor's bytes, so a truncated file shows) or a
    PyTorch .bin (a zip or pickle, loaded as tensors only)."""
    from safetensors import safe_open

    try:
        if path.suffix == ".bin":
            torch.load(path, map_location="cpu", weights_only=True)
            return True
        with safe_open(path, "pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        return True
    except Exception:
        return False


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

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


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
