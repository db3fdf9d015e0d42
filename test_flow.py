"""Flow-GRPO's policy through the whole project: SD3-style pipelines through --model, the SDE step in the rollout
and in rescoring, every estimator, DPOK's KL, LoRA and full fine-tuning, mixed precision, resume, export and
evaluate.py, each on a small random StableDiffusion3Pipeline the tests build and save (no hub download).

The references are diffusers' own: StableDiffusion3Pipeline's sampling loop (the flow's ODE, which the SDE becomes
as a → 0), its transformer called directly, FlowMatchEulerDiscreteScheduler's training sigmas in closed form, and
StableDiffusion3Pipeline.load_lora_weights.
"""
import json
import math

import pytest
import torch

import ddpo
import evaluate
import export
import tiny_world


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    """An SD3-shaped pipeline with random weights: 16x16 images, 4x8x8 latents, two CLIPs, no T5, shift 3."""
    torch.manual_seed(0)
    return tiny_world.save_sd3_style_pipeline(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="module")
def sd3(sd3_dir):
    return ddpo.load_models(str(sd3_dir), "cpu")


def flow_argv(model, out, name, *extra):
    return ["--model", str(model), "--epochs", "1", "--num-steps", "3", "--samples-per-epoch", "4",
            "--samples-per-prompt", "2", "--sample-batch-size", "4", "--num-minibatches", "2", "--train-batch-size", "2",
            "--prompts", "simple_animals", "--out-dir", str(out), "--run-name", name, *extra]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def transformer_outputs(transformer, seed=0):
    """The transformer on fixed random inputs: what two copies of a model must agree on."""
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    states, pooled = torch.randn(2, 16, c.joint_attention_dim, generator=g), torch.randn(2, c.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([900.0, 40.0]), encoder_hidden_states=states,
                           pooled_projections=pooled).sample


# --------------------------------------------------------------------------------------------------------
# The kind of model picks the policy
# --------------------------------------------------------------------------------------------------------

