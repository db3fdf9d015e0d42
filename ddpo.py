"""DDPO: Training Diffusion Models with Reinforcement Learning (Black, Janner, Du, Kostrikov, Levine, 2023).

arXiv 2305.13301; sections, equations and appendices as its v4 (ICLR 2024) numbers them. The idea: denoising is a
multi-step MDP (§4.3). The state is s_t = (c, t, x_t), the action is a_t = x_{t-1}, and the policy is the reverse
step π(a_t | s_t) = p_θ(x_{t-1} | x_t, c) = N(μ_θ(x_t, t, c), σ_t² I), a Gaussian whose log-probability is exact.
The only reward comes at the end, r(x_0, c). So we can sample images, score them, and run policy gradients
on the denoiser (DDPO_SF, DDPO_IS). The one-step-MDP baselines (RWR, §4.2) are here too.

This file reads top to bottom like the paper:
    Args → the policy step: DDIM's (§3.1), Flow-GRPO's SDE for flow models, and the log-prob → models → MDP
    rollout (§4.3) → rewards, advantages (App. D.3) → the four estimators (§4.2, §4.3) → train() → the command line.
Flow-GRPO (Liu et al. 2025) is the same MDP on a rectified-flow model (Stable Diffusion 3): only the step differs.
What serves a run around the algorithm (the command line's checks, model folders, run files, checkpoints, several
processes, Ctrl-C, pictures) lives in plumbing/, in modules named for what they hold; none of them imports this file.

    python ddpo.py --reward jpeg --algo is              # tiny built-in model, 2 CPU cores, 9 to 27 minutes
    python ddpo.py --model tiny-flow --reward jpeg      # the same on the tiny flow-matching model (Flow-GRPO)
    python ddpo.py @configs/sd14_compressibility.txt    # the paper's setup, on a GPU
    python evaluate.py runs/NAME                         # base | fine-tuned, same seeds
    python -m pytest -q -n 2 --dist loadgroup            # the tests pin every formula with numbers
"""
import copy
import dataclasses
import functools
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

import rewards as rewards_lib
from plumbing import command_line
from plumbing.checkpoints import is_run, load_run_weights, stopped_at_once
from plumbing.command_line import complete, describe
from plumbing.files import RunError, fail
from plumbing.model_checks import check_scheduler, downsampling, mismatched_components, quiet_libraries, resolution_problem
from plumbing.model_folders import freeze, load_parts
from plumbing.pictures import save_eval_grid
from plumbing.processes import (bars, clear_bars, distributed, gather, gather_objects, my_share, start_processes,
                                sum_gradients, together)
from plumbing.training_run import Run
from rewards import compute_rewards, load_prompts
from world import TINY_MODELS  # the built-in models: 'tiny', 'tiny-flow', 'tiny-activities'


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # --- run
    reward: str = arg("jpeg", f"reward function r(x_0, c): from rewards.py ({', '.join(rewards_lib.REWARDS)}), or your "
                              f"own as module:function or path/to/file.py:function (README: Your own reward)")
    algo: str = arg("is", "estimator: sf = DDPO_SF (REINFORCE), is = DDPO_IS (clipped importance sampling), "
                          "rwr = RWR exponential weights, rwr-sparse = RWR sparse weights (paper §4.2, §4.3)")
    model: str = arg("tiny", "built in: 'tiny' (SD v1-style, 32x32 images), 'tiny-flow' (SD3-style), 'tiny-activities' (tiny on "
                             "the world with activities, for --reward alignment); a diffusers folder or hub id of a Stable"
                             "DiffusionPipeline (DDIM policy) or StableDiffusion3Pipeline (Flow-GRPO's SDE); or a run folder")
    lora_rank: Optional[int] = arg(None, "LoRA rank on the denoiser's attention projections; 0 = full fine-tuning. "
                                         "Default: 0 for the tiny models (they learn faster so), 4 otherwise (the "
                                         "PyTorch port's setting)")
    mixed_precision: str = arg("no", "no | fp16 | bf16: frozen weights and the forward pass in that dtype; trainable "
                                     "weights, latents and every log-prob stay fp32")
    prompts: str = arg("", "prompt set p(c): a name in prompts/ (e.g. simple_animals, alignment) or a file path; "
                           "default: the reward's set from the paper")
    seed: int = arg(0, "fixes prompts, noise and therefore results on CPU")
    epochs: int = arg(150, "rounds of (sample, score, train): the paper's training iterations")
    run_name: str = arg("", "folder name under --out-dir; default {reward}__{algo}__{seed}__{time}")
    out_dir: str = arg("runs", "where runs are written")
    save_every: int = arg(5, "write a checkpoint every N epochs (and after the last)")
    resume: str = arg("", "a run folder: continue it from its last checkpoint with its saved settings; only "
                          "--epochs, --save-every and --device may change")
    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "torch device (under torchrun, cuda means each "
                                                                        "process's own GPU: cuda:LOCAL_RANK)")
    collective_timeout: float = arg(600.0, "under torchrun, seconds a process waits for the others at a gather or "
                                           "all-reduce before it stops with an error")
    # --- sampling: the policy (§3.1)
    samples_per_epoch: int = arg(64, "trajectories sampled per round (paper: 256; its RWR 10k, App. D.5)")
    samples_per_prompt: int = arg(8, "k: each round draws samples_per_epoch / k prompts and k trajectories of each "
                                     "(distinct noise); with k ≥ 2 a prompt's advantage uses its own group's statistics "
                                     "until its buffer holds --min-count rewards (group sampling, as in Flow-GRPO)")
    sample_batch_size: int = arg(64, "trajectories per sampling forward pass (a round with fewer samples per process is "
                                 "one batch)")
    num_steps: int = arg(20, "T, DDIM denoising steps per trajectory (paper: 50)")
    eta: float = arg(1.0, "η, DDIM noise scale, 0 < η ≤ 1: σ_t must be > 0 for the policy to have a density, and "
                          "above 1 the DDIM mean is undefined (the authors' code: 1; the paper does not say)")
    noise_level: float = arg(0.7, "a > 0, flow models' SDE noise: σ_t = a √(t / (1 − t)) (Flow-GRPO: 0.7)")
    guidance_scale: float = arg(5.0, "w, classifier-free guidance (paper: 5) in sampling and DDPO's training; RWR trains without")
    resolution: int = arg(0, "image side in pixels, a multiple of the VAE's downsampling times the denoiser's (SD3: its "
                             "patch size); 0 = the model's own (SD v1.4: 512, SD3.5-M: 1024; Flow-GRPO samples it at 512)")
    # --- advantages (App. D.3's per-prompt baseline; buffer and groups: the PyTorch port's, Flow-GRPO's)
    advantage: str = arg("per-prompt", "per-prompt: normalise r by each prompt's recent rewards; batch: normalise by "
                                       "the round's mean and std; value: r − V_φ(x_t, t, c), DPOK's learned baseline "
                                       "(sf, is)")
    buffer_size: int = arg(8, "rewards kept per prompt by the per-prompt tracker (the default, k: the buffer holds "
                              "this round's group, so each sample is normalised by its group; PyTorch port: 16)")
    min_count: int = arg(8, "a prompt uses its buffer's statistics once it has this many rewards; before, its "
                            "group's (--samples-per-prompt ≥ 2) or else the batch's (PyTorch port: 16)")
    adv_clip: float = arg(5.0, "advantages are clipped to ±adv_clip (the PyTorch port's; the paper does not clip)")
    # --- optimisation
    lr: float = arg(2e-4, "AdamW learning rate (the tiny model's full fine-tuning; the PyTorch port's LoRA on SD: 3e-4)")
    max_grad_norm: float = arg(1.0, "gradient norm clip")
    num_minibatches: int = arg(2, "optimizer steps per inner epoch (is, rwr, rwr-sparse; paper: 4, RWR 400). DDPO_IS needs ≥ 2 "
                                  "steps a round: its first step is at θ = θ_old, where the ratio is 1 and the update "
                                  "is DDPO_SF's. sf always takes one step per round: its samples must come from θ")
    inner_epochs: int = arg(1, "passes over each round's samples (is, rwr, rwr-sparse)")
    train_batch_size: int = arg(32, "samples per training forward pass; a minibatch larger than this is "
                                   "accumulated over several passes")
    timesteps_per_pass: int = arg(1, "k, trained timesteps a forward and backward pass (sf, is): 1 (the PyTorch port's) keeps "
                                     "memory flat in T; k > 1 takes k× the activations, on CPU less time (tiny: training 1.4-1.6x faster at 10)")
    timestep_fraction: float = arg(1.0, "fraction of the T timesteps trained on, drawn per sample (paper: all, App. D.1)")
    clip_range: float = arg(1e-3, "ε, DDPO_IS ratio clip (PPO's ε, not the noise): loss = max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε)) (paper: 1e-4 "
                                  "on SD's 16,384 latent values; the log-ratio is a mean over them, whose spread "
                                  "shrinks like 1/√D, so the tiny model's 256 take 8x that)")
    rwr_weights: str = arg("reward", "what RWR's weights exponentiate: reward = the paper's w = exp(β·r)/Z; "
                                        "advantage = w = exp(β·A)/Z on the normalised, clipped advantage A")
    rwr_beta: float = arg(1.0, "β ≥ 0, RWR inverse temperature in exp(β·r)/Z or exp(β·A)/Z (paper: 0.2, Z per prompt)")
    rwr_threshold: Optional[float] = arg(None, "C, rwr-sparse keeps samples with r ≥ C; default: the 90th "
                                               "percentile of the round's rewards")
    # --- DPOK (Fan et al. 2023): a KL penalty towards the pretrained model, a learned value baseline
    kl_coef: float = arg(0.0, "β_KL ≥ 0, DPOK's KL penalty: adds β_KL·KL(π_θ(·|s_t) ‖ π_pre(·|s_t)) on every "
                              "trained step (sf, is); 0 = off")
    value_lr: float = arg(1e-3, "AdamW learning rate of the value function V_φ (--advantage value)")
    value_steps: int = arg(8, "gradient steps a round fitting V_φ to the round's rewards (--advantage value)")
    # --- the learned rewards' models (rewards.py): hub ids, or local folders to work offline
    clip_model: str = arg(*rewards_lib.model_option("clip_model"))
    aesthetic_head: str = arg(*rewards_lib.model_option("aesthetic_head"))
    vlm: str = arg(*rewards_lib.model_option("vlm"))
    bertscore_model: str = arg(*rewards_lib.model_option("bertscore_model"))
    pickscore_model: str = arg(*rewards_lib.model_option("pickscore_model"))
    pickscore_processor: str = arg(*rewards_lib.model_option("pickscore_processor"))
    imagereward_model: str = arg(*rewards_lib.model_option("imagereward_model"))
    imagereward_tokenizer: str = arg(*rewards_lib.model_option("imagereward_tokenizer"))


