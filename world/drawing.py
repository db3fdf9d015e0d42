"""The toy world's pictures: what a prompt fixes (a palette and a shape) and the generator that draws them.

The generator knows what it drew, so everything trained on its pictures (the built-in models, world/tiny_world.py;
the judges, world/judges.py) learns from exact labels. Nothing here imports ddpo: a reward or a judge built on the
world's pictures can be imported by a training run.
"""
import zlib

import numpy as np
import torch

SIZE, TILE = 32, 4  # pixels; the tiles are the VAE's 4x downsampling, so a tile is one latent position
STRENGTH_MEDIAN, STRENGTH_SPREAD = 0.2, 0.6  # the world's tile strength: s = 0.2 · exp(0.6 · N(0, 1))
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


def world_strength(rng):
    """The tile strength s of one picture of the world: log-normal around 0.2 (90% of pictures in 0.075–0.54)."""
    return STRENGTH_MEDIAN * float(np.exp(STRENGTH_SPREAD * rng.standard_normal()))


RADIUS = (5.0, 7.0)  # the shape's size r: uniform in this range (a circle's radius, in pixels)


def draw(prompt, rng, strength=None, radius=None, with_attributes=False):
    """One toy image for a prompt, (3, 32, 32) in [-1, 1] like the VAE's input. strength: the tiles' s; None draws
    the world's. radius: the shape's r; None draws the world's. The same random numbers are drawn either way, so
    draw(p, rng_i, 0) is draw(p, rng_i)'s picture with a flat background, and draw(p, rng_i, 1) the same picture
    with the busiest background. with_attributes: also return what was drawn (palette, shape, s, r, cy, cx)."""
    palette, shape = prompt_attributes(prompt, rng)
    bg, fg = (np.array(c, dtype=np.float32)[:, None, None] for c in PALETTES[palette])
    s = world_strength(rng)
    s = s if strength is None else strength
    offsets = rng.uniform(-1, 1, (3, SIZE // TILE, SIZE // TILE)).astype(np.float32)
    image = np.clip(bg + s * offsets.repeat(TILE, 1).repeat(TILE, 2), 0, 1)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cy, cx, r = rng.uniform(11, 21), rng.uniform(11, 21), rng.uniform(*RADIUS)
    r = r if radius is None else radius
    if SHAPES[shape] == "circle":
        mask = (y - cy) ** 2 + (x - cx) ** 2 <= r**2
    elif SHAPES[shape] == "square":
        mask = (np.abs(y - cy) <= r * 0.85) & (np.abs(x - cx) <= r * 0.85)
    else:  # triangle pointing up
        mask = (y <= cy + r * 0.8) & (np.abs(x - cx) <= (y - (cy - r)) * 0.6)
    image = (np.where(mask[None], fg, image) * 2 - 1).astype(np.float32)
    if with_attributes:
        return image, dict(palette=palette, shape=SHAPES[shape], strength=s, radius=r, cy=cy, cx=cx)
    return image


def draw_batch(prompts, rng, strength=None):
    return torch.from_numpy(np.stack([draw(p, rng, strength) for p in prompts]))
