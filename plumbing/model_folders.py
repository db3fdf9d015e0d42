"""A model folder (or hub id) read into its parts with diffusers' and transformers' own from_pretrained, each problem
as one line: a folder that is no pipeline, a component missing, weights that do not load. And the frozen parts put
in the run's precision. ddpo.load_models puts the parts together as its Models; nothing here imports ddpo.
"""
import torch

from plumbing.files import fail
from plumbing.model_checks import model_load_error

COMPONENTS = {"StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
              "StableDiffusion3Pipeline": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                           "tokenizer_2", "scheduler")}  # T5 (text_encoder_3) is optional


def load_parts(name, path):
    """(denoiser, text_encoder, tokenizer, scheduler, vae, pipeline) of a StableDiffusionPipeline folder (its scheduler
    loaded as DDIMScheduler; pipeline None) or of a StableDiffusion3Pipeline, loaded whole with its own classes (the
    pipeline, whose encode_prompt gives c). name: as the user gave it, for the error line."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, StableDiffusion3Pipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    try:
        index = DiffusionPipeline.load_config(path)  # model_index.json
        kind = "StableDiffusion3Pipeline" if "transformer" in index else "StableDiffusionPipeline"
        if missing := [c for c in COMPONENTS[kind] if c not in index or index[c][0] is None]:
            fail(f"model {name} has no {', '.join(missing)}: it needs a {kind}'s {', '.join(COMPONENTS[kind])}")
        if kind == "StableDiffusion3Pipeline":  # its own classes, scheduler included (check_scheduler checks it)
            absent = {c: None for c in ("text_encoder_3", "tokenizer_3") if index.get(c, [None])[0] is None}  # no T5
            pipe = StableDiffusion3Pipeline.from_pretrained(path, **absent)
            return pipe.transformer, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, pipe.vae, pipe
        return (UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
                CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
                AutoTokenizer.from_pretrained(path, subfolder="tokenizer"),
                DDIMScheduler.from_pretrained(path, subfolder="scheduler"),
                AutoencoderKL.from_pretrained(path, subfolder="vae"), None)
    except Exception as e:  # OSError, ValueError, or a damaged weights file's own error (SafetensorError, …)
        fail(model_load_error(name, e))


def freeze(module, dtype, device):
    """A part that is not trained: no gradients, eval mode, on the device, its weights in the run's precision; but
    T5's "wo" overflows in fp16: loading in fp16, transformers keeps those modules fp32, and so do we."""
    module.requires_grad_(False).eval().to(device)
    keep = (getattr(module, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else ()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not any(k in name.split(".") for k in keep):
            tensor.data = tensor.data.to(dtype)