# ----------------------------------------------------------------------------------------------------------
# The policy π(x_{t-1} | x_t, c): one DDIM step with η > 0 (paper §3.1; DDIM, Song et al. 2021), or for a flow
# model one step of the SDE with the flow's marginals (Flow-GRPO, Liu et al. 2025)
# ----------------------------------------------------------------------------------------------------------

def prev_timestep(scheduler, t):
    """The DDIM timestep after t (as diffusers counts it; negative at the last step)."""
    return t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def ddim_step(scheduler, model_output, x_t, t, eta):
    """Mean μ and std σ_t of p(x_{t-1} | x_t): DDIM eq. (12), σ_t of eq. (16) (DDIM writes α_t for this ᾱ_t).

    t is a (B,) tensor of timesteps, so one call can serve samples at different steps. Everything is fp32.
    """
    x_t, model_output = x_t.float(), model_output.float()
    alphas = scheduler.alphas_cumprod.to(x_t.device)
    t = t.to(x_t.device)
    t_prev = prev_timestep(scheduler, t)
    view = (-1,) + (1,) * (x_t.ndim - 1)
    alpha_bar = alphas[t].view(view)
    # the last step uses the scheduler's final ᾱ (ᾱ_0 < 1 for SD), which keeps σ_t > 0
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=x_t.device)
    alpha_bar_prev = torch.where(t_prev >= 0, alphas[t_prev.clamp(min=0)], final).view(view)
    if scheduler.config.prediction_type == "epsilon":
        eps = model_output
        x0_hat = (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    elif scheduler.config.prediction_type == "v_prediction":  # SD 2.x 768-v
        x0_hat = alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * model_output
        eps = alpha_bar.sqrt() * model_output + (1 - alpha_bar).sqrt() * x_t
    elif scheduler.config.prediction_type == "sample":  # the model predicts x_0 itself
        x0_hat = model_output
        eps = (x_t - alpha_bar.sqrt() * x0_hat) / (1 - alpha_bar).sqrt()
    else:
        raise ValueError(f"prediction_type {scheduler.config.prediction_type!r} is not supported")
    if scheduler.config.clip_sample:
        x0_hat = x0_hat.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    # exercise 1: begin
    # DDIM eq. (16): σ_t = η √((1 − ᾱ_{t−1})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1})
    sigma_t = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)).sqrt() * (1 - alpha_bar / alpha_bar_prev).sqrt()
    # DDIM eq. (12): μ = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂
    mean = alpha_bar_prev.sqrt() * x0_hat + (1 - alpha_bar_prev - sigma_t**2).sqrt() * eps
    # exercise 1: end
    return mean, sigma_t