def test_an_sd3_folder_loads_with_its_own_classes_and_the_flow_policy(sd3, sd3_dir):
    assert sd3.flow and type(sd3.denoiser).__name__ == "SD3Transformer2DModel"
    assert type(sd3.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and sd3.scheduler.config.shift == 3.0
    cond = ddpo.encode_prompts(sd3, ["a cat", "a dog"])
    assert cond["encoder_hidden_states"].shape == (2, 16, 32) and cond["pooled_projections"].shape == (2, 32)
    lora = ddpo.load_models(str(sd3_dir), "cpu", lora_rank=2)  # Flow-GRPO's targets: both streams' attention
    trained = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in lora.denoiser.named_parameters() if p.requires_grad}
    assert trained == {"to_q", "to_k", "to_v", "0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_the_rollout_becomes_the_pipelines_own_sampler_as_the_noise_level_goes_to_zero(sd3, guidance):
    """At a → 0 the SDE is the flow's ODE: the rollout from the same x_T ends where StableDiffusion3Pipeline's own
    loop (FlowMatchEulerDiscreteScheduler.step, its own CFG and encode_prompt) ends, and decodes to its images (the
    VAE's scaling and shift factors); at Flow-GRPO's a = 0.7 it does not."""
    prompts = ["a cat", "a dog riding a bike"]
    x_T = torch.stack([torch.randn((4, 8, 8), generator=g) for g in ddpo.noise_generators(0, range(2))])
    with torch.no_grad():
        run = dict(height=16, width=16, num_inference_steps=4, guidance_scale=guidance, latents=x_T, max_sequence_length=0)
        expected = sd3.pipeline(prompts, output_type="latent", **run).images
        images = sd3.pipeline(prompts, output_type="pt", **run).images
    ends = {}
    for a in (1e-6, 0.7):
        args = ddpo.parse_args(["--model", "unused", "--num-steps", "4", "--guidance-scale", str(guidance),
                                "--noise-level", str(a)])
        traj = ddpo.rollout(sd3, prompts, args, ddpo.noise_generators(0, range(2)))
        assert torch.equal(traj.states[:, 0], x_T)
        ends[a] = traj.states[:, -1]
    torch.testing.assert_close(ends[1e-6], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ddpo.decode(sd3, ends[1e-6]), images, rtol=1e-4, atol=1e-4)
    assert (ends[0.7] - expected).abs().max() > 0.1


def test_resolution_samples_smaller_images_as_the_pipelines_height_and_width(sd3):
    """--resolution 8 on the 16x16 SD3 pipeline: 4x4 latents (2x2 patches), and at a → 0 where
    StableDiffusion3Pipeline's own loop at height = width = 8 ends from the same x_T."""
    args = ddpo.parse_args(["--model", "unused", "--num-steps", "3", "--noise-level", "1e-6", "--resolution", "8"])
    x_T = torch.stack([torch.randn((4, 4, 4), generator=g) for g in ddpo.noise_generators(0, range(2))])
    with torch.no_grad():
        expected = sd3.pipeline(["a cat", "a cow"], height=8, width=8, num_inference_steps=3, guidance_scale=5.0,
                                latents=x_T, max_sequence_length=0, output_type="latent").images
    traj = ddpo.rollout(sd3, ["a cat", "a cow"], args, ddpo.noise_generators(0, range(2)))
    assert traj.states.shape == (2, 4, 4, 4, 4)
    torch.testing.assert_close(traj.states[:, -1], expected, rtol=1e-4, atol=1e-4)


def test_a_resolution_the_transformer_cannot_take_is_one_line(sd3, sd3_dir, main_error, tmp_path):
    """A side that is no whole number of patches (the VAE's 2 times the patch size 2), or more patches than the
    position embedding holds (4 a side here: 16 pixels)."""
    assert ddpo.resolution_problem(sd3, 6) == ("VAE's downsampling 2 times its transformer's patch size 2 needs a "
                                               "--resolution that is a multiple of 4, not 6")
    assert ddpo.resolution_problem(sd3, 20) == ("transformer's position embedding holds 4 patches a side: "
                                                "--resolution 20 needs 5 (at most 16 pixels)")
    assert ddpo.resolution_problem(sd3, 16) is None and ddpo.resolution_problem(sd3, 0) is None
    line = main_error(*flow_argv(sd3_dir, tmp_path / "runs", "r", "--resolution", "20"))
    assert line.startswith(f"error: cannot use model {sd3_dir}: its transformer's position embedding holds 4 patches")
    assert not (tmp_path / "runs").exists()


def test_rollout_actions_are_the_sde_step_of_the_guided_velocity_with_normal_log_probs(sd3):
    """Each action is μ + std·z with the step's own draw z, μ and std from flow_sde_step (tested against the scheduler
    and closed forms) on the guided velocity of the transformer called directly; the log-prob is Normal's, per dim."""
    args = ddpo.parse_args(["--model", "unused", "--num-steps", "4", "--guidance-scale", "3"])
    prompts = ["a cat", "a cow"]
    traj = ddpo.rollout(sd3, prompts, args, ddpo.noise_generators(3, range(2)))
    gens = ddpo.noise_generators(3, range(2))
    draws = [torch.stack([torch.randn((4, 8, 8), generator=g) for g in gens]) for _ in range(5)]  # x_T, then each step's
    cond, uncond = ddpo.encode_prompts(sd3, prompts), ddpo.encode_prompts(sd3, ["", ""])
    with torch.no_grad():
        for j, t in enumerate(traj.timesteps):
            x_t = traj.states[:, j]
            v = [sd3.denoiser(hidden_states=x_t, timestep=t.expand(2), **c).sample for c in (uncond, cond)]
            mean, std = ddpo.flow_sde_step(sd3.scheduler, v[0] + 3.0 * (v[1] - v[0]), x_t, t.expand(2), 0.7)
            torch.testing.assert_close(traj.states[:, j + 1], mean + std * draws[j + 1], rtol=1e-4, atol=1e-5)
            normal = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(traj.states[:, j + 1]).mean((1, 2, 3))
            torch.testing.assert_close(traj.log_probs[:, j], normal, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lora_rank, precision", [("0", "no"), ("4", "no"), ("4", "bf16"), ("4", "fp16")])
def test_rescoring_unchanged_weights_gives_ratio_one_on_the_flow_policy(sd3_dir, lora_rank, precision):
    models = ddpo.load_models(str(sd3_dir), "cpu", lora_rank=int(lora_rank), mixed_precision=precision)
    args = ddpo.parse_args(["--model", str(sd3_dir), "--num-steps", "3", "--mixed-precision", precision,
                            "--lora-rank", lora_rank, "--noise-level", "0.5"])
    traj = ddpo.rollout(models, ["cat", "dog", "cow", "pig"], args, ddpo.noise_generators(1, range(4)))
    uncond = ddpo.encode_prompts(models, [""])
    with torch.no_grad():
        for j in range(3):
            for rows in (torch.arange(4), torch.tensor([1, 3]), torch.tensor([2])):
                log_prob = ddpo.rescore(models, traj, rows, torch.full((len(rows),), j), uncond, args)[0]
                assert (torch.exp(log_prob - traj.log_probs[rows, j]) - 1).abs().max().item() < 1e-6


def test_flow_matching_loss_is_the_velocity_error_at_the_schedulers_training_sigma(sd3):
    """x_t = (1 − σ) x_0 + σ ε with σ the shifted training sigma of number t in closed form (shift 3:
    σ = 3s / (1 + 2s), s = (1000 − t) / 1000), and the target ε − x_0."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    cond = ddpo.encode_prompts(sd3, ["a cat", "a dog", ""])
    s = (1000 - t.float()) / 1000
    sigma = (3 * s / (1 + 2 * s)).view(-1, 1, 1, 1)
    sd3.scheduler.set_timesteps(4)  # as a round leaves it: the loss must not take these 4 sigmas
    with torch.no_grad():
        v = sd3.denoiser(hidden_states=(1 - sigma) * x0 + sigma * noise, timestep=1000 * sigma.flatten(), **cond).sample
        expected = ((v - (noise - x0)) ** 2).mean((1, 2, 3))
        torch.testing.assert_close(ddpo.flow_matching_loss(sd3, x0, cond, t, noise), expected, rtol=1e-5, atol=1e-6)


def test_dpok_kl_on_the_flow_policy_is_to_the_base_model(sd3_dir):
    """Under LoRA π_pre is the transformer with its adapter off: the KL is 0 while lora_B is zero and, once the adapter
    has moved, the closed form between its step and a separately loaded base model's (same σ_t)."""
    base = ddpo.load_models(str(sd3_dir), "cpu")
    lora = ddpo.load_models(str(sd3_dir), "cpu", lora_rank=4)
    args = ddpo.parse_args(["--model", str(sd3_dir), "--num-steps", "3", "--kl-coef", "0.1"])
    base.scheduler.set_timesteps(3)  # the steps between the rollout's sigmas
    traj = ddpo.rollout(lora, ["cat", "dog"], args, ddpo.noise_generators(1, range(2)))
    uncond, rows, steps = ddpo.encode_prompts(lora, [""]), torch.arange(2), torch.tensor([0, 2])
    state = (traj.states[rows, steps], traj.timesteps[steps], traj.cond, ddpo.repeat(uncond, 2), args.guidance_scale,
             args.noise_level)
    with torch.no_grad():
        assert ddpo.rescore(lora, traj, rows, steps, uncond, args)[1].tolist() == [0.0, 0.0]
        for p in (p for n, p in lora.denoiser.named_parameters() if "lora_B" in n):
            p.normal_(std=0.1)
        mean, std = ddpo.policy(lora, *state)
        base_mean, base_std = ddpo.policy(base, *state)
        kl = ddpo.rescore(lora, traj, rows, steps, uncond, args)[1]
    torch.testing.assert_close(std, base_std)
    assert (kl > 0).all()
    expected = ((mean - base_mean) ** 2 / (2 * std**2)).mean((1, 2, 3))
    torch.testing.assert_close(kl, expected)


# --------------------------------------------------------------------------------------------------------
# Every estimator end to end, LoRA and full fine-tuning, mixed precision
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, algo, extra", [
    ("sd3", "sf", []), ("sd3", "is", []), ("sd3", "rwr", []), ("sd3", "rwr-sparse", []),
    ("sd3", "is", ["--kl-coef", "0.1", "--advantage", "value"]), ("sd3", "is", ["--lora-rank", "0"]),
    ("sd3", "is", ["--mixed-precision", "bf16"]), ("sd3", "sf", ["--mixed-precision", "fp16", "--lora-rank", "0"]),
    ("tiny-flow", "sf", []), ("tiny-flow", "is", ["--kl-coef", "0.1"]), ("tiny-flow", "rwr", []),
    ("tiny-flow", "rwr-sparse", [])])
