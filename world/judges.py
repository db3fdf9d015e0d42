"""The tiny judges: the learned rewards' models, small and trained on the toy world, and the world's own rater.

The paper scores aesthetic quality with hub models (§5.2: LAION's MLP on CLIP ViT-L/14 image embeddings). Here the
same classes are small and trained on the toy world's pictures, whose generator knows exactly what it drew:
  - a CLIP (CLIPModel and its CLIPProcessor, world/judges/clip/), trained contrastively on pictures and captions.
    Half the captions are the prompt alone; the rest add, as alt-text does, some of what the picture shows: the
    shape's size and the background ("a cat, large, lively background"). It serves --reward clipscore, pickscore
    (PickScore is a CLIP) and the aesthetic reward's embedding;
  - an aesthetic head in LAION's format (rewards.aesthetic_mlp, world/judges/aesthetic-model.pth), fitted by
    regression to the world's rater's scores, with noise, of pictures embedded by that CLIP, as LAION's head was
    fitted to people's ratings. Half of the pictures they learn from are drawn as the tiny model draws them (through
    its VAE and back), so build world/tiny_model/ first;
  - the rater: `taste`, a stated toy taste measured on the pixels (below). Its noiseless score is the judge that is
    not the reward: `python evaluate.py RUN --judge world.judges:taste` reports it beside the learned reward.

Each world has its own CLIP and head: the plain world's in world/judges/ ('tiny', the judges of tiny and tiny-flow),
the world with activities' in world/judges/activities/ ('tiny-activities'), where a caption says what the picture
shows: its animal, and the activity only where its prop is drawn. With a tiny model, --clip-model, --aesthetic-head,
--pickscore-model and --pickscore-processor default to its world's (and --vlm and --bertscore-model to
world/alignment_judges.py's, which learned the world with activities); a flag naming another model wins. Rebuild
(the same seed on one machine gives the same files):

    python -m world.tiny_world --judges --seed 0                      # CLIP, then the ratings and the head
    python -m world.tiny_world --judges --world activities --seed 0   # the same on the world with activities
    python -m world.tiny_world --judges-check [--world activities]    # how right they are, on fresh pictures
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from world import JUDGES, TINY_MODELS, WORLD_MODELS
from world.drawing import BAND, PALETTES, SCENE_PALETTES, draw, prompt_attributes, split_prompt, subject_look

# The rater's taste: a large subject on a lively (textured, not busy) background. Both vary in the base model's
# pictures: the shape's size r in RADIUS, the tiles' strength s around 0.2 (world.drawing).
BEST_AREA = 0.15  # the subject's share of the picture, beyond which bigger is no better (a circle of r = 7: 0.150)
BEST_TEXTURE = 0.13  # the background's mean distance from its flat colour that the rater likes best (s ≈ 0.3)
TEXTURE_WEIGHT = 20  # points lost per unit of texture away from the best: a busy (s = 1) background loses 2.8
RATING_NOISE = 0.5  # the std of a rating around the taste, as people's ratings scatter
NEAR = 0.25  # RGB distance within which a pixel has the subject's colour (busy tiles rarely come this close)


def palettes(prompts, world="plain"):
    """(B, 2, 3) background and subject colours that each prompt fixes in the world: the plain world's palette of
    the prompt (drawing.draw), or the subject's in the world with activities (drawing.scene)."""
    rng = np.random.default_rng  # (the empty prompt's random palette: the same for each)
    if world == "activities":
        return torch.tensor([SCENE_PALETTES[subject_look(split_prompt(p)[0], rng(0))[0]] for p in prompts])
    return torch.tensor([PALETTES[prompt_attributes(p, rng(0))[0]] for p in prompts])


def measure(images, prompts, world="plain"):
    """What the rater looks at, measured on the pixels of images (B, 3, H, W) in [0, 1], with each prompt's
    palette: the subject's area (the share of pixels within NEAR of the shape's colour and nearer it than the
    background's) and the background's texture (the mean absolute difference from the flat background colour, over
    the pixels nearer the background's colour; in the world with activities, above the props' band, which a prop may
    fill). Returns (area, texture), each (B,)."""
    colours = palettes(prompts, world)
    bg, fg = colours[:, 0, :, None, None], colours[:, 1, :, None, None]  # (B, 3, 1, 1)
    x = images.detach().float().cpu()
    to_fg, to_bg = (x - fg).norm(dim=1), (x - bg).norm(dim=1)  # (B, H, W)
    subject = (to_fg < NEAR) & (to_fg < to_bg)  # a prop never counts: its colour is >= 0.25 from every palette's
    background = (to_bg <= to_fg).float()
    if world == "activities":
        background[:, BAND:] = 0
    texture = ((x - bg).abs().mean(1) * background).sum((1, 2)) / background.sum((1, 2)).clamp(min=1)
    return subject.float().mean((1, 2)), texture