def flow_sde_step(scheduler, velocity, x_t, t, noise_level):
    """Mean μ and standard deviation of Flow-GRPO's policy (Liu et al. 2025): one Euler–Maruyama step, from t to the
    scheduler's next sigma t + Δt (Δt < 0), of the SDE whose marginals are the flow's at every noise level a.

    Rectified flow as SD3 writes it: x_t = (1 − t) x_0 + t ε, and the model predicts the velocity v_θ ≈ ε − x_0. Here
    t is FlowMatchEulerDiscreteScheduler's sigma (its shift included) and `t` the argument its timesteps (1000·sigma),
    one per sample. At a = 0 the mean is the scheduler's own Euler step x_t + Δt·v_θ (tested). At t = 1, t/(1 − t) is
    infinite: as Flow-GRPO does, 1 − t is then taken at the next sigma. The last step, to t = 0, is the same SDE
    step, as in Flow-GRPO: its σ_t is taken at its own t > 0, so it has a density too.
    """
    x_t, v = x_t.float(), velocity.float()
    sigmas = scheduler.sigmas.to(x_t.device, torch.float32)
    match = scheduler.timesteps.to(x_t.device)[None] == t.to(x_t.device)[:, None]
    if not match.any(1).all():
        raise ValueError("a timestep that is not one of the scheduler's")
    j = match.int().argmax(1)  # each sample's step index
    view = (-1,) + (1,) * (x_t.ndim - 1)
    s, s_next = sigmas[j].view(view), sigmas[j + 1].view(view)  # t and t + Δt
    dt = s_next - s
    # exercise 8: begin
    # σ_t = a √(t / (1 − t)), the noise level that keeps the flow's marginals
    sigma_t = noise_level * (s / (1 - torch.where(s == 1, sigmas[1], s))).sqrt()
    # the SDE's drift, v_θ + σ_t²/(2t) (x_t + (1 − t) v_θ), for one step Δt; its noise has variance σ_t² |Δt|
    mean = x_t + (v + sigma_t**2 / (2 * s) * (x_t + (1 - s) * v)) * dt
    return mean, sigma_t * dt.abs().sqrt()
    # exercise 8: end


def gaussian_log_prob(x_prev, mean, sigma_t):
    """log N(x_{t-1}; μ, σ_t² I), averaged (not summed) over dimensions, in fp32.

    x_{t-1} is the action already taken: a constant, so the gradient flows only through μ. Averaging keeps
    ratios finite: summed over 16,384 SD latent values a per-value ratio of 1.01 would be 1.01^16384. The
    average over D dimensions is log π / D (the PyTorch port's choice), so every ratio is (π_θ/π_θold)^(1/D):
    DDPO_IS's clip stops the gradient once it leaves [1 − ε, 1 + ε], the whole action's ratio [(1 − ε)^D, (1 + ε)^D].
    """
    # exercise 2: begin
    x_prev, mean = x_prev.detach().float(), mean.float()
    log_prob = -((x_prev - mean) ** 2) / (2 * sigma_t**2) - torch.log(sigma_t) - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, x_prev.ndim)))  # (B,)
    # exercise 2: end


def gaussian_kl(mean, mean_pre, sigma_t):
    """KL(N(μ_θ, σ_t² I) ‖ N(μ_pre, σ_t² I)) = ‖μ_θ − μ_pre‖² / (2σ_t²), averaged over dimensions like the log-prob.

    DPOK (Fan et al. 2023, §4): the per-step KL between the fine-tuned and the pretrained policy; times D and summed
    over t, in expectation over θ's own trajectories, it bounds KL(p_θ(x_0|c) ‖ p_pre(x_0|c)). Both Gaussians share
    σ_t, so it is this closed form, no sampling. Here the states are the round's (from θ_old) and the trained steps.
    """
    # exercise 7: begin
    kl = (mean.float() - mean_pre.detach().float()) ** 2 / (2 * sigma_t**2)
    return kl.mean(dim=tuple(range(1, mean.ndim)))  # (B,)
    # exercise 7: end


# ----------------------------------------------------------------------------------------------------------
# Models: the tiny built-in models are Stable Diffusion (v1, 3), loaded through the same from_pretrained calls
# ----------------------------------------------------------------------------------------------------------

PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections, as in the PyTorch port
FLOW_LORA_TARGETS = LORA_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]  # + the text stream's (Flow-GRPO)


@dataclass
class Models:
    denoiser: torch.nn.Module  # on latents: the UNet ε_θ or v_θ(x_t, t, c) (the tiny one: v) or SD3's transformer v_θ; the only part trained
    text_encoder: torch.nn.Module  # (SD3: the first of its text encoders; its pipeline's encode_prompt uses them all)
    tokenizer: object
    scheduler: object  # DDIMScheduler (the DDIM policy), or FlowMatchEulerDiscreteScheduler (Flow-GRPO's SDE policy)
    vae: torch.nn.Module  # AutoencoderKL: the policy acts on its latents, the reward sees its decoded images
    device: str
    dtype: torch.dtype = torch.float32  # of the frozen weights and the denoiser's forward pass (autocast)
    reference: Optional[torch.nn.Module] = None  # a frozen copy of the denoiser as loaded: π_pre but for a new LoRA adapter
    pipeline: object = None  # SD3: its StableDiffusion3Pipeline, whose own encode_prompt gives c

    @property
    def flow(self):  # a rectified-flow model: Flow-GRPO's SDE step is its policy
        return self.pipeline is not None

    def autocast(self):
        return torch.autocast(self.device.split(":")[0], dtype=self.dtype, enabled=self.dtype != torch.float32)


def load_models(name, device, lora_rank=0, mixed_precision="no") -> Models:
    """A diffusers folder or hub id: a StableDiffusionPipeline's (unet, vae, text_encoder, tokenizer; its scheduler
    loaded as DDIMScheduler; the built-in 'tiny' is one) or a StableDiffusion3Pipeline, loaded whole ('tiny-flow' is
    one); or a run folder: its base model with the trainable weights of its last checkpoint."""
    if is_run(name):
        saved = load_run_args(name)
        models = load_models(saved.model, device, saved.lora_rank, mixed_precision)
        load_run_weights(models, name)
        return models
    *parts, pipeline = load_parts(name, str(TINY_MODELS.get(name, name)))  # from_pretrained (plumbing/model_folders.py)
    models = Models(*parts, device, PRECISIONS[mixed_precision], pipeline=pipeline)
    if problem := mismatched_components(models):
        fail(f"model {name} does not fit together: {problem}")
    more = [models.pipeline.text_encoder_2, models.pipeline.text_encoder_3] if models.flow else []  # SD3's, T5 or None
    for module in [models.text_encoder, models.vae, *filter(None, more)]:  # frozen: no gradients, the run's precision
        freeze(module, models.dtype, device)
    if lora_rank > 0:
        from peft import LoraConfig

        models.denoiser.requires_grad_(False).to(models.dtype)
        models.denoiser.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                               target_modules=FLOW_LORA_TARGETS if models.flow else LORA_TARGETS))
        for p in models.denoiser.parameters():  # the adapter trains in fp32 over the frozen low-precision base
            if p.requires_grad:
                p.data = p.data.float()
    models.denoiser.to(device).train()
    return models


