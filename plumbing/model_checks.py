"""Whether a diffusers pipeline can serve as DDPO's policy, each problem as one line: a scheduler whose DDIM step
or flow SDE step has no density or steps between other timesteps, components that do not fit together, weights that
do not load.
"""
from pathlib import Path

import torch

from plumbing.files import first_line


def check_scheduler(scheduler, num_steps):
    """Why the model's policy step cannot serve its scheduler with a density, or None (check_flow_scheduler for
    a flow model's, check_ddim_scheduler for a DDIM one's)."""
    if type(scheduler).__name__.startswith("FlowMatch"):
        return check_flow_scheduler(scheduler, num_steps)
    return check_ddim_scheduler(scheduler, num_steps)


def check_flow_scheduler(scheduler, num_steps):
    """Why flow_sde_step cannot serve this scheduler as a policy with a density, or None: it steps between
    FlowMatchEulerDiscreteScheduler's sigmas, which must fall from at most 1 to 0 with every step's t > 0 (σ_t > 0);
    a shift that depends on the image size (use_dynamic_shifting) needs a mu that DDPO does not compute."""
    config = scheduler.config
    if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
        return f"scheduler {type(scheduler).__name__} is not FlowMatchEulerDiscreteScheduler, whose sigmas the flow SDE steps between"
    if config.get("use_dynamic_shifting"):
        return ("use_dynamic_shifting=True takes its shift from the image size (mu), which is not supported; set it to "
                "false and a fixed shift in scheduler/scheduler_config.json, as Stable Diffusion 3 has")
    try:
        scheduler.set_timesteps(num_steps)
    except ValueError as e:
        return f"scheduler refuses {num_steps} steps ({first_line(e)})"
    sigmas = scheduler.sigmas
    if not (sigmas[:-1] > 0).all() or not (sigmas[:-1] <= 1).all() or not (sigmas[1:] < sigmas[:-1]).all() or sigmas[-1] < 0:
        return (f"sigmas {[round(s, 4) for s in sigmas.tolist()]} do not fall from at most 1 to 0 with every step's t > 0 "
                f"(invert_sigmas?): the SDE step has no density where t = 0 or it runs backwards")
    return None


def check_ddim_scheduler(scheduler, num_steps):
    """Why ddim_step cannot serve this scheduler as a policy with a density equal to DDIMScheduler.step, or None:
    σ_t = 0 at the last step, thresholding (dynamic x̂_0 clipping for pixel-space models: not implemented
    here), or a timestep spacing whose next timestep is not the one DDIMScheduler.step steps to (t − 1000 // T)."""
    config = scheduler.config
    if config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        return f"prediction_type {config.prediction_type!r} is not one of epsilon, v_prediction, sample"
    if config.set_alpha_to_one:
        return ("set_alpha_to_one=True makes the last DDIM step deterministic (σ_t = 0, no density); set it to false "
                "in scheduler/scheduler_config.json, as Stable Diffusion does")
    if config.thresholding:
        return "thresholding=True is not supported (set it to false in scheduler/scheduler_config.json)"
    try:
        scheduler.set_timesteps(num_steps)
    except ValueError as e:  # e.g. more steps than the model's training timesteps
        return f"scheduler refuses {num_steps} steps ({first_line(e)})"
    t = scheduler.timesteps
    step = config.num_train_timesteps // num_steps  # DDIMScheduler.step goes from t to t − 1000 // T
    if not torch.equal(t[:-1] - step, t[1:]) or t[-1] - step >= 0:
        return (f"timestep_spacing={config.timestep_spacing!r} with {num_steps} steps gives timesteps that "
                f"DDIMScheduler.step does not step between; use 'leading' or 'trailing' with a T that divides "
                f"{config.num_train_timesteps}")
    return None


def downsampling(vae_config):
    """How many pixels a side one latent stands for: each VAE level but the last halves the image (SD: 8)."""
    return 2 ** (len(vae_config.block_out_channels) - 1)


def resolution_problem(models, resolution):
    """Why the denoiser cannot sample images of `resolution` pixels a side, or None (0: the model's own size). Its
    latents are resolution / the VAE's downsampling a side; SD3's transformer also cuts them into patches, no more a
    side than its position embedding holds (pos_embed_max_size). A UNet takes any latent size."""
    config = models.denoiser.config
    down = downsampling(models.vae.config)
    unit = down * (config.patch_size if models.flow else 1)
    if resolution % unit:
        patch = f" times its transformer's patch size {config.patch_size}" if models.flow else ""
        return f"VAE's downsampling {down}{patch} needs a --resolution that is a multiple of {unit}, not {resolution}"
    if models.flow and resolution // unit > config.pos_embed_max_size:
        return (f"transformer's position embedding holds {config.pos_embed_max_size} patches a side: --resolution "
                f"{resolution} needs {resolution // unit} (at most {config.pos_embed_max_size * unit} pixels)")
    return None


