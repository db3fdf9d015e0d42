"""The tiny built-in model: a toy image world and the pretraining that produced tiny_model/.

DDPO fine-tunes a *pretrained* model: RL only reweights what the model can already draw. A randomly
initialised model's images hardly differ in JPEG size, so the RL has no signal to work with. So the built-in
model is first pretrained, with the ordinary DDPM loss (ddpo.ddpm_loss, the same loss RWR uses), on
procedurally drawn 32x32 images:
  - the prompt's words pick a palette and a shape (the subject word the palette, the last word the shape),
    so guidance and per-prompt advantages mean something;
  - each sample draws a background texture at random, from flat to fine stripes. That gives the JPEG size the
    spread that compressibility / incompressibility fine-tuning then pushes one way or the other.

Normal use never runs this file: tiny_model/ ships with the repository. To rebuild it exactly (about 30
minutes on 2 CPU cores):

    python tiny_world.py --steps 2000 --seed 0 --out tiny_model
    python tiny_world.py --jpeg-floor    # how far compressibility can go in this world (a few seconds)
"""
import argparse
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import ddpo
import runfiles

SIZE = 32
PALETTES = [  # (background, shape) colours in [0, 1]
    ((0.95, 0.90, 0.75), (0.80, 0.15, 0.10)), ((0.15, 0.25, 0.55), (0.95, 0.80, 0.20)),
    ((0.20, 0.50, 0.25), (0.95, 0.95, 0.95)), ((0.85, 0.85, 0.90), (0.10, 0.10, 0.15)),
    ((0.60, 0.20, 0.50), (0.40, 0.90, 0.80)), ((0.95, 0.60, 0.20), (0.15, 0.35, 0.80)),
    ((0.10, 0.10, 0.10), (0.90, 0.40, 0.60)), ((0.55, 0.75, 0.95), (0.35, 0.20, 0.10)),
]
SHAPES = ("circle", "square", "triangle")


def word_hash(word):
    return zlib.crc32(word.lower().encode())


def prompt_attributes(prompt, rng):
    """What the prompt fixes: (palette, shape). Words pick them, so the text encoder can learn the mapping:
    the subject (the first word but a/an) picks the palette, the last word the shape ("a cat riding a bike":
    cat's palette, bike's shape). The empty prompt (unconditional) draws both at random."""
    words = [w for w in prompt.split() if w.lower() not in ("a", "an")]
    if not words:
        return int(rng.integers(len(PALETTES))), int(rng.integers(len(SHAPES)))
    return word_hash(words[0]) % len(PALETTES), word_hash(words[-1]) % len(SHAPES)


def draw(prompt, rng, flat=False):
    """One toy image for a prompt, (3, 32, 32) in [-1, 1] like the model's pixel space. flat: a flat background
    whatever the draw (for --jpeg-floor; the same random numbers are drawn, so pretraining is unchanged)."""
    palette, shape = prompt_attributes(prompt, rng)
    bg, fg = (np.array(c, dtype=np.float32)[:, None, None] for c in PALETTES[palette])
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    # the background texture varies per sample: flat (a third of the time) or stripes of random period/angle
    amplitude = 0.0 if rng.random() < 1 / 3 else rng.uniform(0.1, 0.45)
    amplitude = 0.0 if flat else amplitude
    period, angle = rng.uniform(2.0, 12.0), rng.uniform(0, np.pi)
    stripes = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    image = np.clip(bg * (1 + amplitude * stripes), 0, 1)
    cy, cx, r = rng.uniform(11, 21), rng.uniform(11, 21), rng.uniform(6, 10)
    if SHAPES[shape] == "circle":
        mask = (y - cy) ** 2 + (x - cx) ** 2 <= r**2
    elif SHAPES[shape] == "square":
        mask = (np.abs(y - cy) <= r * 0.85) & (np.abs(x - cx) <= r * 0.85)
    else:  # triangle pointing up
        mask = (y <= cy + r * 0.8) & (np.abs(x - cx) <= (y - (cy - r)) * 0.6)
    image = np.where(mask[None], fg, image)
    return (image * 2 - 1).astype(np.float32)


def all_prompts():
    """Every prompt the project ships (the held-out sets too: pretraining is the 'internet-scale' stage;
    generalisation is about the RL fine-tuning, which never sees them)."""
    names = [p.stem for p in sorted(runfiles.PROMPTS.glob("*.txt"))] + sorted(runfiles.PROMPT_SETS)
    return sorted({p for name in names for p in ddpo.load_prompts(name)})


def build_tokenizer(prompts, max_length=16):
    """A word-level tokenizer over the prompts' words, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(prompts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", tok.token_to_id("[BOS]")), ("[EOS]", tok.token_to_id("[EOS]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   unk_token="[UNK]", model_max_length=max_length)


def build_models(tokenizer):
    """Random-init tiny UNet (≈1.4M parameters, cross-attention at 8x8), CLIP text encoder, SD-v1 DDIM scheduler."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    return ddpo.Models(unet, text_encoder, tokenizer, sd_v1_scheduler(prediction_type="v_prediction"), vae=None, device="cpu")