def encode_prompts(models, prompts):
    """c as the denoiser takes it, a dict of its keyword arguments: the UNet's encoder_hidden_states (B, L, D), the
    text encoder's last hidden state; SD3's from its pipeline's own encode_prompt: token states (B, L, D) and pooled
    CLIP embeddings (B, P), with 128 T5 tokens as Flow-GRPO (none without T5, as tiny-flow). Frozen during DDPO; the
    tiny models' pretraining trains the text encoders through here."""
    if models.flow:
        t5 = 128 if models.pipeline.text_encoder_3 is not None else 0
        states, _, pooled, _ = models.pipeline.encode_prompt(prompts, None, None, device=models.device,
                                                             do_classifier_free_guidance=False, max_sequence_length=t5)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}
    tok = models.tokenizer(prompts, padding="max_length", max_length=models.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
    return {"encoder_hidden_states": models.text_encoder(tok.input_ids.to(models.device))[0]}


def pick(cond, rows):  # c of some samples: those rows of each of its tensors
    return {k: v[rows] for k, v in cond.items()}


def repeat(cond, n):  # one prompt's c (its first row) for n samples, e.g. ∅ for classifier-free guidance
    return {k: v[:1].expand(n, *v.shape[1:]) for k, v in cond.items()}


def denoise(models, x_t, t, cond):
    """The denoiser's prediction at (x_t, t, c), (B, C, H, W): the UNet's ε, v or x_0, or the transformer's velocity."""
    with models.autocast():
        return models.denoiser(**{"hidden_states" if models.flow else "sample": x_t}, timestep=t, **cond,
                               return_dict=False)[0]


@torch.no_grad()
def decode(models, x0):
    """Latents x_0 → images in [0, 1], (B, 3, H, W) fp32: the VAE decodes x_0 / scaling_factor + shift_factor (the
    denoiser works on latents scaled to unit variance; SD3's VAE shifts them too), as diffusers' pipelines do."""
    config = models.vae.config
    images = models.vae.decode(x0.to(models.vae.dtype) / config.scaling_factor + (config.shift_factor or 0)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def ddpm_noise(scheduler, shape, generator):
    """The DDPM loss's draws for shape[0] samples: timesteps t ~ U{0, …, 999} and noise ε ~ N(0, I) of `shape`."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (shape[0],), generator=generator)
    return t, torch.randn(shape, generator=generator)


def ddpm_loss(models, x0, cond, t, noise):
    """DDPM loss (DDPM's L_simple, Ho et al. eq. 14; DDPO's eq. 1, in μ-form, is the same objective up to a weight per t): ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t, c)‖², one value per sample (B,).

    For a v-prediction model (the tiny one) the target is v = √ᾱ_t ε − √(1−ᾱ_t) x_0, for an x_0-prediction
    model x_0: the same loss in that model's own parametrisation. Serves RWR (on the model's own samples) and
    the tiny model's pretraining.
    """
    sched = models.scheduler
    t, noise = t.to(x0.device), noise.to(x0.device, x0.dtype)  # from ddpm_noise
    x_t = sched.add_noise(x0, noise, t)
    kind = sched.config.prediction_type
    target = noise if kind == "epsilon" else x0 if kind == "sample" else sched.get_velocity(x0, noise, t)
    return ((denoise(models, x_t, t, cond).float() - target.float()) ** 2).mean(dim=tuple(range(1, x0.ndim)))


def flow_matching_loss(models, x0, cond, t, noise):
    """Rectified flow's loss (SD3; Esser et al. 2024, eq. 2 with unit weights): ‖(ε − x_0) − v_θ(x_t, t, c)‖² with
    x_t = (1 − t) x_0 + t ε, one value per sample (B,). t is the scheduler's training sigma number t ~ U{0, …, 999}
    (its shift included), where SD3's own training draws t from a logit-normal. The flow models' DDPM loss: it serves
    RWR on them and tiny-flow's pretraining."""
    schedule = type(models.scheduler).from_config(models.scheduler.config)  # the 1000 training sigmas, not set_timesteps'
    timestep = schedule.timesteps[t]
    x_t = schedule.scale_noise(x0, timestep, noise.to(x0.device, x0.dtype))
    return ((denoise(models, x_t, timestep.to(x0.device), cond).float() - (noise - x0).float()) ** 2).mean(
        dim=tuple(range(1, x0.ndim)))


# ----------------------------------------------------------------------------------------------------------
# The MDP (paper §4.3): s_t = (c, t, x_t), a_t = x_{t-1}, π(a_t | s_t) = p_θ(x_{t-1} | x_t, c).
# Initial state ρ_0 = (p(c), δ_T, N(0, I)): a prompt, t = T, pure noise. The transition is deterministic,
# s_{t+1} = (c, t−1, a_t). The reward is r(x_0, c) at the last step and 0 before, so every step's return is r(x_0, c).
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Trajectories:
    prompts: list  # c, B strings
    cond: dict  # c as the denoiser takes it (encode_prompts), B rows
    states: torch.Tensor  # x_T … x_0, (B, T+1, C, H, W): s_t = (c, timesteps[j], states[:, j]), a_t = states[:, j+1]
    timesteps: torch.Tensor  # t of each step j, (T,)
    log_probs: torch.Tensor  # log π(a_t | s_t) / D (gaussian_log_prob) under the sampling policy θ_old, (B, T)

    @staticmethod
    def cat(parts):
        return Trajectories(sum((p.prompts for p in parts), []), {k: torch.cat([p.cond[k] for p in parts])
                            for k in parts[0].cond}, torch.cat([p.states for p in parts]), parts[0].timesteps,
                            torch.cat([p.log_probs for p in parts]))


def policy(models, x_t, t, cond, uncond, guidance_scale, level):
    """π(· | s_t) = N(μ_θ(x_t, t, c), σ² I): the guided prediction, then the model's step: DDIM's for a UNet (level:
    η; σ = σ_t of eq. 16), Flow-GRPO's SDE for a flow model (level: a, not the action; σ = σ_t √Δt). Returns μ, σ.

    Classifier-free guidance on the denoiser's output (pred: ε, v or x_0 for a UNet, each affine in ε at fixed x_t):
    ε̂ = ε_θ(x_t, t, ∅) + w (ε_θ(x_t, t, c) − ε_θ(x_t, t, ∅))."""
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}  # unconditional and conditional in one pass, 2B rows
    pred_uncond, pred_cond = denoise(models, torch.cat([x_t, x_t]), torch.cat([t, t]), both).float().chunk(2)
    pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
    return (flow_sde_step if models.flow else ddim_step)(models.scheduler, pred, x_t, t, level)


def noise_scale(models, args):
    """The policy's noise: a (--noise-level) for a flow model, η (--eta) for DDIM."""
    return args.noise_level if models.flow else args.eta


@torch.no_grad()
def pretrained_mean(models, *policy_args):
    """μ_pre(x_t, t, c) of π_pre (DPOK's KL): always the model this run started from. models.reference, a frozen copy
    of the denoiser as loaded, under full fine-tuning and for --model RUN (RUN's weights or adapter when this run
    began); with a new LoRA adapter the same denoiser with its adapter switched off, i.e. the base model (one
    denoiser in memory)."""
    if models.reference is not None:
        return policy(dataclasses.replace(models, denoiser=models.reference), *policy_args)[0]
    models.denoiser.disable_adapters()
    try:
        return policy(models, *policy_args)[0]
    finally:
        models.denoiser.enable_adapters()