def taste(images, prompts, world="plain"):
    """The world's rater, without noise, on a 1–10-like scale like LAION's: 5 + 40·(min(area, 0.15) − 0.1)
    − 20·|texture − 0.13|. A reward function like any other: --reward world.judges:taste, or
    evaluate.py --judge world.judges:taste (scene_taste in the world with activities)."""
    area, texture = measure(images, prompts, world)
    return 5 + 40 * (area.clamp(max=BEST_AREA) - 0.1) - TEXTURE_WEIGHT * (texture - BEST_TEXTURE).abs()


def scene_taste(images, prompts):
    """The same rater in the world with activities (--model tiny-activities): evaluate.py --judge
    world.judges:scene_taste."""
    return taste(images, prompts, "activities")


# --------------------------------------------------------------------------------------------------------
# The pictures the judges learn from
# --------------------------------------------------------------------------------------------------------

def size_word(radius):
    return "small" if radius < 5.67 else "medium" if radius < 6.33 else "large"


def background_word(strength):
    return "plain" if strength < 0.1 else "calm" if strength < 0.25 else "lively" if strength < 0.5 else "busy"


def caption(prompt, attributes):
    """Alt-text of a picture: its prompt, then what the picture shows of its size and background."""
    return f"{prompt}, {size_word(attributes['radius'])}, {background_word(attributes['strength'])} background"


def shows(prompt, attributes, world="plain"):
    """What a picture shows, in a prompt's words: the prompt in the plain world; in the world with activities its
    subject and the activity shown, if any ("a cat riding a bike", or "a cat" where the bike is not drawn), so that
    the CLIP learns the activity from captions that are true of the picture."""
    if world == "activities":
        from world.alignment_judges import answer

        return answer(attributes["subject"], attributes["activity"])
    return prompt


def judged_pictures(prompts, rng, n, vae=None, world="plain"):
    """n pictures for the judges, (n, 3, 32, 32) in [0, 1], with their prompts and what was drawn. Half at the
    world's tile strengths, half at s uniform in [0, 0.8], so the judges see the range a fine-tuned model reaches.
    With a vae, half of them as the tiny model draws pictures: through its VAE and back (their labels stay exact:
    the rater scores the picture it is shown). In the world with activities (world="activities"), the pictures of
    alignment_judges.scenes: the 45 animals, each activity or none, a named activity shown at even odds (prompts
    unused)."""
    if world == "activities":
        from world.alignment_judges import scenes

        return scenes(rng, n, vae=vae)
    chosen = [prompts[i] for i in rng.integers(len(prompts), size=n)]
    drawn = [draw(p, rng, strength=None if rng.random() < 0.5 else rng.uniform(0, 0.8), with_attributes=True)
             for p in chosen]
    images = half_through(torch.from_numpy(np.stack([image for image, _ in drawn])), rng, vae)
    return (images / 2 + 0.5).clamp(0, 1), chosen, [a for _, a in drawn]


def half_through(images, rng, vae):
    """images (B, 3, 32, 32) in [-1, 1], each with even odds through the vae and back (as the tiny model draws);
    with no vae, as they are."""
    if vae is not None:
        through = torch.from_numpy(rng.random(len(images)) < 0.5)
        with torch.no_grad():
            if through.any():  # (the VAE's attention cannot take an empty batch)
                images[through] = vae.decode(vae.encode(images[through]).latent_dist.mode()).sample
    return images


def pixel_values(processor, images):
    """The CLIP's input as the rewards make it: rewards.to_pil, then the processor."""
    import rewards

    return processor(images=rewards.to_pil(images), return_tensors="pt").pixel_values


def build_clip(tokenizer, projection_dim=768):
    """A random-init CLIP for 32x32 pictures: a ViT of 4x4 patches and a text transformer, each 3 layers of width 64,
    projected to 768 dimensions, the width LAION's aesthetic head reads."""
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(projection_dim=projection_dim, vision_config=dict(
        image_size=32, patch_size=4, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)))


