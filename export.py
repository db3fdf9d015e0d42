"""A run's fine-tuned model in diffusers' own formats, written by diffusers itself, for any diffusers user.

    python export.py runs/NAME OUT

LoRA: the adapter as OUT/pytorch_lora_weights.safetensors with peft's metadata (StableDiffusionPipeline's or, for a
flow model, StableDiffusion3Pipeline's save_lora_weights), which pipe.load_lora_weights(OUT) loads into the run's
base pipeline. Full fine-tuning: a whole pipeline folder with the fine-tuned UNet or transformer (save_pretrained),
which DiffusionPipeline.from_pretrained(OUT) loads (a pipeline without T5, such as tiny-flow's, with
text_encoder_3=None, tokenizer_3=None), and so does python ddpo.py --model OUT.
"""
import os
from pathlib import Path

import ddpo
from plumbing.checkpoints import latest_checkpoint
from plumbing.command_line import ArgumentParser, HelpFormatter
from plumbing.files import atomic_folder, fail, why


def export(run_dir, out):
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    run = ddpo.load_run_args(run_dir)
    if Path(out).exists():
        fail(f"{out} exists; export.py writes a new folder")
    models = ddpo.load_models(run_dir, "cpu")  # the base model with the run's last checkpoint, fp32
    with atomic_folder(out) as tmp:
        if run.lora_rank > 0:
            layers, metadata = get_peft_model_state_dict(models.denoiser), models.denoiser.peft_config["default"].to_dict()
            if models.flow:  # peft's key names, as diffusers' SD3 LoRA scripts save them
                StableDiffusion3Pipeline.save_lora_weights(tmp, transformer_lora_layers=layers,
                                                           transformer_lora_adapter_metadata=metadata)
            else:
                StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=convert_state_dict_to_diffusers(layers),
                                                          unet_lora_adapter_metadata=metadata)
        elif models.flow:  # the pipeline as loaded, its transformer the fine-tuned one
            models.pipeline.save_pretrained(tmp)
        else:
            StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                    unet=models.denoiser, scheduler=models.scheduler, safety_checker=None,
                                    feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp)
    print(f"wrote {out} ({'LoRA adapter' if run.lora_rank else 'pipeline folder'}, from {latest_checkpoint(run_dir)})")
    return Path(out)


def main(argv=None):
    """The command line; also callable as export.main([...]) from Python."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("run", help="a run folder, e.g. runs/jpeg__is__0__1764000000")
    p.add_argument("out", help="the new folder to write")
    args = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        fail("export.py runs in one process: python export.py, not torchrun")
    try:
        return export(args.run, args.out)
    except OSError as e:  # OUT cannot be written (read-only, a full disk): nothing half-written is left
        fail(f"cannot write {args.out} ({why(e)})")


if __name__ == "__main__":
    main()