def noise_generators(seed, indices, epoch=0, stream=0):
    """One torch.Generator per trajectory, seeded from (seed, stream, epoch, the trajectory's index in its round) by
    numpy's SeedSequence. A trajectory's noise (x_T, then each step's) depends on nothing else: 1 process drawing 16
    trajectories and 2 processes drawing 8 each draw the same 16, in any sampling batch size. Streams: 0 training,
    1 the per-epoch eval samples, 2 evaluate.py."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stream, epoch, i]).generate_state(1, np.uint64)[0]))
            for i in indices]


def latent_shape(models, resolution):
    """x_t's shape (C, H, W): --resolution over the VAE's downsampling, or the denoiser's own sample size (0)."""
    side = resolution // downsampling(models.vae.config) or models.denoiser.config.sample_size
    return models.denoiser.config.in_channels, side, side


@torch.no_grad()
def rollout(models, prompts, args, generators) -> Trajectories:
    """Sample one trajectory per prompt, each from its own generator: x_T ~ N(0, I), then T actions a_t = x_{t-1} ~ π(· | s_t)."""
    models.scheduler.set_timesteps(args.num_steps)
    cond = encode_prompts(models, prompts)
    uncond = repeat(encode_prompts(models, [""]), len(prompts))
    shape = latent_shape(models, args.resolution)
    noise = lambda: torch.stack([torch.randn(shape, generator=g) for g in generators]).to(models.device)  # noqa: E731
    x_t = noise()  # ρ_0: x_T ~ N(0, I), (B, C, H, W)
    states, log_probs = [x_t], []
    for timestep in models.scheduler.timesteps:
        t = timestep.expand(len(prompts)).to(models.device)
        mean, sigma_t = policy(models, x_t, t, cond, uncond, args.guidance_scale, noise_scale(models, args))
        x_t = mean + sigma_t * noise()  # the action x_{t-1}
        log_probs.append(gaussian_log_prob(x_t, mean, sigma_t))
        states.append(x_t)
    return Trajectories(list(prompts), cond, torch.stack(states, 1), models.scheduler.timesteps.clone(),
                        torch.stack(log_probs, 1))


def rescore(models, traj, rows, j, uncond, args):
    """log π_θ(a_t | s_t) under the *current* θ for samples `rows` at step indices j (one per row), (b,);
    and KL(π_θ(·|s_t) ‖ π_pre(·|s_t)), (b,), when --kl-coef > 0 (else None).

    uncond is the empty prompt's condition, one row or more; its first row serves every sample."""
    policy_args = (traj.states[rows, j], traj.timesteps[j].to(models.device), pick(traj.cond, rows),
                   repeat(uncond, len(rows)), args.guidance_scale, noise_scale(models, args))
    mean, sigma_t = policy(models, *policy_args)
    kl = gaussian_kl(mean, pretrained_mean(models, *policy_args), sigma_t) if args.kl_coef > 0 else None
    return gaussian_log_prob(traj.states[rows, j + 1], mean, sigma_t), kl


class NonFinite(RunError):
    """Non-finite latents, images, losses, gradients or weights: the run stops at the first."""


def sample(models, prompts, args, generators, batch_size, desc="sampling"):
    """Rollouts for many prompts in batches (generators: noise_generators, one per prompt); returns the trajectories
    and the decoded images. Non-finite latents or images stop the run here, before they can be scored (a black
    image is the smallest JPEG)."""
    parts = [rollout(models, prompts[i:i + batch_size], args, generators[i:i + batch_size])
             for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, disable=bars())]
    traj = Trajectories.cat(parts)
    finite = torch.isfinite(traj.states).flatten(2).all(2).all(0)  # (T+1,): is step j finite for every sample
    if not finite.all():
        j = int((~finite).nonzero()[0])
        raise NonFinite(f"non-finite latents while sampling, first after policy step {j} of {len(traj.timesteps)}")
    images = torch.cat([decode(models, p.states[:, -1]) for p in parts])
    if not torch.isfinite(images).all():
        raise NonFinite("non-finite images from the decoder")
    return traj, images


# ----------------------------------------------------------------------------------------------------------
# Rewards and advantages (paper §5; advantages: App. D.3)
# ----------------------------------------------------------------------------------------------------------

def load_reward(args):
    """The reward callable, its models (if any) loaded before anything is sampled."""
    try:
        return rewards_lib.make_reward(args.reward, args.device, **{k: getattr(args, k) for k in rewards_lib.MODEL_OPTIONS})
    except rewards_lib.RewardLoadError as e:
        fail(f"reward {args.reward!r}: {e}")


class PerPromptStatTracker:
    """Normalise each reward by the mean/std of the recent rewards of the *same prompt*.

    A prompt with fewer than min_count rewards in its buffer is normalised with its own group's statistics when
    each prompt is sampled group_size ≥ 2 times a round, and with the batch's statistics otherwise.

    Prompts are drawn independently (with replacement, as in the paper), so a prompt can be drawn twice in a round.
    Its buffer then keeps *all* of its rewards of this round (2k), and older ones up to buffer_size in all: its two
    groups are i.i.d. samples of one prompt and share its statistics. (Cutting to buffer_size = k would keep only
    the second group and normalise the first by the second's mean and std.)
    """

    def __init__(self, buffer_size, min_count, group_size=1):
        self.buffer_size, self.min_count, self.group_size, self.buffers = buffer_size, min_count, group_size, {}

    def __call__(self, prompts, rewards):
        """Advantages (B,), and the fraction of samples normalised by their own prompt's statistics."""
        # exercise 3: begin
        rewards, prompts = np.asarray(rewards, dtype=np.float64), np.asarray(prompts)
        advantages, own = np.empty_like(rewards), 0
        for prompt in np.unique(prompts):
            of_prompt = prompts == prompt
            buffer = self.buffers.setdefault(str(prompt), [])
            new = rewards[of_prompt].tolist()  # this round's, all kept; then the most recent older ones
            buffer[:] = (buffer[-(self.buffer_size - len(new)):] if len(new) < self.buffer_size else []) + new
            if len(buffer) >= self.min_count:
                stats = np.array(buffer)
            else:  # not enough history yet: this round's group of the prompt, or the whole batch
                stats = rewards[of_prompt] if self.group_size > 1 else rewards
            own += of_prompt.sum() if stats is not rewards else 0
            advantages[of_prompt] = (rewards[of_prompt] - stats.mean()) / (stats.std() + 1e-6)
        return torch.tensor(advantages, dtype=torch.float32), own / len(rewards)
        # exercise 3: end


def compute_advantages(tracker, prompts, rewards, args):
    """A = normalised reward (per prompt, or over the batch), clipped to ±adv_clip; and the fraction of samples
    that their own prompt's statistics normalised (logged as adv/per_prompt_fraction)."""
    if args.advantage == "per-prompt":
        advantages, own = tracker(prompts, rewards)
    else:
        advantages, own = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6), 0.0
    return advantages.clamp(-args.adv_clip, args.adv_clip), own


