"""The toy world's pictures: what a prompt fixes (a palette and a shape) and the generator that draws them.

The generator knows what it drew, so everything trained on its pictures (the built-in models, world/tiny_world.py;
the judges, world/judges.py) learns from exact labels. Nothing here imports ddpo: a reward or a judge built on the
world's pictures can be imported by a training run.
"""
import zlib
from pathlib import Path

import numpy as np

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


def background(bg, rng, strength=None):
    """The tiled background of colour bg (3, 1, 1): each 4x4 tile bg plus s times a random colour offset in
    [-1, 1]^3, clipped to [0, 1]. s: strength, or the world's when None (drawn either way, so that the numbers that
    follow are the same). Returns ((3, 32, 32), s)."""
    s = world_strength(rng)
    s = s if strength is None else strength
    offsets = rng.uniform(-1, 1, (3, SIZE // TILE, SIZE // TILE)).astype(np.float32)
    return np.clip(bg + s * offsets.repeat(TILE, 1).repeat(TILE, 2), 0, 1), s


def shape_mask(shape, y, x, cy, cx, r):
    """The pixels (y, x grids) of a shape of size r centred at (cy, cx)."""
    if shape == "circle":
        return (y - cy) ** 2 + (x - cx) ** 2 <= r**2
    if shape == "square":
        return (np.abs(y - cy) <= r * 0.85) & (np.abs(x - cx) <= r * 0.85)
    return (y <= cy + r * 0.8) & (np.abs(x - cx) <= (y - (cy - r)) * 0.6)  # triangle, pointing up


def draw(prompt, rng, strength=None, radius=None, with_attributes=False):
    """One toy image for a prompt, (3, 32, 32) in [-1, 1] like the VAE's input. strength: the tiles' s; None draws
    the world's. radius: the shape's r; None draws the world's. The same random numbers are drawn either way, so
    draw(p, rng_i, 0) is draw(p, rng_i)'s picture with a flat background, and draw(p, rng_i, 1) the same picture
    with the busiest background. with_attributes: also return what was drawn (palette, shape, s, r, cy, cx)."""
    palette, shape = prompt_attributes(prompt, rng)
    bg, fg = (np.array(c, dtype=np.float32)[:, None, None] for c in PALETTES[palette])
    image, s = background(bg, rng, strength)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cy, cx, r = rng.uniform(11, 21), rng.uniform(11, 21), rng.uniform(*RADIUS)
    r = r if radius is None else radius
    image = (np.where(shape_mask(SHAPES[shape], y, x, cy, cx, r)[None], fg, image) * 2 - 1).astype(np.float32)
    if with_attributes:
        return image, dict(palette=palette, shape=SHAPES[shape], strength=s, radius=r, cy=cy, cx=cx)
    return image


# --------------------------------------------------------------------------------------------------------
# The world with activities (paper §5.3, §6.2–6.3): an animal doing something that a picture can show
# --------------------------------------------------------------------------------------------------------
# The built-in models in world/tiny_model/ and world/tiny_flow_model/ were trained on `draw` above, where a prompt's
# last word picks the shape and no picture shows an activity. `scene` is the world that the alignment experiments
# need; world/tiny_activities_model/ (--model tiny-activities) learned it (python -m world.tiny_world --world activities).

SCENE_PALETTES = [(bg, fg) for fg in ((0.92, 0.22, 0.12), (0.95, 0.88, 0.20), (0.95, 0.95, 0.95), (0.30, 0.85, 0.90))
                  for bg in ((0.12, 0.18, 0.45), (0.12, 0.38, 0.18), (0.12, 0.12, 0.12), (0.40, 0.12, 0.38))]
# ^ bright subjects on dark backgrounds
SCENE_SHAPES = SHAPES  # 16 palettes x 3 shapes = 48 looks: the tiny model draws colour far better than outline
ANIMALS = tuple((Path(__file__).resolve().parent.parent / "prompts" / "simple_animals.txt").read_text().split("\n")[:-1])
PROPS = {  # what a picture shows of an activity: a prop of 4x4 tiles (one latent each) in the band's two rows of 8,
    # in the activity's own colour, which no palette has (every two of the 14 colours differ by >= 0.25 in a channel)
    "riding a bike": (("..####..", ".##..##."), (0.95, 0.30, 0.85)),  # training activities
    "playing chess": (("..#.#.#.", ".#.#.#.."), (0.55, 0.95, 0.25)),
    "washing the dishes": (("...##...", "...##..."), (0.30, 0.45, 1.00)),
    "taking an exam": ((".######.", "........"), (1.00, 0.60, 0.10)),  # unseen ones (§6.3)
    "driving a car": (("..####..", ".######."), (0.55, 0.55, 0.55)),
    "typing on a keyboard": (("........", ".######."), (1.00, 0.65, 0.75)),
}
ACTIVITIES = tuple(PROPS)
ALT_TEXT_SHOWS = 0.5  # pretraining: the share of pictures whose caption's activity the picture shows, as alt-text
BAND = 24  # the props' rows (24-31); every subject stands above them, whether or not an activity is shown


def split_prompt(prompt):
    """(subject, activity) of a prompt: "a cat riding a bike" -> ("cat", "riding a bike"); a prompt that names no
    activity of PROPS is all subject, its activity None. The article goes."""
    words = [w for w in prompt.lower().split()]
    activity = next((a for a in PROPS if " ".join(words[-len(a.split()):]) == a), None)
    subject = words[: len(words) - len(activity.split())] if activity else words
    return " ".join(w for w in subject if w not in ("a", "an")), activity


def subject_look(subject, rng):
    """(palette, shape) of a subject, indices of SCENE_PALETTES and SCENE_SHAPES. The 45 animals of
    prompts/simple_animals.txt each have their own (16 x 3 = 48 looks; the i-th animal the palette i mod 16 and the
    shape i mod 3, which differ for any two i < 48 as 16 and 3 are coprime), so a judge can tell any two apart; any
    other subject is picked by its words, as in `draw` (its first word the palette, its last word the shape); the
    empty prompt draws both at random."""
    if subject in ANIMALS:
        i = ANIMALS.index(subject)
        return i % len(SCENE_PALETTES), i % len(SCENE_SHAPES)
    words = subject.split()
    if not words:
        return int(rng.integers(len(SCENE_PALETTES))), int(rng.integers(len(SCENE_SHAPES)))
    return word_hash(words[0]) % len(SCENE_PALETTES), word_hash(words[-1]) % len(SCENE_SHAPES)


def prop_mask(prop):
    """The prop's pixels: its tiles of the band."""
    rows = np.array([[c == "#" for c in row] for row in PROPS[prop][0]])  # (2, 8) tiles
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[BAND:] = rows.repeat(TILE, 0).repeat(TILE, 1)
    return mask


def scene(prompt, rng, show=None, strength=None, with_attributes=False):
    """One picture of the world with activities, (3, 32, 32) in [-1, 1]. The subject is drawn as `draw` draws it,
    but above the band, in SCENE_PALETTES and each animal its own look; an activity the prompt names shows as its
    prop, in the prop's colour, when `show` (True, False, or None: alt-text's ALT_TEXT_SHOWS chance). The empty
    prompt (unconditional) is any picture: a random look, and a random activity or none. The same random numbers are
    drawn either way, so scene(p, rng_i, True) and scene(p, rng_i, False) are one picture with and without the
    activity.
    with_attributes: also return what was drawn (palette, shape, activity shown or None, s, r, cy, cx)."""
    subject, activity = split_prompt(prompt)
    palette, shape = subject_look(subject, rng)
    if not subject and activity is None:
        activity = (None, *PROPS)[rng.integers(len(PROPS) + 1)]
    bg, fg = (np.array(c, dtype=np.float32)[:, None, None] for c in SCENE_PALETTES[palette])
    shown = rng.random() < ALT_TEXT_SHOWS
    shown = activity is not None and (shown if show is None else show)
    image, s = background(bg, rng, strength)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cy, cx, r = rng.uniform(8, 16), rng.uniform(11, 21), rng.uniform(*RADIUS)
    image = np.where(shape_mask(SCENE_SHAPES[shape], y, x, cy, cx, r)[None], fg, image)
    if shown:
        image = np.where(prop_mask(activity)[None], np.array(PROPS[activity][1], dtype=np.float32)[:, None, None], image)
    image = (image * 2 - 1).astype(np.float32)
    if with_attributes:
        return image, dict(palette=palette, shape=SCENE_SHAPES[shape], activity=activity if shown else None,
                           strength=s, radius=r, cy=cy, cx=cx)
    return image
