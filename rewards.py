"""Reward functions r(x_0, c) for DDPO (paper §5.1–5.3).

Every reward is a plain callable: reward(images, prompts) -> float32 tensor (B,) on CPU, where images is a
float tensor (B, 3, H, W) in [0, 1] and prompts a list of B strings. REWARDS maps the --reward name to it;
DEFAULT_PROMPTS maps it to the prompt set the paper used for that task.
"""
import io

import numpy as np
import torch
from PIL import Image


def to_pil(images):
    """(B, 3, H, W) floats in [0, 1] → list of RGB PIL images (uint8, rounded)."""
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def jpeg_kilobytes(images):
    """Size of each image saved as JPEG at quality 95, in kB (bytes / 1000), as the paper measures it."""
    sizes = []
    for img in to_pil(images):
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_compressibility(images, prompts):
    """Paper §5.1 compressibility: r = −(JPEG size in kB)."""
    return -jpeg_kilobytes(images)


def jpeg_incompressibility(images, prompts):
    """Paper §5.1 incompressibility: r = +(JPEG size in kB)."""
    return jpeg_kilobytes(images)


REWARDS = {
    "jpeg": jpeg_compressibility,
    "incompressibility": jpeg_incompressibility,
}

DEFAULT_PROMPTS = {  # paper §5: the prompt distribution p(c) of each task
    "jpeg": "imagenet_animals",
    "incompressibility": "imagenet_animals",
}


def get_reward(name):
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; known rewards: {', '.join(REWARDS)}")
    return REWARDS[name]