def test_each_estimator_trains_an_sd3_pipeline_and_the_tiny_flow_model(sd3_dir, tmp_path, model, algo, extra):
    sd3_dir = sd3_dir if model == "sd3" else ddpo.TINY_MODELS["tiny-flow"]
    ddpo.main(flow_argv(sd3_dir, tmp_path, "run", "--algo", algo, "--lr", "1e-2", *extra))
    row = metrics(tmp_path / "run")[-1]
    assert row["epoch"] == 1 and math.isfinite(row["losses/loss"]) and row["reward/mean"] < 0
    assert (tmp_path / "run" / "grid_001.png").is_file()
    assert ("losses/kl" in row) == ("--kl-coef" in extra) and ("value/loss" in row) == ("--advantage" in extra)
    if "--kl-coef" in extra:
        assert row["losses/kl"] > 0
    tuned = transformer_outputs(ddpo.load_models(str(tmp_path / "run"), "cpu").denoiser)
    base = transformer_outputs(ddpo.load_models(str(sd3_dir), "cpu").denoiser)
    updated = row.get("losses/skipped", 0.0) < 1.0  # fp16 skips a step whose gradients overflowed
    assert ((tuned - base).abs().max() > 1e-5) == updated


@pytest.mark.parametrize("setup", ["lora", "full-dpok"])
def test_resume_of_a_flow_run_gives_the_same_metrics_as_training_straight(sd3_dir, tmp_path, setup):
    extra = ["--lora-rank", "4", "--lr", "1e-2"] if setup == "lora" else \
        ["--lora-rank", "0", "--lr", "1e-3", "--kl-coef", "1", "--advantage", "value"]
    common = [*flow_argv(sd3_dir, tmp_path, "x", *extra, "--seed", "5", "--save-every", "1")[:-2]]
    ddpo.main([*common, "--epochs", "3", "--run-name", "straight"])
    ddpo.main([*common, "--epochs", "1", "--run-name", "halves"])
    ddpo.main(["--resume", str(tmp_path / "halves"), "--epochs", "3"])
    straight = metrics(tmp_path / "straight")
    assert without_times(straight) == without_times(metrics(tmp_path / "halves"))
    if setup == "full-dpok":
        assert straight[2]["losses/kl"] > 0