def sd_v1_scheduler(**overrides):
    """Stable Diffusion v1's DDIM configuration.

    The tiny model predicts v (as SD 2.x does) rather than ε. With ε-prediction a 32x32 model learns the
    palette from the noisy image itself: an error in x_0 costs SNR(t) times less in the ε-loss, vanishingly
    little at high noise. So it ignored the prompt (measured: samples matched the prompt's palette at chance
    level). With v-prediction it must predict x_0 at high noise, where only the prompt tells it the palette.
    """
    from diffusers import DDIMScheduler

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return DDIMScheduler(**{**config, **overrides})


MODEL_INDEX = {"_class_name": "DDPOTinyPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
               "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
               "scheduler": ["diffusers", "DDIMScheduler"]}


def save_sd_style_pipeline(path, sd14_shapes=False):
    """A StableDiffusionPipeline folder with random weights, for the tests and bench.py (no hub download):
    16x16 images with 4x8x8 latents, or with sd14_shapes Stable Diffusion v1.4's exact UNet / VAE / text encoder."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
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
    StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tokenizer, unet=unet,
                            scheduler=sd_v1_scheduler(), safety_checker=None, feature_extractor=None,  # ε-prediction
                            requires_safety_checker=False).save_pretrained(path)
    return Path(path)


def save_models(models, folder, index=MODEL_INDEX):
    """Every component in diffusers' save_pretrained layout, written to a temp folder and renamed into place."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in ("unet", "text_encoder", "tokenizer", "scheduler", "vae"):
        if getattr(models, name) is not None:
            getattr(models, name).save_pretrained(tmp / name)
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def pretrain(steps, seed, out, batch_size=64, lr=1e-3, p_uncond=0.1):
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    prompts = all_prompts()
    models = build_models(build_tokenizer(prompts))
    params = list(models.unet.parameters()) + list(models.text_encoder.parameters())
    models.text_encoder.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=min(100, steps // 10), num_training_steps=steps)
    ema = EMAModel(params, decay=0.999)  # averaged weights sample much cleaner after a short training
    print(f"{len(prompts)} prompts, vocabulary {len(models.tokenizer)}, "
          f"UNet {sum(p.numel() for p in models.unet.parameters()):,} parameters")
    bar = tqdm(range(steps), desc="pretraining")
    for step in bar:
        batch = [("" if rng.random() < p_uncond else prompts[rng.integers(len(prompts))]) for _ in range(batch_size)]
        x0 = torch.from_numpy(np.stack([draw(p, rng) for p in batch]))
        loss = ddpo.ddpm_loss(models, x0, ddpo.encode_prompts(models, batch), *ddpo.ddpm_noise(models.scheduler, x0.shape, generator)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(params)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(params)
    save_models(models, out)
    print(f"saved {out}")


def jpeg_sizes(models, x, sigma, generator):
    """Mean JPEG kB of pixel-space images x (in [-1, 1], the model's space) as the reward sees them, through
    ddpo.decode to [0, 1]: as they are, and with N(0, sigma^2) noise added in the model's space (the last DDIM
    step's, which the sampler adds before decoding)."""
    import rewards

    noisy = x + sigma * torch.randn(x.shape, generator=generator)
    return tuple(rewards.jpeg_kilobytes(ddpo.decode(models, y)).mean().item() for y in (x, noisy))


def jpeg_floor(n=64, seed=0):
    """How small compressibility can make an image in this world: JPEG sizes (kB) of drawn images as drawn, and with
    the policy's own noise at its last DDIM step (η = 1, the default T), which survives unless the picture is pushed
    past the pixel range (decode clamps it to [0, 1], so noise around a mean beyond white or black vanishes)."""
    runfiles.quiet_libraries()
    models = ddpo.load_models("tiny", "cpu")
    args = ddpo.parse_args([])
    models.scheduler.set_timesteps(args.num_steps)
    t = models.scheduler.timesteps[-1:]
    sigma = ddpo.ddim_step(models.scheduler, torch.zeros(1, 3, SIZE, SIZE), torch.zeros(1, 3, SIZE, SIZE), t, args.eta)[1].item()
    every = all_prompts()
    prompts = [every[i] for i in np.random.default_rng(seed).integers(len(every), size=n)]
    sets = {"drawn images": [draw(p, np.random.default_rng([seed, i])) for i, p in enumerate(prompts)],
            "the same, with flat backgrounds": [draw(p, np.random.default_rng([seed, i]), flat=True)
                                                for i, p in enumerate(prompts)],  # same palettes, shapes, places
            "a flat grey image (no shape)": [np.zeros((3, SIZE, SIZE), np.float32)] * n,
            "a flat image past white (x = 1.1, no shape)": [np.full((3, SIZE, SIZE), 1.1, np.float32)] * n}
    generator = torch.Generator().manual_seed(seed)
    print(f"the last DDIM step's sigma at T = {args.num_steps}, eta = {args.eta:g}: {sigma:.4f}")
    for name, images in sets.items():
        drawn, noisy = jpeg_sizes(models, torch.from_numpy(np.stack(images)), sigma, generator)
        print(f"{name} ({n}): {drawn:.3f} kB as drawn, {noisy:.3f} kB with that noise")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Pretrain the tiny built-in model on the toy world.")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps of batch 64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="tiny_model", help="output folder (diffusers save_pretrained layout)")
    p.add_argument("--jpeg-floor", action="store_true", help="print JPEG sizes of the world's images, as drawn and "
                   "with the last DDIM step's noise (how far compressibility can go), and exit")
    a = p.parse_args()
    if a.jpeg_floor:
        jpeg_floor(seed=a.seed)
    else:
        pretrain(a.steps, a.seed, a.out)
