"""DDPO: Training Diffusion Models with Reinforcement Learning (Black, Janner, Du, Kostrikov, Levine, 2023).

arXiv 2305.13301. The idea: denoising is a multi-step MDP (paper §4.3). The state is s_t = (c, t, x_t), the
action is a_t = x_{t-1}, and the policy is the reverse-diffusion step
π(a_t | s_t) = p_θ(x_{t-1} | x_t, c) = N(μ_θ(x_t, t, c), σ_t² I), a Gaussian whose log-probability is exact.
The only reward comes at the end, r(x_0, c). So we can sample images, score them, and run policy gradients
on the denoiser (DDPO_SF, DDPO_IS). The one-step-MDP baselines (RWR, §4.2) are here too.

This file reads top to bottom like the paper:
    Args → DDIM step and log-prob (§3.1) → models → MDP rollout (§4.3) → prompts, rewards, advantages (§4.4)
    → the four estimators (§4.2, §4.4) → train() → main.

    python ddpo.py --reward jpeg --algo is              # tiny built-in model, a laptop CPU, ~5 minutes
    python ddpo.py --help                                # every flag, with the paper's symbol
    python -m pytest -q                                  # the tests pin every formula with numbers
"""
import argparse
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

import rewards as rewards_lib

HERE = Path(__file__).resolve().parent
TINY_MODEL = HERE / "tiny_model"  # the built-in pretrained model (see tiny_world.py for how it was made)
PROMPTS = HERE / "prompts"
ALGOS = ("sf", "is", "rwr", "rwr-sparse")


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # --- run
    reward: str = arg("jpeg", f"reward function r(x_0, c), from rewards.py: {', '.join(rewards_lib.REWARDS)}")
    algo: str = arg("is", "estimator: sf = DDPO_SF (REINFORCE), is = DDPO_IS (clipped importance sampling), "
                          "rwr = RWR exponential weights, rwr-sparse = RWR sparse weights (paper §4.2, §4.4)")
    model: str = arg("tiny", "'tiny' (built-in 32x32 pixel model) or a diffusers folder / hub id")
    prompts: str = arg("", "prompt set p(c): a name in prompts/ (e.g. simple_animals, alignment) or a file path; "
                           "default: the reward's set from the paper")
    seed: int = arg(0, "fixes prompts, noise and therefore results on CPU")
    epochs: int = arg(20, "rounds of (sample, score, train)")
    run_name: str = arg("", "folder name under --out-dir; default {reward}__{algo}__{seed}__{time}")
    out_dir: str = arg("runs", "where runs are written")
    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "torch device")
    # --- sampling: the policy (§3.1)
    samples_per_epoch: int = arg(16, "trajectories sampled per round (paper: 256)")
    sample_batch_size: int = arg(16, "trajectories per sampling forward pass")
    num_steps: int = arg(20, "T, DDIM denoising steps per trajectory (paper: 50)")
    eta: float = arg(1.0, "η, DDIM noise scale; σ_t must be > 0 for the policy to have a density (paper: 1)")
    guidance_scale: float = arg(5.0, "w, classifier-free guidance in sampling and training (paper: 5)")
    # --- advantages (§4.4)
    advantage: str = arg("per-prompt", "per-prompt: normalise r by each prompt's recent rewards; "
                                       "batch: normalise by the round's mean and std")
    buffer_size: int = arg(16, "rewards kept per prompt by the per-prompt tracker")
    min_count: int = arg(16, "a prompt uses its own statistics once it has this many rewards, batch stats before")
    adv_clip: float = arg(5.0, "advantages are clipped to ±adv_clip")
    # --- optimisation
    lr: float = arg(3e-4, "AdamW learning rate")
    max_grad_norm: float = arg(1.0, "gradient norm clip")
    num_minibatches: int = arg(4, "optimizer steps per inner epoch (is, rwr, rwr-sparse); sf always takes one "
                                  "step per round, as its samples must come from the current θ")
    inner_epochs: int = arg(1, "passes over each round's samples (is, rwr, rwr-sparse)")
    train_batch_size: int = arg(4, "samples per training forward pass; a minibatch larger than this is "
                                   "accumulated over several passes")
    timestep_fraction: float = arg(1.0, "fraction of the T timesteps trained on, drawn per sample")
    clip_range: float = arg(1e-4, "ε, DDPO_IS ratio clip: loss = max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε))")
    rwr_beta: float = arg(1.0, "β, RWR inverse temperature: w = exp(β·A)/Z on the normalised advantage A")
    rwr_threshold: Optional[float] = arg(None, "C, rwr-sparse keeps samples with r ≥ C; default: the 90th "
                                               "percentile of the round's rewards")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        sys.exit(f"error: {message} (see --help)")


def parse_args(argv=None) -> Args:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    choices = {"reward": list(rewards_lib.REWARDS), "algo": ALGOS, "advantage": ("per-prompt", "batch")}
    for f in dataclasses.fields(Args):
        kind = float if f.name == "rwr_threshold" else f.type
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                       choices=choices.get(f.name), help=f.metadata["help"])
    args = Args(**vars(p.parse_args(argv)))
    checks = {"eta": args.eta > 0, "clip_range": args.clip_range > 0, "num_steps": args.num_steps > 0,
              "epochs": args.epochs >= 0, "timestep_fraction": 0 < args.timestep_fraction <= 1,
              "samples_per_epoch": args.samples_per_epoch > 0, "adv_clip": args.adv_clip > 0}
    for name, ok in checks.items():
        if not ok:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} is out of range")
    minibatches = 1 if args.algo == "sf" else args.num_minibatches
    if args.samples_per_epoch % args.sample_batch_size or args.samples_per_epoch % minibatches:
        p.error(f"--samples-per-epoch {args.samples_per_epoch} must be a multiple of --sample-batch-size "
                f"{args.sample_batch_size} and of the {minibatches} minibatches")
    args.prompts = args.prompts or rewards_lib.DEFAULT_PROMPTS[args.reward]
    args.run_name = args.run_name or f"{args.reward}__{args.algo}__{args.seed}__{int(time.time())}"
    return args