# --------------------------------------------------------------------------------------------------------
# The fine-tuned flow model leaves the project in diffusers' formats; evaluate.py compares it with its base
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora_rank", ["4", "0"])
def test_export_of_a_flow_run_loads_in_stable_diffusion_3_pipelines_with_the_runs_transformer(sd3_dir, tmp_path, lora_rank):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    ddpo.main(flow_argv(sd3_dir, tmp_path, "run", "--lora-rank", lora_rank, "--lr", "1e-2"))
    export.main([str(tmp_path / "run"), str(tmp_path / "out")])
    ours = transformer_outputs(ddpo.load_models(str(tmp_path / "run"), "cpu").denoiser)
    base = transformer_outputs(ddpo.load_models(str(sd3_dir), "cpu").denoiser)
    assert (ours - base).abs().max() > 1e-4  # the run did change the transformer
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None}
    if lora_rank == "4":
        from safetensors import safe_open

        with safe_open(tmp_path / "out" / "pytorch_lora_weights.safetensors", "pt") as f:
            keys = list(f.keys())
        assert keys and all(k.startswith("transformer.") for k in keys)
        pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, **no_t5)
        pipe.load_lora_weights(tmp_path / "out")
    else:
        pipe = DiffusionPipeline.from_pretrained(tmp_path / "out", **no_t5)
        assert type(pipe).__name__ == "StableDiffusion3Pipeline"
        ddpo.load_models(str(tmp_path / "out"), "cpu")  # and --model OUT loads it too
    torch.testing.assert_close(transformer_outputs(pipe.transformer), ours, rtol=1e-5, atol=1e-5)