class ValueFunction(torch.nn.Module):
    """DPOK's learned baseline V_φ(x_t, t, c) ≈ E[r(x_0, c) | s_t]: two strided convolutions on x_t, pooled, then
    with the timestep (t / 1000) and the prompt's mean token embedding an MLP to one number. Small on purpose:
    it only needs to predict the reward's part that the state already decides."""

    def __init__(self, channels, cond_dim, width=64):
        super().__init__()
        conv = lambda c_in: torch.nn.Conv2d(c_in, width, 3, stride=2, padding=1)  # noqa: E731
        self.image = torch.nn.Sequential(conv(channels), torch.nn.SiLU(), conv(width), torch.nn.SiLU(),
                                         torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Sequential(torch.nn.Linear(width + cond_dim + 1, width), torch.nn.SiLU(), torch.nn.Linear(width, 1))
        torch.nn.init.zeros_(self.head[-1].weight)  # V_φ = its output bias, a constant, until fitted: round 1's
        # advantages, normalised over the round, are then the batch's (the constant cancels)
        self.register_buffer("fitted", torch.tensor(False))  # the output bias starts at the first round's mean reward

    def forward(self, x_t, t, cond):  # (N, C, H, W), (N,) timesteps, c's token states (N, L, D) → (N,)
        features = torch.cat([self.image(x_t.float()), cond.float().mean(1), t.float()[:, None] / 1000], 1)
        return self.head(features).squeeze(1)


def value_at(value, traj, j, rows=slice(None)):
    """V_φ(s_t) at step index j of the trajectories `rows` (default: all), (b,)."""
    states = traj.states[rows, j]
    t = traj.timesteps[j].expand(len(states)).to(states.device)
    return value(states, t, traj.cond["encoder_hidden_states"][rows])


def value_advantages(value, traj, rewards, args):
    """DPOK's advantage of step t: A = r − V_φ(s_t), normalised over the round as the batch advantages are, and
    clipped, (B, T). V_φ has not seen this round's rewards (fit_value runs after), so a sample's baseline never
    contains its own reward. Also returns what V_φ's error on these new trajectories was. rewards: the round's;
    traj: this process's share of it."""
    batches = torch.arange(len(traj.prompts)).split(args.sample_batch_size)  # as sampled: N processes compute as 1
    with torch.no_grad():
        v = torch.stack([torch.cat([value_at(value, traj, j, rows) for rows in batches])
                         for j in range(traj.log_probs.shape[1])], 1)  # (B, T)
        delta = gather(my_share(rewards).to(traj.states.device)[:, None] - v)  # the round's, (B, T)
    advantages = (delta - delta.mean()) / (delta.std(unbiased=False) + 1e-6)
    variance = rewards.var(unbiased=False).item()
    logs = {"value/loss": delta.pow(2).mean().item(),  # on rewards V_φ has not been fitted to
            "value/explained_variance": 1 - delta.var(unbiased=False).item() / variance if variance > 0 else 0.0}
    return advantages.clamp(-args.adv_clip, args.adv_clip).cpu(), logs


def fit_value(value, optimizer, traj, rewards, args):
    """Regress V_φ(s_t) onto the round's final rewards r at every step t (DPOK's value baseline): value_steps
    full-batch AdamW steps on the mean squared error, one backward per step t (memory stays at B states).
    rewards: the round's; traj: this process's share (the gradients are summed over the processes)."""
    rewards = rewards.to(traj.states.device)
    if not value.fitted:  # V_φ predicts rewards on their own scale, which AdamW's small steps would take long to reach
        value.head[-1].bias.data.fill_(rewards.mean().item())
        value.fitted.fill_(True)
    T = traj.log_probs.shape[1]
    for _ in range(args.value_steps):
        optimizer.zero_grad(set_to_none=True)
        for j in range(T):  # the sum over this process's samples / the round's count: the mean once summed
            ((value_at(value, traj, j) - my_share(rewards)).pow(2).sum() / (len(rewards) * T)).backward()
        sum_gradients(list(value.parameters()))
        optimizer.step()


# ----------------------------------------------------------------------------------------------------------
# The four estimators
# ----------------------------------------------------------------------------------------------------------

def ddpo_sf_loss(log_prob, advantages):
    """DDPO_SF (REINFORCE, §4.3, its r(x_0, c) here App. D.3's advantage A): ∇ loss = −E[A ∇_θ log π_θ / D]; data from θ."""
    # exercise 4: begin
    return -(advantages * log_prob).mean()
    # exercise 4: end


def ddpo_is_loss(log_prob, old_log_prob, advantages, clip_range):
    """DDPO_IS (§4.3, App. D.1) with PPO's clip: loss = E[max(−A·ratio, −A·clip(ratio, 1−ε, 1+ε))], ratio = (π_θ/π_θold)^(1/D).

    The max of the two losses is the pessimistic one: once the ratio has left [1−ε, 1+ε] in the direction the
    advantage pushes it, the loss is flat and that sample gives no gradient. Returns loss, approx_kl (of the
    per-dimension ratio: ≈ KL/D², where losses/kl is DPOK's KL/D), clipfrac."""
    # exercise 5: begin
    logratio = log_prob - old_log_prob
    ratio = torch.exp(logratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = torch.max(pg_loss1, pg_loss2).mean()
    with torch.no_grad():
        approx_kl = 0.5 * (logratio**2).mean()
        clipfrac = ((ratio - 1).abs() > clip_range).float().mean()
    return loss, approx_kl, clipfrac
    # exercise 5: end


def rwr_exponential_weights(x, beta):
    """RWR (§4.2): w = exp(β x) / Z, Z making the weights average 1 over the round (App. D.3: over each prompt's;
    D.5: β = 0.2). x: the reward r, as §4.2 writes it, or the per-prompt normalised advantage A (--rwr-weights)."""
    # exercise 6: begin
    return torch.softmax(beta * x, dim=0) * len(x)
    # exercise 6: end


def rwr_sparse_weights(rewards, threshold):
    """Sparse RWR (§4.2, filtered finetuning): w = 1[r ≥ C], scaled so the loss is the mean over kept samples."""
    # exercise 6: begin
    keep = (rewards >= threshold).float()
    return keep / keep.mean() if keep.any() else keep
    # exercise 6: end


def rwr_weights(args, rewards, advantages):
    """The round's RWR weights: exponential on r or A (--rwr-weights), or sparse with C = --rwr-threshold, by
    default the round's 90th percentile of r (the top tenth kept; App. D.3 picks C for each prompt)."""
    if args.algo == "rwr":
        return rwr_exponential_weights(rewards if args.rwr_weights == "reward" else advantages, args.rwr_beta)
    threshold = args.rwr_threshold if args.rwr_threshold is not None else torch.quantile(rewards, 0.9).item()
    return rwr_sparse_weights(rewards, threshold)


def round_plan(args, T):
    """(minibatches, inner epochs, timesteps trained) of a round: sf takes one step on all samples, as its data
    must come from the current θ; the others take num_minibatches steps per inner epoch. The number of trained
    timesteps truncates T·fraction, as the PyTorch port does (at least one)."""
    n_minibatches, inner_epochs = (1, 1) if args.algo == "sf" else (args.num_minibatches, args.inner_epochs)
    return n_minibatches, inner_epochs, max(1, int(args.timestep_fraction * T))


def rwr_loss(models, x0, cond, weights, t, noise):
    """RWR: the DDPM loss (flow models: the flow-matching loss) on the model's own samples x_0 (one-step MDP: a = x_0),
    each weighted, on the unguided conditional prediction: not App. E.1's CFG training (its Fig. 10)."""
    return (weights * (flow_matching_loss if models.flow else ddpm_loss)(models, x0, cond, t, noise)).mean()


def backward(loss, scale, scaler, where):
    if not torch.isfinite(loss):
        raise NonFinite(f"non-finite loss {loss.item()} at {where}")
    scaler.scale(loss * scale).backward()


def loss_scaler(args):
    """fp16 needs loss scaling (its small gradients underflow); fp32 and bf16 do not: a disabled scaler."""
    return torch.amp.GradScaler(args.device.split(":")[0], enabled=args.mixed_precision == "fp16")


def policy_gradient_chunk(models, traj, rows, chunk, steps, advantages, args, uncond, scaler, share, logs, where):
    """DDPO_SF or DDPO_IS (+ DPOK's KL) on one chunk of a minibatch: the sum over t of §4.3 (App. D.1), divided by a
    constant (n_timesteps). Each forward and backward pass stacks k = --timesteps-per-pass of every sample's trained
    timesteps, k·b rows, each a sample at one of its own steps; its mean loss carries k / n_timesteps of the chunk."""
    n_timesteps = steps.shape[1]
    for i in range(0, n_timesteps, args.timesteps_per_pass):
        j = steps[chunk, i:i + args.timesteps_per_pass].T.flatten()  # (k·b,) step-major: every sample's i-th step, then i+1-th
        k = len(j) // len(chunk)  # k, or fewer in the last pass
        r, c = rows.repeat(k), chunk.repeat(k)  # (k·b,): each row's sample, in traj and in the round
        log_prob, kl = rescore(models, traj, r, j, uncond, args)
        adv = advantages[c, j] if advantages.ndim == 2 else advantages[c]  # A per sample, or per step (DPOK's V_φ)
        if args.algo == "sf":
            loss = ddpo_sf_loss(log_prob, adv)
        else:  # the old log-prob is the one stored at sampling time, under θ_old
            loss, approx_kl, clipfrac = ddpo_is_loss(log_prob, traj.log_probs[r, j], adv, args.clip_range)
            logs["approx_kl"] += [approx_kl.item()] * k  # k timesteps' worth: the logs weigh every timestep alike
            logs["clipfrac"] += [clipfrac.item()] * k
        if kl is not None:  # DPOK: + β_KL KL(π_θ ‖ π_pre) on the same step
            loss = loss + args.kl_coef * kl.mean()
            logs["kl"] += [kl.mean().item()] * k
        t = "/".join(str(traj.timesteps[s].item()) for s in j[::len(chunk)])  # the chunk's first sample's
        backward(loss, share * k / n_timesteps, scaler, f"{where}, timestep t={t}")
        logs["loss"] += [loss.item()] * k


def rwr_chunk(models, traj, rows, chunk, weights, ddpm_draws, scaler, share, logs, where):
    """RWR on one chunk (§4.2, a one-step MDP): the weighted DDPM loss on the final samples x_0 = states[:, -1]."""
    t_ddpm, eps_ddpm = ddpm_draws
    loss = rwr_loss(models, traj.states[rows, -1], pick(traj.cond, rows), weights[chunk], t_ddpm[chunk], eps_ddpm[chunk])
    backward(loss, share, scaler, where)
    logs["loss"].append(loss.item())


def optimizer_step(optimizer, params, args, scaler, logs, where):
    """A minibatch's update: the processes' gradients summed, unscaled (fp16), clipped, stepped. An fp16 step whose
    gradients overflowed is skipped and its scale lowered; a non-finite gradient without fp16, or non-finite
    weights after the step, stop the run."""
    sum_gradients(list(params.values()))
    scaler.unscale_(optimizer)  # the true gradients, before clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), args.max_grad_norm)
    if torch.isfinite(grad_norm):
        logs["grad_norm"].append(grad_norm.item())
    elif not scaler.is_enabled():
        raise NonFinite(f"non-finite gradient norm {grad_norm.item()} at {where}")
    if scaler.is_enabled() or args.algo == "rwr-sparse":  # fp16: an overflowed step is skipped, the scale lowered
        logs["skipped"].append(float(not torch.isfinite(grad_norm)))
    scaler.step(optimizer)
    scaler.update()
    if not torch.stack([torch.isfinite(p).all() for p in params.values()]).all():  # all finite? one check
        bad = next(n for n, p in params.items() if not torch.isfinite(p).all())
        raise NonFinite(f"non-finite weights ({bad}) after {where}")


def train_round(models, optimizer, traj, advantages, rewards, args, generator, uncond, scaler=None):
    """One round of optimisation on the round's samples; returns the mean of each logged quantity.

    Per inner epoch: each sample's trained timesteps, then the minibatches (a permutation of the round), each
    accumulated chunk by chunk (--train-batch-size) and stepped once. traj: this process's share of the round;
    advantages and rewards: the whole round's. Every process draws the same minibatches and timesteps of the whole
    round and trains on its own samples in them.
    """
    scaler = scaler or loss_scaler(args)  # train() passes its own, whose scale carries over from round to round
    if scaler.is_enabled():  # creates the scale tensor, also on a process that trains no sample of a minibatch
        scaler.scale(torch.zeros((), device=models.device))
    B, T = advantages.shape[0], traj.log_probs.shape[1]  # B: the whole round's samples
    first = distributed()[0] * len(traj.prompts)  # this process holds samples first … first + len(traj.prompts) − 1
    rwr = args.algo.startswith("rwr")
    n_minibatches, inner_epochs, n_timesteps = round_plan(args, T)
    weights = rwr_weights(args, rewards, advantages).to(models.device) if rwr else None
    advantages = advantages.to(models.device)
    params = {n: p for n, p in models.denoiser.named_parameters() if p.requires_grad}
    logs = {"loss": [], "approx_kl": [], "clipfrac": [], "kl": [], "grad_norm": [], "skipped": []}
    bar = tqdm(total=inner_epochs * n_minibatches, desc="training", leave=False, disable=bars())
    n_steps = 0
    for _ in range(inner_epochs):
        # the timesteps each sample trains on, drawn per sample: (B, n_timesteps) step indices
        steps = torch.stack([torch.randperm(T, generator=generator)[:n_timesteps] for _ in range(B)])
        if rwr:  # the DDPM loss's t and ε, one per sample of the round
            ddpm_draws = ddpm_noise(models.scheduler, (B, *traj.states.shape[2:]), generator)
            train_chunk = functools.partial(rwr_chunk, models, traj, weights=weights, ddpm_draws=ddpm_draws)
        else:
            train_chunk = functools.partial(policy_gradient_chunk, models, traj, steps=steps, advantages=advantages,
                                            args=args, uncond=uncond)
        for minibatch in torch.randperm(B, generator=generator).chunk(n_minibatches):
            optimizer.zero_grad(set_to_none=True)
            n_steps += 1
            where = f"optimizer step {n_steps}"
            bar.update()
            if args.algo == "rwr-sparse" and not weights[minibatch].any():
                logs["skipped"].append(1.0)  # no sample here reached C: a zero loss, and AdamW would still move θ
                continue
            held = minibatch[(minibatch >= first) & (minibatch < first + len(traj.prompts))]  # round indices
            with together():  # a non-finite loss on any process stops all of them here
                for chunk in held.split(args.train_batch_size) if len(held) else ():  # none here: zero gradient
                    share = len(chunk) / len(minibatch)  # chunks (on all processes) add up to the minibatch's mean
                    train_chunk(rows=chunk - first, chunk=chunk, scaler=scaler, share=share, logs=logs,  # rows: in traj
                                where=where)
            optimizer_step(optimizer, params, args, scaler, logs, where)
            if logs["loss"]:
                bar.set_postfix(loss=f"{np.mean(logs['loss']):.4g}")
    bar.close()
    logs = {k: sum((part[k] for part in gather_objects(logs)), []) for k in logs}  # every process's passes
    return {k: float(np.mean(v)) for k, v in logs.items() if v}


# ----------------------------------------------------------------------------------------------------------
# Training: sample → reward → advantages → estimator, every epoch (paper §4.3)
# ----------------------------------------------------------------------------------------------------------

def train(args, reward_fn=None):
    """A whole run; returns the metrics, one dict per epoch. args: from parse_args, or an Args made in Python (checked
    and completed here). reward_fn: your own reward(images, prompts) instead of --reward's; its module:name is recorded."""
    if reward_fn is not None:
        name = getattr(reward_fn, "__qualname__", type(reward_fn).__qualname__)
        args = dataclasses.replace(args, reward=f"{reward_fn.__module__}:{name}")
    run = Run(start_processes(complete(args, round_plan)))  # under torchrun: join the others, one device each
    args = run.args
    quiet_libraries()
    prompt_set = load_prompts(args.prompts)  # everything that can fail on bad input fails before a file is written
    reward_fn = reward_fn or load_reward(args)
    random.seed(args.seed)  # a reward of your own may draw from python's, numpy's or torch's global RNG: all three
    np.random.seed(args.seed)  # are seeded here, and the checkpoint carries them across --resume
    torch.manual_seed(args.seed)  # before the models: a LoRA adapter's initial weights are drawn while loading
    models = load_models(args.model, args.device, args.lora_rank, args.mixed_precision)
    if problem := check_scheduler(models.scheduler, args.num_steps) or resolution_problem(models, args.resolution):
        fail(f"cannot use model {args.model}: its {problem}")
    params = [p for p in models.denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)  # the paper's weight decay (App. D.5)
    scaler = loss_scaler(args)
    if args.kl_coef > 0 and (args.lora_rank == 0 or is_run(args.model)):  # π_pre for DPOK's KL: the model this run
        # starts from, frozen; a new LoRA adapter needs no copy: π_pre is the base model, the adapter switched off
        models.reference = copy.deepcopy(models.denoiser).requires_grad_(False).to(models.dtype)
    uncond = encode_prompts(models, [""])  # c = ∅ for classifier-free guidance, one row
    baseline = None  # DPOK's V_φ and its own optimizer
    if args.advantage == "value":
        net = ValueFunction(models.denoiser.config.in_channels, uncond["encoder_hidden_states"].shape[-1]).to(args.device)
        baseline = (net, torch.optim.AdamW(net.parameters(), lr=args.value_lr))
    tracker = PerPromptStatTracker(args.buffer_size, args.min_count, args.samples_per_prompt)
    rng, generator = random.Random(args.seed), torch.Generator().manual_seed(args.seed)  # prompts; timesteps, minibatches
    checkpointed = (models, optimizer, tracker, rng, generator, scaler, baseline)  # all a round depends on: the checkpoint
    start = run.resume(checkpointed) if args.resume else 0
    run.print(describe(args, len(prompt_set), round_plan(args, args.num_steps), run.world, models.flow),
              f"{'resuming after epoch ' + str(start) + ' in' if start else 'writing to'} {run.dir}; "
              f"{sum(p.numel() for p in params):,} trainable parameters (LoRA rank {args.lora_rank}, {args.mixed_precision})")
    eval_prompts = random.Random(args.seed + 1).choices(prompt_set, k=8)

    def evaluate(epoch):
        """The same 8 prompts and noise every epoch, so the grids show how the model changes."""
        _, images = sample(models, eval_prompts, args, noise_generators(args.seed, range(8), stream=1), 8, "evaluating")
        r, extras = compute_rewards(reward_fn, args.reward, images, eval_prompts)
        save_eval_grid(images, eval_prompts, r, extras, run.dir / f"grid_{epoch:03d}")
        return r.mean().item()

    with run:  # Ctrl-C stops after the epoch; a failure on any process stops all, naming the last good checkpoint
        for epoch in run.epochs(evaluate):  # a new run evaluates the pretrained model first (epoch 0)
            k = args.samples_per_prompt  # c ~ p(c): each drawn prompt sampled k times (the same on every process)
            prompts = [c for c in rng.choices(prompt_set, k=args.samples_per_epoch // k) for _ in range(k)]
            mine = my_share(range(len(prompts)))  # this process's trajectories (all of them in one process)
            with together():  # a reward that raises or a NaN on any process stops every process here
                traj, images = sample(models, [prompts[i] for i in mine], args, noise_generators(args.seed, mine, epoch),
                                      args.sample_batch_size)
                run.lap("sample")
                r, _ = compute_rewards(reward_fn, args.reward, images, [prompts[i] for i in mine])
            r = gather(r.to(models.device)).cpu()  # the round's rewards r(x_0, c), (samples_per_epoch,)
            if baseline:  # DPOK: the baseline V_φ as it was before this round, then V_φ fitted to the round
                advantages, extra = value_advantages(baseline[0], traj, r, args)
                fit_value(*baseline, traj, r, args)
            else:
                advantages, fraction = compute_advantages(tracker, prompts, r, args)
                extra = {"adv/per_prompt_fraction": fraction}
            run.lap("reward")
            losses = train_round(models, optimizer, traj, advantages, r, args, generator, uncond, scaler)
            run.lap("train")
            run.log(epoch, r, {**extra, **{f"losses/{name}": v for name, v in losses.items()}}, evaluate)  # + eval
            run.checkpoint(epoch, checkpointed)  # every --save-every epochs, after the last, and when stopped
    return run.history


# ----------------------------------------------------------------------------------------------------------
# The command line: flags → Args, checked and completed (plumbing/command_line.py); --resume's refusals
# ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> Args:
    """Args from --flags and @files of them (configs/*.txt), or --resume's saved ones; each checked (complete)."""
    return command_line.parse_args(Args, round_plan, argv, __doc__.split("\n\n")[0])


def load_run_args(run_dir) -> Args:
    """A run's saved settings (its args.json)."""
    return command_line.load_run_args(Args, run_dir)


def main(argv=None):
    """The command line; also callable as ddpo.main([...]) from Python."""
    try:
        args = parse_args(argv)
        try:
            return train(args)
        except KeyboardInterrupt:  # a second Ctrl-C (or SIGTERM): stop now, keep the last checkpoint
            sys.exit(stopped_at_once(Path(args.out_dir) / args.run_name))
        except RunError as e:  # before the first epoch (in an epoch, train() names it and the last checkpoint)
            fail(str(e))
    finally:
        clear_bars()


if __name__ == "__main__":
    main()