def train_clip(clip, processor, prompts, steps, rng, vae, batch_size=128, lr=1e-3, world="plain"):
    """CLIP's contrastive loss (transformers' CLIPModel(return_loss=True)) on the world's pictures and captions:
    half what the picture shows in a prompt's words (`shows`), half that with its size and background (`caption`)."""
    def loss():
        images, chosen, drawn = judged_pictures(prompts, rng, batch_size, vae, world)
        said = [shows(p, a, world) for p, a in zip(chosen, drawn)]
        texts = [caption(p, a) if rng.random() < 0.5 else p for p, a in zip(said, drawn)]
        text = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return clip(input_ids=text.input_ids, attention_mask=text.attention_mask,
                    pixel_values=pixel_values(processor, images), return_loss=True).loss

    return train(clip, loss, steps, "CLIP", lr=lr, weight_decay=0.1)


def train(model, loss_fn, steps, desc, lr=1e-3, weight_decay=0.01):
    """A judge's training: AdamW on loss_fn() (which draws its own batch), a cosine schedule after 5% of warm-up,
    gradients clipped to norm 1; returns the model frozen, in eval mode."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from tqdm import tqdm

    from world import tiny_world

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=steps // 20, num_training_steps=steps)
    model.train()
    bar = tqdm(range(steps), desc=desc)
    for _ in bar:
        loss = loss_fn()
        tiny_world.optimizer_step(loss, model.parameters(), optimizer, schedule)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def embed(clip, processor, images):
    """The aesthetic reward's embedding: the L2-normalised image features (rewards.Aesthetic.embed)."""
    return torch.cat([F.normalize(clip.get_image_features(pixel_values=pixel_values(processor, images[i:i + 256]))
                                  .pooler_output, dim=-1) for i in range(0, len(images), 256)])


def train_head(embeddings, ratings, steps, batch_size=256, lr=1e-3):
    """LAION's head (rewards.aesthetic_mlp) fitted to the ratings by mean squared error, its dropout on."""
    import rewards

    head = rewards.aesthetic_mlp().train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(len(ratings), (batch_size,), generator=generator)
        loss = F.mse_loss(head(embeddings[i]).squeeze(-1), ratings[i])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return head.eval()