def test_evaluate_compares_a_flow_run_with_its_base_model(sd3_dir, tmp_path):
    ddpo.main(flow_argv(sd3_dir, tmp_path, "run", "--lr", "1e-2"))
    saved = evaluate.main([str(tmp_path / "run"), "--eval-prompts", "unseen_animals"])
    assert saved["train"]["base_reward_mean"] != saved["train"]["tuned_reward_mean"]
    assert (tmp_path / "run" / "eval" / "heldout.png").is_file()


# --------------------------------------------------------------------------------------------------------
# What cannot serve as a flow policy is one line
# --------------------------------------------------------------------------------------------------------

def edited_copy(sd3_dir, tmp_path, folder, **changes):
    """A copy of the SD3 folder with one config changed; a text encoder's is rebuilt with random weights of its
    new shape, as a mismatched component from elsewhere would be."""
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(sd3_dir, copy)
    if folder.startswith("text_encoder"):
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        config = CLIPTextConfig.from_pretrained(copy / folder)
        CLIPTextModelWithProjection(CLIPTextConfig(**{**config.to_dict(), **changes})).save_pretrained(copy / folder)
        return copy
    path = copy / {"scheduler": "scheduler/scheduler_config.json", ".": "model_index.json"}.get(folder, f"{folder}/config.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return copy


@pytest.mark.parametrize("folder, changes, message", [
    ("scheduler", {"use_dynamic_shifting": True}, "use_dynamic_shifting=True takes its shift from the image size"),
    ("scheduler", {"invert_sigmas": True}, "sigmas [0.0"),
    (".", {"scheduler": ["diffusers", "FlowMatchHeunDiscreteScheduler"]}, "scheduler FlowMatchHeunDiscreteScheduler is not "
                                                                     "FlowMatchEulerDiscreteScheduler"),
    ("text_encoder_2", {"projection_dim": 24}, "does not fit together: its CLIP text encoders' projections 16 + 24 "
                                               "do not make its transformer's pooled_projection_dim 32"),
    ("text_encoder", {"hidden_size": 32, "intermediate_size": 64}, "does not fit together: its CLIP text encoders' "
                                                                   "hidden sizes 32 + 16 exceed its transformer's "
                                                                   "joint_attention_dim 32"),
])
def test_a_flow_model_that_gives_no_density_or_does_not_fit_is_one_line(sd3_dir, tmp_path, main_error, folder, changes,
                                                                        message):
    model = edited_copy(sd3_dir, tmp_path, folder, **changes)
    line = main_error(*flow_argv(model, tmp_path / "runs", "r"))
    assert message in line, line
    assert not (tmp_path / "runs").exists()


def test_a_noise_level_that_gives_no_density_is_one_line(main_error, tmp_path):
    line = main_error(*flow_argv("tiny-flow", tmp_path / "runs", "r", "--noise-level", "0"))
    assert line == "error: --noise-level 0.0 is out of range (must be > 0) (see --help)"
    assert not (tmp_path / "runs").exists()


def test_the_sd35m_config_file_gives_flow_grpos_settings():
    """configs/sd35m_pickscore.txt: Flow-GRPO's reported SD3.5-M settings, 9 of 10 steps trained, groups of 24."""
    args = ddpo.parse_args([f"@{ddpo.HERE / 'configs' / 'sd35m_pickscore.txt'}", "--device", "cpu"])
    assert (args.model, args.num_steps, args.noise_level, args.guidance_scale) == (
        "stabilityai/stable-diffusion-3.5-medium", 10, 0.7, 4.5)
    assert (args.samples_per_epoch // args.samples_per_prompt, args.samples_per_prompt, args.kl_coef) == (48, 24, 0.01)
    assert ddpo.round_plan(args, args.num_steps) == (2, 1, 9) and (args.lora_rank, args.resolution) == (32, 512)


def test_compare_against_flow_grpos_settings_on_the_tiny_flow_model(tmp_path):
    import compare

    summary = compare.main(["--vs-flow-grpo", "--model", "tiny-flow", "--reward", "jpeg", "--seeds", "0", "--epochs", "1",
                            "--out-dir", str(tmp_path), "--", "--num-steps", "2", "--samples-per-epoch", "4",
                            "--samples-per-prompt", "4", "--buffer-size", "4", "--min-count", "4", "--sample-batch-size", "4"])
    folder = next(tmp_path.glob("compare__jpeg__*"))
    assert set(summary) == {"ddpo.py's defaults", "Flow-GRPO's settings"} and (folder / "compare.png").is_file()
    ours, theirs = (ddpo.load_run_args(folder / f"{key}__0") for key in ("ours", "flow-grpo"))
    assert ours.model == theirs.model == "tiny-flow" and ours.algo == theirs.algo == "is"
    assert (ours.kl_coef, ours.guidance_scale, ours.clip_range) == (0.0, 5.0, 1e-3)
    assert (theirs.kl_coef, theirs.guidance_scale, theirs.clip_range, theirs.noise_level) == (0.04, 4.5, 1e-4, 0.7)


def test_the_tiny_flow_model_is_an_sd3_pipeline_that_draws_the_prompts_palette():
    """tiny_flow_model/ loads in StableDiffusion3Pipeline, and its samples take the prompt's palette: the mean colour
    of each prompt's samples is nearer its own palette's background than another prompt's."""
    from diffusers import StableDiffusion3Pipeline

    assert type(StableDiffusion3Pipeline.from_pretrained(ddpo.TINY_MODELS["tiny-flow"], text_encoder_3=None,
                                                         tokenizer_3=None).transformer).__name__ == "SD3Transformer2DModel"
    models = ddpo.load_models("tiny-flow", "cpu")
    args = ddpo.parse_args(["--model", "tiny-flow"])
    prompts = [p for p in ("cat", "dog", "cow", "fox", "owl", "bee") for _ in range(4)]
    _, images = ddpo.sample(models, prompts, args, ddpo.noise_generators(0, range(len(prompts))), len(prompts))
    border = torch.cat([images[:, :, :4].flatten(2), images[:, :, -4:].flatten(2)], 2).mean(2)  # (B, 3) background
    rng = __import__("numpy").random.default_rng(0)
    palettes = torch.tensor([tiny_world.PALETTES[tiny_world.prompt_attributes(p, rng)[0]][0] for p in prompts])
    other = palettes.roll(4, 0)  # the next prompt's palette
    differ = (palettes != other).any(1)
    assert differ.sum() >= 12  # most neighbours have different palettes
    own, near = (border - palettes).norm(dim=1), (border - other).norm(dim=1)
    assert (own < near)[differ].float().mean() > 0.8