def mismatched_components(models):
    """Why a pipeline's components cannot work together, or None: the denoiser must take the VAE's latents (channels,
    and the VAE's image size divided by its downsampling), the text encoders' states must be the size its attention
    takes (SD3: their pooled embeddings too), and every token id must be one the text encoder has."""
    unet, vae, text = models.denoiser.config, models.vae.config, models.text_encoder.config
    name = "transformer" if models.flow else "UNet"
    factor = downsampling(vae)
    if vae.latent_channels != unet.in_channels:
        return f"its VAE has {vae.latent_channels} latent channels and its {name} takes {unet.in_channels} input channels"
    if unet.sample_size * factor != vae.sample_size:
        return (f"its {name}'s sample size {unet.sample_size} is not its VAE's image size {vae.sample_size} divided by "
                f"the VAE's downsampling {factor} ({vae.sample_size / factor:g})")
    if models.flow:
        return mismatched_flow_text(models)
    if text.hidden_size != unet.cross_attention_dim:
        return (f"its text encoder's hidden size {text.hidden_size} is not its UNet's cross-attention size "
                f"{unet.cross_attention_dim}")
    if len(models.tokenizer) > text.vocab_size:
        return f"its tokenizer has {len(models.tokenizer)} tokens and its text encoder only {text.vocab_size}"
    return None


def model_load_error(name, error):
    """One line on why --model could not be loaded: a local folder that is no pipeline, an unreachable hub, or else."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    chain = [error]  # the hub's own exception, and the network error under it, sit in the __cause__ chain
    while len(chain) < 20 and (chain[-1].__cause__ or chain[-1].__context__):
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if Path(name).exists():
        weights = sorted(Path(name).glob("*/*.safetensors")) + sorted(Path(name).glob("*/*.bin"))
        damaged = [path for path in weights if not readable_weights(path)]
        if damaged:
            return f"cannot load model folder {name}: weights file {damaged[0]} is damaged"
        return f"cannot load model folder {name} ({first_line(error)}): it needs a diffusers pipeline layout"
    if any(isinstance(e, LocalEntryNotFoundError) for e in chain):
        return (f"cannot load model {name!r}: no such local folder, and the hub is unreachable ({first_line(chain[-1])}) "
                f"with no cached copy; --model tiny or a local folder works offline")
    return (f"cannot load model {name!r} ({first_line(error)}); if it is a hub id, the hub may be unreachable: "
            f"--model tiny or a local folder works offline")


def readable_weights(path):
    """Whether a weights file reads whole: safetensors (every tensor's bytes, so a truncated file shows) or a
    PyTorch .bin (a zip or pickle, loaded as tensors only)."""
    from safetensors import safe_open

    try:
        if path.suffix == ".bin":
            torch.load(path, map_location="cpu", weights_only=True)
            return True
        with safe_open(path, "pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        return True
    except Exception:
        return False


def quiet_libraries():
    """Our own progress bars and error lines are the ones that matter; silence the libraries' loading chatter."""
    import warnings

    import diffusers
    import huggingface_hub
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()  # its retry messages while the hub is unreachable
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)  # diffusers → hub



def mismatched_flow_text(models):
    """mismatched_components' text checks for a StableDiffusion3Pipeline: the two CLIPs' token states, side by side,
    at most its joint attention's width (encode_prompt pads them to it), T5's exactly it; their pooled embeddings
    side by side its pooled projection's width."""
    pipe, net = models.pipeline, models.denoiser.config
    clips = [pipe.text_encoder.config, pipe.text_encoder_2.config]
    if sum(c.hidden_size for c in clips) > net.joint_attention_dim:
        return (f"its CLIP text encoders' hidden sizes {' + '.join(str(c.hidden_size) for c in clips)} exceed its "
                f"transformer's joint_attention_dim {net.joint_attention_dim}")
    if pipe.text_encoder_3 is not None and pipe.text_encoder_3.config.d_model != net.joint_attention_dim:
        return f"its T5's width {pipe.text_encoder_3.config.d_model} is not its transformer's joint_attention_dim {net.joint_attention_dim}"
    if sum(c.projection_dim for c in clips) != net.pooled_projection_dim:
        return (f"its CLIP text encoders' projections {' + '.join(str(c.projection_dim) for c in clips)} do not make its "
                f"transformer's pooled_projection_dim {net.pooled_projection_dim}")
    for tokenizer, clip in zip((pipe.tokenizer, pipe.tokenizer_2), clips):
        if len(tokenizer) > clip.vocab_size:
            return f"a tokenizer has {len(tokenizer)} tokens and its text encoder only {clip.vocab_size}"
    return None
