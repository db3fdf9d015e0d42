"""The tiny built-in model: a toy image world and the two-stage pretraining that produced world/tiny_model/.

DDPO fine-tunes a *pretrained* model: RL only reweights what the model can already draw. So the built-in model
is a small Stable Diffusion v1: a VAE (AutoencoderKL, 32x32 images <-> 4x8x8 latents), a UNet2DConditionModel on
its latents, a CLIPTextModel and a DDIM scheduler, saved by StableDiffusionPipeline.save_pretrained, so the demo
runs the same latent path as Stable Diffusion and diffusers' own pipeline loads it. Its world is procedurally
drawn 32x32 pictures:
  - the prompt's words pick a palette and a shape (the subject word the palette, the last word the shape), so
    guidance and per-prompt advantages mean something;
  - the background is tiled in 4x4 tiles, each tile the background colour plus a random colour offset of
    strength s (s = 0 is a flat background, s = 1 random colours: the world's busiest texture). Each picture
    draws its s around 0.2. JPEG size rises steeply with s, so compressibility can flatten the backgrounds and
    incompressibility fill them with confetti: both rewards have room to move.

Stage 1 trains the VAE on the world's pictures at every strength from flat to the busiest (s uniform in
[0, 1]), so that it keeps the whole range of both rewards (python -m world.tiny_world --reward-range measures it).
Stage 2 trains the UNet and the text encoder with the DDPM loss (ddpo.ddpm_loss, the loss RWR uses) on the
latents of the world as it is drawn. Normal use never runs this file: the models ship with the repository.
To rebuild them, from the repository's root (the same seed on the same machine and thread count gives the same
files):

    python -m world.tiny_world --seed 0 --out world/tiny_model    # both stages: 17 min on 2 CPU cores (measured)
    python -m world.tiny_world --flow --seed 0 --out world/tiny_flow_model   # on tiny_model's VAE: 15 min

The tiny flow model (world/tiny_flow_model/) is the same world for Flow-GRPO: a StableDiffusion3Pipeline whose
SD3Transformer2DModel (joint attention over 16 image and 16 text tokens) and two CLIP text encoders learn stage 2
with the flow-matching loss (ddpo.flow_matching_loss) on the frozen VAE of tiny_model/; it has no T5.
    python -m world.tiny_world --reward-range   # the two JPEG rewards' reference points (under a minute)
    python -m world.tiny_world --ddpm-loss      # the DDPM loss on the model's own samples and on the world's
The tiny judges (world/judges/: a CLIP and LAION's aesthetic head, trained on the world's pictures; world/judges.py):
    python -m world.tiny_world --judges --seed 0    # the CLIP, then the rated pictures and the head: 20 min
    python -m world.tiny_world --judges-check       # how right they are, on freshly drawn pictures: under a minute
The world with activities (world.drawing.scene: "a cat riding a bike" shows the bike in 50% of pictures, as alt-text
names more than its picture shows), the third built-in model on it (world/tiny_activities_model/, --model
tiny-activities) and the alignment experiments' judges (world/judges/vlm, bertscore, attributes;
world/alignment_judges.py), half of whose pictures go through that model's VAE:
    python -m world.tiny_world --world activities --seed 0    # into world/tiny_activities_model: 27 min
    python -m world.tiny_world --alignment-judges --seed 0    # into world/judges: 15 min
    python -m world.tiny_world --alignment-judges-check       # how right they are, on fresh pictures: about a minute
    python -m world.tiny_world --alignment-count --model MODEL_OR_RUN --guidance-scale W   # what it draws, counted
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import ddpo
from plumbing import files, model_checks
import rewards
from world.drawing import SIZE, TILE, draw, scene

WORLDS = {"plain": draw, "activities": scene}  # what the built-in models learn: draw (theirs today) or scene


PRETRAINING_SETS = ("alignment", "alignment_unseen_activities")  # rewards.PROMPT_SETS when the models were built


def all_prompts():
    """Every prompt the project ships (the held-out sets too: pretraining is the 'internet-scale' stage;
    generalisation is about the RL fine-tuning, which never sees them): the files in prompts/ and the sets built
    from them that existed when the built-in models were built (PRETRAINING_SETS; alignment_unseen_animals came
    after, and would change their captions and so their rebuild)."""
    names = [p.stem for p in sorted(rewards.PROMPTS.glob("*.txt"))] + list(PRETRAINING_SETS)
    return sorted({p for name in names for p in rewards.load_prompts(name)})


def one_caption(world):
    """A pretraining caption of the world, drawn as caption(rng): any prompt the project ships, uniformly; in the
    world with activities, half of them instead "a(n) ANIMAL ACTIVITY" for any of the seen and unseen animals and any
    of the six activities. (The shipped prompts name an activity in 276 of 736: too few pictures of each prop, 1.9%
    at alt-text's former rate of 0.3, for the tiny model to tie a prop to its words; it drew props at the unconditional rate
    whatever the prompt.)"""
    prompts = all_prompts()
    if world == "plain":
        return lambda rng: prompts[rng.integers(len(prompts))]
    from world.alignment_judges import answer
    from world.drawing import ACTIVITIES, ANIMALS

    both = [answer(s, a) for s in ANIMALS + tuple(rewards.load_prompts("unseen_animals")) for a in ACTIVITIES]
    return lambda rng: both[rng.integers(len(both))] if rng.random() < 0.5 else prompts[rng.integers(len(prompts))]


def build_tokenizer(prompts, max_length=16, eos=True, extra=()):
    """A word-level tokenizer over the prompts' words, wrapped as a transformers fast tokenizer. Each text is
    [BOS] words [EOS], or without [EOS] (eos=False: a language model's prompt, which the model continues); extra:
    more special tokens (a VLM's <image>)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(prompts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]", *extra]))
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]" if eos else "[BOS] $A",
        special_tokens=[("[BOS]", tok.token_to_id("[BOS]")), ("[EOS]", tok.token_to_id("[EOS]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   unk_token="[UNK]", model_max_length=max_length)


def build_vae():
    """Random-init VAE: 32x32x3 <-> 8x8x4 (three levels, 4x downsampling), ≈0.95M parameters."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1,
                         norm_num_groups=16, sample_size=SIZE)


def build_models(tokenizer, vae=None):
    """Random-init tiny UNet on 4x8x8 latents (≈1.4M parameters, cross-attention at 2x2 and in the middle), CLIP
    text encoder, SD-v1 DDIM scheduler (v-prediction), and the VAE (a random one unless given)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = vae or build_vae()
    unet = UNet2DConditionModel(
        sample_size=SIZE // TILE, in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
        layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    return ddpo.Models(unet, text_encoder, tokenizer, sd_v1_scheduler(prediction_type="v_prediction"), vae, device="cpu")


def sd_v1_scheduler(**overrides):
    """Stable Diffusion v1's DDIM configuration.

    The tiny model predicts v (as SD 2.x does) rather than ε. With ε-prediction a tiny model learns the
    palette from the noisy input itself: an error in x_0 costs SNR(t) times less in the ε-loss, vanishingly
    little at high noise. So it ignored the prompt (measured on an earlier pixel-space tiny model: samples matched
    the prompt's palette at chance level). With v-prediction it must predict x_0 at high noise, where only the
    prompt tells it the palette.
    """
    from diffusers import DDIMScheduler

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return DDIMScheduler(**{**config, **overrides})


def save_pipeline(models, folder):
    """models as a StableDiffusionPipeline folder (StableDiffusionPipeline.save_pretrained), written to folder.tmp
    and renamed into place whole."""
    from diffusers import StableDiffusionPipeline

    with files.atomic_folder(folder) as tmp:
        StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                unet=models.denoiser, scheduler=models.scheduler, safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp)
    return Path(folder)


def flow_scheduler(shift=1.0):
    """Stable Diffusion 3's FlowMatchEulerDiscreteScheduler, with a fixed shift (SD3's: 3.0; the tiny flow model's
    1.0, its 8x8 latents being far fewer than SD3's 128x128, and SD3 shifts less the smaller the image)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def build_flow_models(tokenizer, vae, width=64, layers=4, heads=4, patch_size=2, shift=1.0):
    """A random-init StableDiffusion3Pipeline on the VAE's latents, as ddpo.Models: an SD3Transformer2DModel (joint
    attention over image and text tokens, `heads` heads of width/heads), two CLIPTextModelWithProjection of hidden
    size `width` (encode_prompt puts their states side by side: joint_attention_dim 2·width) and no T5."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    latent = vae.config.sample_size // model_checks.downsampling(vae.config)
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=patch_size, in_channels=vae.config.latent_channels, num_layers=layers,
        attention_head_dim=width // heads, num_attention_heads=heads, joint_attention_dim=2 * width,
        caption_projection_dim=width, pooled_projection_dim=2 * width, out_channels=vae.config.latent_channels,
        pos_embed_max_size=latent // patch_size)
    clips = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, projection_dim=width, max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
        for _ in range(2)]
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=flow_scheduler(shift), vae=vae,
                                    text_encoder=clips[0], tokenizer=tokenizer, text_encoder_2=clips[1],
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    return ddpo.Models(transformer, clips[0], tokenizer, pipe.scheduler, vae, device="cpu", pipeline=pipe)


def save_flow_pipeline(models, folder):
    """A flow model's StableDiffusion3Pipeline folder (save_pretrained), written to folder.tmp and renamed whole."""
    with files.atomic_folder(folder) as tmp:
        models.pipeline.save_pretrained(tmp)
    return Path(folder)


def save_sd3_style_pipeline(path, sd35m_shapes=False):
    """A StableDiffusion3Pipeline folder with random weights, for the tests and bench.py (no hub download): 16x16
    images with 4x8x8 latents and shift 3 (SD3's), or with sd35m_shapes Stable Diffusion 3.5 Medium's transformer,
    VAE and CLIP text encoders (T5 left out: 4.7B parameters, and it only adds text tokens)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if not sd35m_shapes:
        vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                            norm_num_groups=8, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609)  # SD3's
        return save_flow_pipeline(build_flow_models(build_tokenizer(all_prompts()), vae, width=16, layers=2,
                                                    heads=2, shift=3.0), path)
    from diffusers import StableDiffusion3Pipeline

    tokenizer = build_tokenizer(all_prompts(), max_length=77)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=2,
                        sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False)
    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    clips = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, projection_dim=hidden, max_position_embeddings=77, hidden_act="gelu",
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)) for hidden, layers in ((768, 12), (1280, 32))]
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=flow_scheduler(3.0), vae=vae, text_encoder=clips[0],
                                    tokenizer=tokenizer, text_encoder_2=clips[1], tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    with files.atomic_folder(path) as tmp:
        pipe.save_pretrained(tmp)
    return Path(path)


def save_sd_style_pipeline(path, sd14_shapes=False):
    """A StableDiffusionPipeline folder with random weights, for the tests and bench.py (no hub download):
    16x16 images with 4x8x8 latents and an ε-predicting UNet, or with sd14_shapes Stable Diffusion v1.4's exact
    UNet / VAE / text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    big = sd14_shapes
    tokenizer = build_tokenizer(all_prompts(), max_length=77 if big else 16)
    blocks = (128, 256, 512, 512) if big else (16, 32)
    vae = AutoencoderKL(block_out_channels=blocks, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                        up_block_types=("UpDecoderBlock2D",) * len(blocks), latent_channels=4, layers_per_block=2 if big else 1,
                        norm_num_groups=32 if big else 8, sample_size=512 if big else 16)
    text = CLIPTextConfig(vocab_size=49408 if big else len(tokenizer), hidden_size=768 if big else 32,
                          intermediate_size=3072 if big else 37, num_hidden_layers=12 if big else 2,
                          num_attention_heads=12 if big else 4, max_position_embeddings=tokenizer.model_max_length,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8) if big else UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=16)
    models = ddpo.Models(unet, CLIPTextModel(text), tokenizer, sd_v1_scheduler(), vae, device="cpu")  # ε-prediction
    return save_pipeline(models, path)


# --------------------------------------------------------------------------------------------------------
# The two stages of pretraining
# --------------------------------------------------------------------------------------------------------

def optimizer_step(loss, params, optimizer, schedule):
    """One step of a pretraining loop (the VAE's, the denoiser's, the judges' CLIP): the gradients clipped to norm 1."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()


def batch_of(picture, prompts, rng):
    """The prompts' pictures, drawn by `picture` (a WORLDS entry) from one stream: (B, 3, 32, 32) in [-1, 1]."""
    return torch.from_numpy(np.stack([picture(p, rng) for p in prompts]))


def pretrain_vae(vae, steps, rng, generator, batch_size=64, lr=1e-3, kl_weight=1e-4, picture=draw):
    """Stage 1: the VAE as an image codec of the world, at every tile strength (s uniform in [0, 1]): L1 + L2
    reconstruction of a sample of the posterior, plus a small KL to N(0, I) (per pixel value) that keeps the
    latent space smooth for the diffusion model. Then the scaling factor, 1 / std of the world's latents, as
    Stable Diffusion's VAE has (0.18215 there), so the UNet sees latents of unit variance."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    prompts = all_prompts()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=min(100, steps // 10), num_training_steps=steps)
    vae.train()
    bar = tqdm(range(steps), desc="stage 1: VAE")
    for _ in bar:
        x = torch.from_numpy(np.stack([picture(prompts[rng.integers(len(prompts))], rng, strength=rng.uniform(0, 1))
                                       for _ in range(batch_size)]))
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = (reconstruction - x).abs().mean() + (reconstruction - x).pow(2).mean() + kl_weight * kl
        optimizer_step(loss, vae.parameters(), optimizer, schedule)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # the world as it is drawn (the UNet's data), 512 pictures
        x = batch_of(picture, [prompts[i] for i in rng.integers(len(prompts), size=512)], rng)
        std = vae.encode(x).latent_dist.sample(generator).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


def pretrain_denoiser(models, steps, rng, generator, batch_size=64, lr=1e-3, p_uncond=0.1, picture=draw, world="plain"):
    """Stage 2: the denoiser and the text encoder(s) on the world's latents (the frozen VAE's posterior samples,
    scaled) and their captions (one_caption), with the DDPM loss (the UNet) or the flow-matching loss (the flow
    transformer); an EMA of the weights is what is saved."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    caption = one_caption(world)
    encoders = [models.text_encoder] + ([models.pipeline.text_encoder_2] if models.flow else [])
    params = list(models.denoiser.parameters()) + [p for e in encoders for p in e.parameters()]
    loss_fn = ddpo.flow_matching_loss if models.flow else ddpo.ddpm_loss
    for encoder in encoders:
        encoder.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=min(100, steps // 10), num_training_steps=steps)
    ema = EMAModel(params, decay=0.999)  # averaged weights sample much cleaner after a short training
    bar = tqdm(range(steps), desc=f"stage 2: {type(models.denoiser).__name__}")
    for _ in bar:
        batch = [("" if rng.random() < p_uncond else caption(rng)) for _ in range(batch_size)]
        with torch.no_grad():
            x0 = models.vae.encode(batch_of(picture, batch, rng)).latent_dist.sample(generator) * models.vae.config.scaling_factor
        loss = loss_fn(models, x0, ddpo.encode_prompts(models, batch),
                       *ddpo.ddpm_noise(models.scheduler, x0.shape, generator)).mean()
        optimizer_step(loss, params, optimizer, schedule)
        ema.step(params)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(params)
    for encoder in encoders:
        encoder.eval()
    return models


def build(seed, out, vae_steps=1500, unet_steps=4000, world="plain"):
    """Both stages from one seed, then tiny_model/ as a StableDiffusionPipeline folder. world: WORLDS' name of
    the pictures it learns."""
    model_checks.quiet_libraries()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = pretrain_vae(build_vae(), vae_steps, rng, generator, picture=WORLDS[world])
    models = build_models(build_tokenizer(all_prompts()), vae)
    print(f"VAE scaling factor {vae.config.scaling_factor:.4f}; UNet "
          f"{sum(p.numel() for p in models.denoiser.parameters()):,} parameters, vocabulary {len(models.tokenizer)}")
    pretrain_denoiser(models, unet_steps, rng, generator, picture=WORLDS[world], world=world)
    save_pipeline(models, out)
    print(f"saved {out}")


def build_flow(seed, out, steps=5000, vae=ddpo.TINY_MODELS["tiny"]):
    """The tiny flow model: the tiny model's VAE (frozen, stage 1 is not repeated), then stage 2 with the flow-matching
    loss on a fresh transformer and text encoders, saved as a StableDiffusion3Pipeline folder."""
    from diffusers import AutoencoderKL

    model_checks.quiet_libraries()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    models = build_flow_models(build_tokenizer(all_prompts()), AutoencoderKL.from_pretrained(vae, subfolder="vae"))
    models.vae.requires_grad_(False).eval()
    print(f"transformer {sum(p.numel() for p in models.denoiser.parameters()):,} parameters, VAE of {vae}")
    pretrain_denoiser(models, steps, rng, generator)
    save_flow_pipeline(models, out)
    print(f"saved {out}")


# --------------------------------------------------------------------------------------------------------
# How far each JPEG reward can go in this world
# --------------------------------------------------------------------------------------------------------

def jpeg_sizes(models, x, sigma, generator):
    """Mean JPEG kB of images x (in [-1, 1]) as the reward sees them: encoded by the VAE (the posterior's mean,
    scaled), given the last DDIM step's noise N(0, sigma²) in that latent space (the sampler's last action adds
    it), and decoded by ddpo.decode to [0, 1]. Returns (the images as drawn, the VAE's reconstruction without the
    noise, with it)."""
    with torch.no_grad():
        z = models.vae.encode(x).latent_dist.mode() * models.vae.config.scaling_factor
    noisy = z + sigma * torch.randn(z.shape, generator=generator)
    drawn = rewards.jpeg_kilobytes((x / 2 + 0.5).clamp(0, 1))
    return tuple(k.mean().item() for k in (drawn, *(rewards.jpeg_kilobytes(ddpo.decode(models, y)) for y in (z, noisy))))


def training_prompts(n, seed):
    """n prompts drawn from the JPEG rewards' training set: what --reward-range and --ddpm-loss measure on."""
    training = rewards.load_prompts(rewards.DEFAULT_PROMPTS["jpeg"])
    return [training[i] for i in np.random.default_rng(seed).integers(len(training), size=n)]


def pictures(prompts, seed, strength=None):
    """The world's pictures of the prompts, (n, 3, 32, 32) in [-1, 1]: picture i from its own random numbers (seed,
    i), so the same shapes and places at every tile strength (None: each picture's own, as the world draws it)."""
    return torch.from_numpy(np.stack([draw(p, np.random.default_rng([seed, i]), strength) for i, p in enumerate(prompts)]))


def reward_range(n=64, seed=0, model="tiny"):
    """The two JPEG rewards' reference points, with the training prompts (the jpeg rewards' default set): the world
    as drawn, the same pictures with flat backgrounds (the flattest end: shapes kept) and with the busiest tiles
    (s = 1, the busiest end), each through the VAE and the last step's noise (the default T; DDIM's at η = 1, or
    the flow SDE's at a = 0.7). A flow model's VAE (tiny-flow's is tiny_model's) gives the same pictures."""
    model_checks.quiet_libraries()
    models = ddpo.load_models(model, "cpu")
    args = ddpo.parse_args(["--reward", "jpeg"])
    models.scheduler.set_timesteps(args.num_steps)
    shape = (1, models.denoiser.config.in_channels, models.denoiser.config.sample_size, models.denoiser.config.sample_size)
    t = models.scheduler.timesteps[-1:]
    step = ddpo.flow_sde_step if models.flow else ddpo.ddim_step
    sigma = step(models.scheduler, torch.zeros(shape), torch.zeros(shape), t, ddpo.noise_scale(models, args))[1].item()
    prompts = training_prompts(n, seed)
    generator = torch.Generator().manual_seed(seed)
    noise = f"a = {args.noise_level:g}" if models.flow else f"η = {args.eta:g}"
    print(f"{n} pictures of prompts from {rewards.DEFAULT_PROMPTS[args.reward]}; the last step's σ at T = "
          f"{args.num_steps}, {noise}: {sigma:.4f} (in the scaled latent space)")
    print("JPEG kB (quality 95): as drawn | VAE reconstruction | VAE + the last step's noise (as the reward sees them)")
    rows = {"the world as drawn": None, "flattest end: flat backgrounds, shapes kept": 0.0,
            "busiest end: the busiest tiles (s = 1)": 1.0}
    for name, strength in rows.items():
        drawn, decoded, noisy = jpeg_sizes(models, pictures(prompts, seed, strength), sigma, generator)
        print(f"  {name:46s} {drawn:.3f} | {decoded:.3f} | {noisy:.3f}")


def ddpm_loss_gap(n=64, seed=0, model="tiny", draws=8):
    """What RWR trains on, against what the model was pretrained on: the DDPM loss (ddpo.ddpm_loss) of `model` on its
    own samples (ddpo.py's default sampler: T, η, w) and on the world's pictures (the VAE's posterior mean, scaled),
    with the same prompts, timesteps and noise, averaged over `draws` draws of (t, ε); both sets' JPEG sizes and
    the standard deviation of their (scaled) latents.
    RWR at a small β is nearly the plain DDPM loss on the model's own samples, so it pulls the model towards what
    its sampler draws, whichever way the reward points."""
    model_checks.quiet_libraries()
    models = ddpo.load_models(model, "cpu")
    args = ddpo.parse_args(["--reward", "jpeg"])
    prompts = training_prompts(n, seed)
    traj, images = ddpo.sample(models, prompts, args, ddpo.noise_generators(seed, range(n), stream=3), args.sample_batch_size)
    world = pictures(prompts, seed)
    with torch.no_grad():
        latents = {"its own samples": traj.states[:, -1],
                   "the world's pictures": models.vae.encode(world).latent_dist.mode() * models.vae.config.scaling_factor}
        cond, generator = ddpo.encode_prompts(models, prompts), torch.Generator().manual_seed(seed)
        noise = [ddpo.ddpm_noise(models.scheduler, latents["its own samples"].shape, generator) for _ in range(draws)]
        kb = {"its own samples": rewards.jpeg_kilobytes(images).mean().item(),
              "the world's pictures": rewards.jpeg_kilobytes(ddpo.decode(models, latents["the world's pictures"])).mean().item()}
        print(f"model {model}: DDPM loss (mean of {n} prompts x {draws} draws of t, ε; the same draws for both) and JPEG kB")
        for name, x0 in latents.items():
            loss = torch.stack([ddpo.ddpm_loss(models, x0, cond, t, e) for t, e in noise]).mean().item()
            print(f"  on {name:20s} loss {loss:.4f} | {kb[name]:.3f} kB | latent std {x0.std().item():.3f}")


def count_alignment(model, judges, n=128, guidance_scale=5.0):
    """What a model (or a run) draws for the alignment prompts, counted by the independent judge (judges/attributes,
    world/alignment_judges.py): of n samples of the training prompts, then n of the unseen activities, then n of the
    unseen animals (paper §6.3; prompts drawn by random.Random(1), noise seed 7, so the first two sets share their
    animals and all three their noises), the share that shows the prompt's activity, the share whose subject has its
    palette and shape, and the share that shows any prop."""
    import random

    from world import alignment_judges as aj

    models = ddpo.load_models(model, "cpu")
    args = ddpo.parse_args(["--guidance-scale", str(guidance_scale)])
    classifier = str(Path(judges) / "attributes")
    for name in ("alignment", "alignment_unseen_activities", "alignment_unseen_animals"):
        prompts = random.Random(1).choices(rewards.load_prompts(name), k=n)
        _, images = ddpo.sample(models, prompts, args, ddpo.noise_generators(7, range(n)), 64)
        shown, subject = aj.shows_activity(images, prompts, classifier), aj.shows_subject(images, prompts, classifier)
        any_prop = (aj.read(aj.classifier_at(classifier), images)[:, 2] > 0).float()
        print(f"{model}, {name}, w = {guidance_scale:g}: the activity shown {shown.mean():.1%}, the subject right "
              f"{subject.mean():.1%}, some prop {any_prop.mean():.1%} (of {n})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Pretrain the tiny built-in model on the toy world (VAE, then UNet).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (StableDiffusionPipeline.save_pretrained); default: world/tiny_model, "
                   "with --flow world/tiny_flow_model, with --world activities world/tiny_activities_model; with the "
                   "judges' commands, the judges' folder, world/judges")
    p.add_argument("--vae-steps", type=int, default=1500, help="stage 1: VAE optimizer steps of batch 64")
    p.add_argument("--unet-steps", type=int, default=4000, help="stage 2: UNet optimizer steps of batch 64")
    p.add_argument("--flow", action="store_true", help="build the tiny flow model instead (stage 2 only, on "
                   "tiny_model's VAE, with the flow-matching loss); --flow-steps optimizer steps of batch 64")
    p.add_argument("--flow-steps", type=int, default=5000, help="with --flow: the transformer's optimizer steps")
    p.add_argument("--reward-range", action="store_true", help="print the JPEG sizes of the world's pictures, with "
                   "flat and with the busiest backgrounds, as the reward sees them (VAE + last-step noise), and exit")
    p.add_argument("--ddpm-loss", action="store_true", help="print the DDPM loss of --model on its own samples and on "
                   "the world's pictures (what RWR trains on, against what it was pretrained on), and exit")
    p.add_argument("--judges", action="store_true", help="build the tiny judges instead (world/judges.py): a CLIP "
                   "and LAION's aesthetic head, trained on the world's pictures, written to world/judges/ (with "
                   "--world activities: world/judges/activities/, the judges of tiny-activities)")
    p.add_argument("--judges-check", action="store_true", help="print how right the tiny judges of --world are on "
                   "freshly drawn pictures (the CLIP's caption matching, the aesthetic head's rank correlation with the "
                   "rater), and exit")
    p.add_argument("--alignment-judges", action="store_true", help="build the alignment experiments' judges instead "
                   "(world/alignment_judges.py: a VLM, BERTScore's encoder, the attribute classifier) on the world with "
                   "activities, half of their pictures through --model's VAE, into --out (default world/judges)")
    p.add_argument("--alignment-judges-check", action="store_true", help="print how right the alignment judges in --out "
                   "are on freshly drawn pictures, and exit")
    p.add_argument("--alignment-count", action="store_true", help="print what --model (a model or a run) draws for "
                   "the alignment prompts, counted by the attribute classifier in --out: the share of --samples that "
                   "show the prompt's activity, their subject, some prop; for the training prompts, the unseen "
                   "activities and the unseen animals, at --guidance-scale; and exit")
    p.add_argument("--samples", type=int, default=128, help="with --alignment-count: samples of each prompt set")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="with --alignment-count: w")
    p.add_argument("--world", choices=sorted(WORLDS), default="plain", help="the world the model (or with --judges, "
                   "the judges) learns: 'plain' (tiny's and tiny-flow's, drawing.draw) or 'activities' (drawing.scene: "
                   "an animal and its activity; tiny-activities')")
    p.add_argument("--model", help="with --reward-range or --ddpm-loss: the model (or a run folder; default tiny); with "
                   "--alignment-judges(-check): the model whose VAE draws half their pictures; with --alignment-count: "
                   "the model or run counted (both default tiny-activities)")
    a = p.parse_args()
    aligning = a.alignment_judges or a.alignment_judges_check or a.alignment_count
    a.model = a.model or ("tiny-activities" if aligning else "tiny")
    if a.reward_range:
        reward_range(seed=a.seed, model=a.model)
    elif a.judges or a.judges_check:
        from world import TINY_JUDGES, WORLD_MODELS, judges

        out = a.out or TINY_JUDGES[WORLD_MODELS[a.world]]["clip_model"].parent
        judges.check(world=a.world) if a.judges_check else judges.build(a.seed, out, world=a.world)
    elif a.alignment_judges or a.alignment_judges_check:
        from world import JUDGES, alignment_judges

        out = Path(a.out or JUDGES)
        model = ddpo.TINY_MODELS.get(a.model, a.model)
        alignment_judges.check(out, model) if a.alignment_judges_check else alignment_judges.build(a.seed, out, model)
    elif a.alignment_count:
        from world import JUDGES

        count_alignment(ddpo.TINY_MODELS.get(a.model, a.model), a.out or JUDGES, a.samples, a.guidance_scale)
    elif a.ddpm_loss:
        ddpm_loss_gap(seed=a.seed, model=a.model)
    elif a.flow:
        build_flow(a.seed, a.out or ddpo.TINY_MODELS["tiny-flow"], a.flow_steps)
    else:
        from world import WORLD_MODELS

        build(a.seed, a.out or ddpo.TINY_MODELS[WORLD_MODELS[a.world]], a.vae_steps, a.unet_steps, a.world)