def fail(message):
    """Stop with one clear line on stderr and a non-zero exit."""
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------------------------------------
# The policy π(x_{t-1} | x_t, c): one DDIM step with η > 0 (paper §3.1; DDIM, Song et al. 2021)
# ----------------------------------------------------------------------------------------------------------

def prev_timestep(scheduler, t):
    """The DDIM timestep after t (as diffusers counts it; negative at the last step)."""
    return t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def ddim_step(scheduler, model_output, x_t, t, eta):
    """Mean μ and standard deviation σ_t of p(x_{t-1} | x_t): DDIM eq. (12) with σ_t of eq. (16).

    t is a (B,) tensor of timesteps, so one call can serve samples at different steps. Everything is fp32.
    """
    x_t, model_output = x_t.float(), model_output.float()
    alphas = scheduler.alphas_cumprod.to(x_t.device)
    t = t.to(x_t.device)
    t_prev = prev_timestep(scheduler, t)
    view = (-1,) + (1,) * (x_t.ndim - 1)
    alpha_bar = alphas[t].view(view)
    # the last step uses the scheduler's final ᾱ (ᾱ_0 < 1 for SD), which keeps σ_t > 0
    alpha_bar_prev = torch.where(t_prev >= 0, alphas[t_prev.clamp(min=0)], scheduler.final_alpha_cumprod).view(view)
    if scheduler.config.prediction_type == "epsilon":
        eps = model_output
        x0_hat = (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    elif scheduler.config.prediction_type == "v_prediction":  # SD 2.x 768-v
        x0_hat = alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * model_output
        eps = alpha_bar.sqrt() * model_output + (1 - alpha_bar).sqrt() * x_t
    else:
        raise ValueError(f"prediction_type {scheduler.config.prediction_type!r} is not supported")
    if scheduler.config.clip_sample:
        x0_hat = x0_hat.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    # DDIM eq. (16): σ_t = η √((1 − ᾱ_{t−1})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1})
    sigma_t = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)).sqrt() * (1 - alpha_bar / alpha_bar_prev).sqrt()
    # DDIM eq. (12): μ = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂
    mean = alpha_bar_prev.sqrt() * x0_hat + (1 - alpha_bar_prev - sigma_t**2).sqrt() * eps
    return mean, sigma_t


def gaussian_log_prob(x_prev, mean, sigma_t):
    """log N(x_{t-1}; μ, σ_t² I), averaged (not summed) over dimensions, in fp32.

    x_{t-1} is the action already taken: a constant, so the gradient flows only through μ. Averaging keeps
    ratios finite: summed over 16,384 SD latent values a per-value ratio of 1.01 would be 1.01^16384.
    """
    x_prev, mean = x_prev.detach().float(), mean.float()
    log_prob = -((x_prev - mean) ** 2) / (2 * sigma_t**2) - torch.log(sigma_t) - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, x_prev.ndim)))  # (B,)


# ----------------------------------------------------------------------------------------------------------
# Models: the tiny built-in model and Stable Diffusion load through the same from_pretrained calls
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Models:
    unet: torch.nn.Module  # ε_θ(x_t, t, c): the only part trained
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # DDIMScheduler
    vae: Optional[torch.nn.Module]  # None: the model works in pixel space
    device: str


def load_models(name, device) -> Models:
    """Load a diffusers-format folder or hub id: unet, text_encoder, tokenizer, scheduler (+ vae if listed)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    path = str(TINY_MODEL if name == "tiny" else name)
    try:
        components = DiffusionPipeline.load_config(path)  # model_index.json
        models = Models(
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
            tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer"),
            scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler"),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae") if "vae" in components else None,
            device=device)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"cannot load model {name!r} ({first_line}); without network use --model tiny or a local folder")
    for module in (models.text_encoder, models.vae):
        if module is not None:
            module.requires_grad_(False).eval().to(device)
    models.unet.to(device).train()
    return models


@torch.no_grad()
def encode_prompts(models, prompts):
    """The condition c as the UNet sees it: the text encoder's last hidden state (B, L, D)."""
    tok = models.tokenizer(prompts, padding="max_length", max_length=models.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
    return models.text_encoder(tok.input_ids.to(models.device))[0]


@torch.no_grad()
def decode(models, x0):
    """x_0 (latent or pixel) → images in [0, 1], (B, 3, H, W) fp32."""
    if models.vae is not None:
        x0 = models.vae.decode(x0.to(models.vae.dtype) / models.vae.config.scaling_factor).sample
    return (x0.float() / 2 + 0.5).clamp(0, 1)


def ddpm_loss(models, x0, cond, generator):
    """DDPM loss (paper eq. 1, ε-form): ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t, c)‖², one value per sample (B,).

    Serves RWR (on the model's own samples) and the tiny model's pretraining.
    """
    sched = models.scheduler
    t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    x_t = sched.add_noise(x0, noise, t)
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
    pred = models.unet(x_t, t, encoder_hidden_states=cond).sample
    return ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, x0.ndim)))


# ----------------------------------------------------------------------------------------------------------
# Prompts: p(c) (paper §5)
# ----------------------------------------------------------------------------------------------------------

def read_prompt_file(path):
    path = Path(path)
    if not path.is_file():
        fail(f"prompt file {path} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
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