def build(seed, out=JUDGES, clip_steps=3000, ratings=8192, head_steps=4000, world="plain"):
    """The CLIP, then the ratings and the head: out/clip/ written whole (clip.tmp renamed into place), then
    out/aesthetic-model.pth. The alignment judges beside them in out/ (world/alignment_judges.py) stay. world:
    "plain" (the pictures of tiny and tiny-flow, through tiny's VAE) or "activities" (tiny-activities' world and
    VAE; its judges go to world/judges/activities)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPImageProcessor, CLIPProcessor

    from plumbing import files, model_checks
    from world import tiny_world

    model_checks.quiet_libraries()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    prompts = tiny_world.all_prompts()
    words = [caption("", dict(radius=r, strength=s)) for r in (5, 6, 7) for s in (0, 0.2, 0.3, 0.6)]
    if world == "activities":
        from world.alignment_judges import sentences

        words += sentences()  # what its pictures show: every animal with each activity or none
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tiny_world.build_tokenizer(prompts + words, max_length=24))
    vae = AutoencoderKL.from_pretrained(TINY_MODELS[WORLD_MODELS[world]], subfolder="vae").eval()  # built first
    clip = train_clip(build_clip(processor.tokenizer), processor, prompts, clip_steps, rng, vae, world=world)
    images, chosen, _ = judged_pictures(prompts, rng, ratings, vae, world)
    rated = taste(images, chosen, world) + RATING_NOISE * torch.from_numpy(rng.standard_normal(ratings)).float()
    head = train_head(embed(clip, processor, images), rated, head_steps)
    with files.atomic_folder(Path(out) / "clip") as tmp:
        clip.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    with files.atomic_file(Path(out) / "aesthetic-model.pth") as tmp:
        # LAION's file keeps the Sequential as .layers (rewards.Aesthetic strips the prefix)
        torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, tmp)
    print(f"saved {out}")


def rater_references(prompts, n=4, seed=0):
    """The rater's mean over prompts of the world as it draws them, and of the best the world can draw: each prompt's
    palette and shape at the largest size (r = 7) on the background the rater likes best (s from 0 to 0.8 in steps
    of 0.05), n places each (the same places for every s)."""
    from world.drawing import RADIUS

    def score(prompt, strength, radius):
        images = torch.from_numpy(np.stack([draw(prompt, np.random.default_rng([seed, i]), strength, radius)
                                            for i in range(n)])) / 2 + 0.5
        return taste(images, [prompt] * n).mean().item()

    drawn = np.mean([score(p, None, None) for p in prompts])
    best = np.mean([max(score(p, s, RADIUS[1]) for s in np.arange(0, 0.81, 0.05)) for p in prompts])
    return drawn, best


# --------------------------------------------------------------------------------------------------------
# How right the judges are, on pictures they never saw
# --------------------------------------------------------------------------------------------------------

def spearman(a, b):
    """Rank correlation (no ties in continuous scores)."""
    ranks = [torch.argsort(torch.argsort(v)).double() for v in (a, b)]
    return torch.corrcoef(torch.stack(ranks))[0, 1].item()


def check(n=256, seed=12345, world="plain"):
    """The judges on n freshly drawn pictures: how often the CLIP picks each picture's own caption among a batch of
    32 (by cosine, as clipscore does), and the aesthetic head's rank correlation with the rater's noiseless taste.
    world: the plain world's judges ('tiny') or those of the world with activities ('tiny-activities')."""
    import random

    from diffusers import AutoencoderKL

    import rewards
    from plumbing import model_checks
    from world.tiny_world import WORLDS

    model_checks.quiet_libraries()
    judges = WORLD_MODELS[world]  # the judge set's name is its world's model's
    rng = np.random.default_rng(seed)
    training = rewards.load_prompts("simple_animals")
    images, chosen, drawn = judged_pictures(training, rng, n, world=world)
    clip = rewards.make_reward("clipscore", "cpu", clip_model=judges)
    if world == "activities":  # a prompt may name an activity its picture lacks: the captions say what it shows
        said = [shows(p, a, world) for p, a in zip(chosen, drawn)]
        looks = [(a["subject"], a["activity"]) for a in drawn]
        rows = (("what it shows + size and background", [caption(p, a) for p, a in zip(said, drawn)]),
                ("what it shows (the animal and the activity drawn)", said))
    else:
        looks = [prompt_attributes(p, rng) for p in chosen]  # what a prompt alone says: the palette and the shape
        rows = (("prompt + what it shows", [caption(p, a) for p, a in zip(chosen, drawn)]), ("the prompt alone", chosen))
    described = [look + (size_word(a["radius"]), background_word(a["strength"])) for look, a in zip(looks, drawn)]
    for (name, texts), seen in zip(rows, (described, looks)):
        hits = alike = 0
        for s in range(0, n, 32):
            inputs = clip.processor(text=texts[s:s + 32], images=rewards.to_pil(images[s:s + 32]), padding=True,
                                    return_tensors="pt")
            with torch.no_grad():
                picks = clip.clip(**inputs).logits_per_image.argmax(1).tolist()
            hits += sum(i == j for i, j in enumerate(picks))
            alike += sum(seen[s + i] == seen[s + j] for i, j in enumerate(picks))
        print(f"CLIP, {name}: picks the picture's own caption among 32 for {hits / n:.1%}, a caption that says the "
              f"same of a picture for {alike / n:.1%}")
    if world == "plain":
        shown = random.Random(0).choices(training, k=16)  # evaluate.py's 16 training prompts at --seed 0
        as_drawn, best = rater_references(shown)
        print(f"the rater on evaluate.py's 16 training prompts (--seed 0): the world as drawn {as_drawn:.3f}, the "
              f"best the world can draw {best:.3f}")
    aesthetic = rewards.make_reward("aesthetic", "cpu", clip_model=judges, aesthetic_head=judges)
    vae = AutoencoderKL.from_pretrained(TINY_MODELS[judges], subfolder="vae").eval()
    picture = WORLDS[world]
    r = np.random.default_rng([seed, 1])
    rows = {"as the world draws them": (torch.from_numpy(np.stack([picture(p, r) for p in chosen])) / 2 + 0.5, chosen),
            "half with s uniform in [0, 0.8]": judged_pictures(training, r, n, world=world)[:2],
            f"the same, half through {judges}'s VAE": judged_pictures(training, r, n, vae, world)[:2]}
    for name, (pictures, prompts) in rows.items():
        print(f"aesthetic head, pictures {name}: rank correlation with the rater's noiseless taste "
              f"{spearman(aesthetic(pictures, prompts), taste(pictures, prompts, world)):.3f}")
