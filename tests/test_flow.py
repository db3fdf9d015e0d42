"""Flow-GRPO's policy through the whole project: SD3-style pipelines through --model, the SDE step in the rollout
and in rescoring, every estimator, DPOK's KL, LoRA and full fine-tuning, mixed precision, resume, export and
evaluate.py, each on a small random StableDiffusion3Pipeline the tests build and save (no hub download).

The references are diffusers' own: StableDiffusion3Pipeline's sampling loop (the flow's ODE, which the SDE becomes
as a → 0), its transformer called directly, FlowMatchEulerDiscreteScheduler's training sigmas in closed form, and
StableDiffusion3Pipeline.load_lora_weights.
"""
import json
import math
from pathlib import Path

import pytest
import torch

import ddpo
from conftest import rescoring_rounding_bound
import evaluate
import export
from world import drawing, tiny_world


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    """An SD3-shaped pipeline with random weights: 16x16 images, 4x8x8 latents, two CLIPs, no T5, shift 3."""
    torch.manual_seed(0)
    return tiny_world.save_sd3_style_pipeline(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="module")
def sd3(sd3_dir):
    return ddpo.load_models(str(sd3_dir), "cpu")


@pytest.fixture(scope="module")
def sd3_t5_dir(sd3_dir, tmp_path_factory):
    """sd3_dir's pipeline with SD3's third text encoder, as SD3.5-M's folder has one: a random T5EncoderModel of width
    joint_attention_dim 32 (2 layers, 4 heads) and a T5Tokenizer whose Unigram vocabulary is the prompts' words,
    built here (no hub), the whole pipeline saved with save_pretrained."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None)
    words = sorted({w for p in tiny_world.all_prompts() for w in p.lower().split()})
    tokenizer = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words],
                            extra_ids=0)  # T5's ids: <pad> 0, </s> 1, <unk> 2; "▁" marks a word's start, as in T5's own
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=pipe.transformer.config.joint_attention_dim, d_kv=8,
                                 d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    folder = tmp_path_factory.mktemp("sd3-t5") / "tiny-sd3-t5"
    StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": t5, "tokenizer_3": tokenizer}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd3_t5(sd3_t5_dir):
    return ddpo.load_models(str(sd3_t5_dir), "cpu")


T5_TOKENS = 128  # Flow-GRPO's max_sequence_length for SD3.5-M's T5, the length ddpo.encode_prompts documents
CLIP_TOKENS = 16  # the tiny CLIP tokenizers' model_max_length (SD3's own: 77)


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


@pytest.mark.parametrize("t5", [False, True], ids=["two CLIPs", "two CLIPs and T5"])
def test_encode_prompts_is_sd3s_encode_prompt_with_128_t5_tokens_when_there_is_a_t5(sd3_dir, sd3_t5_dir, t5):
    """c is StableDiffusion3Pipeline.encode_prompt's, on the folder as diffusers itself loads it, at
    max_sequence_length 128 with a T5 and 0 without; laid out as diffusers' SD3 lays it out: the two CLIPs'
    penultimate hidden states side by side (16 rows), then with a T5 its last hidden state of the prompt padded to 128
    tokens (128 rows); pooled: the two CLIPs' projections side by side. A word past CLIP's 16 tokens changes c only
    through T5. T5 is frozen like the CLIPs."""
    from diffusers import StableDiffusion3Pipeline

    folder = sd3_t5_dir if t5 else sd3_dir
    models = ddpo.load_models(str(folder), "cpu")
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **({} if t5 else {"text_encoder_3": None, "tokenizer_3": None}))
    assert (pipe.text_encoder_3 is not None) == t5 == (models.pipeline.text_encoder_3 is not None)
    prompts = ["a cat", "a dog riding a bike"]
    c = ddpo.encode_prompts(models, prompts)
    assert c["encoder_hidden_states"].shape == (2, CLIP_TOKENS + T5_TOKENS * t5, 32)
    # the same modules on the same token ids: the same computation, so equal to the last bit
    with torch.no_grad():
        states, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=T5_TOKENS if t5 else 0)
        clips = [encoder(tokenizer(prompts, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                                   return_tensors="pt").input_ids, output_hidden_states=True)
                 for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))]
        rows = [torch.cat([out.hidden_states[-2] for out in clips], -1)]  # (B, 16, 16 + 16): no zero padding to 32
        if t5:
            ids = pipe.tokenizer_3(prompts, padding="max_length", max_length=T5_TOKENS, truncation=True,
                                   return_tensors="pt").input_ids
            assert (ids[:, :2] > 2).all() and ids[0, 2] == pipe.tokenizer_3.eos_token_id  # the words, not <unk>
            rows.append(pipe.text_encoder_3(ids)[0])  # (B, 128, 32)
    assert torch.equal(c["encoder_hidden_states"], states) and torch.equal(c["pooled_projections"], pooled)
    assert torch.equal(c["encoder_hidden_states"], torch.cat(rows, 1))
    assert torch.equal(c["pooled_projections"], torch.cat([out.text_embeds for out in clips], -1))
    head = " ".join(["a cat"] * 7)  # 14 words: with its BOS and EOS all CLIP's 16 tokens hold
    a, b = (ddpo.encode_prompts(models, [f"{head} {last}"]) for last in ("cat", "dog"))
    assert torch.equal(a["encoder_hidden_states"][:, :CLIP_TOKENS], b["encoder_hidden_states"][:, :CLIP_TOKENS])
    assert torch.equal(a["pooled_projections"], b["pooled_projections"])
    assert torch.equal(a["encoder_hidden_states"], b["encoder_hidden_states"]) != t5
    frozen = [models.text_encoder, models.pipeline.text_encoder_2, models.pipeline.text_encoder_3][:2 + t5]
    assert not any(p.requires_grad for module in frozen for p in module.parameters())


@pytest.mark.parametrize("t5, guidance", [(False, 1.0), (False, 4.5), (True, 4.5)],
                         ids=["two CLIPs-1.0", "two CLIPs-4.5", "two CLIPs and T5-4.5"])
def test_the_rollout_becomes_the_pipelines_own_sampler_as_the_noise_level_goes_to_zero(request, t5, guidance):
    """At a → 0 the SDE is the flow's ODE: the rollout from the same x_T ends where StableDiffusion3Pipeline's own
    loop (FlowMatchEulerDiscreteScheduler.step, its own CFG and encode_prompt, with a T5 at 128 tokens) ends, and
    decodes to its images (the VAE's scaling and shift factors); at Flow-GRPO's a = 0.7 it does not."""
    sd3 = request.getfixturevalue("sd3_t5" if t5 else "sd3")
    assert (sd3.pipeline.text_encoder_3 is not None) == t5
    prompts = ["a cat", "a dog riding a bike"]
    x_T = torch.stack([torch.randn((4, 8, 8), generator=g) for g in ddpo.noise_generators(0, range(2))])
    with torch.no_grad():
        run = dict(height=16, width=16, num_inference_steps=4, guidance_scale=guidance, latents=x_T,
                   max_sequence_length=T5_TOKENS if t5 else 0)
        expected = sd3.pipeline(prompts, output_type="latent", **run).images
        images = sd3.pipeline(prompts, output_type="pt", **run).images
    ends = {}
    for a in (1e-6, 0.7):
        args = ddpo.parse_args(["--model", "unused", "--num-steps", "4", "--guidance-scale", str(guidance),
                                "--noise-level", str(a)])
        traj = ddpo.rollout(sd3, prompts, args, ddpo.noise_generators(0, range(2)))
        assert torch.equal(traj.states[:, 0], x_T)
        ends[a] = traj.states[:, -1]
    # a = 1e-6 still adds noise: a·Σ_j √(t_j / (1 − t_j))·√|Δt_j| = 3.2e-6 (these 4 sigmas) times |z| ≤ 5, carried
    # through the later steps' v_θ (measured: 5.3e-6 at the end, 10x that at a = 1e-5: linear in a, amplification
    # ≈ 1.7 over the 3.2e-6), plus float32 rounding of latents |x| ≤ 4 over 4 steps (4·4·1.2e-7 ≈ 2e-6): < 4e-5 in
    # all, under atol 1e-4; the decoder shrinks it (images: 0.6x). A wrong step or c moves the end by > 0.1 (a = 0.7).
    torch.testing.assert_close(ends[1e-6], expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(ddpo.decode(sd3, ends[1e-6]), images, rtol=0, atol=1e-4)
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
    # as in the test above: a = 1e-6 adds a·Σ_j √(t_j / (1 − t_j))·√|Δt_j| = 2.5e-6 (these 3 sigmas) times |z| ≤ 5,
    # carried through the later steps (≈ 1.7x), plus float32 rounding of |x| ≤ 4 over 3 steps (1.5e-6): < 3e-5
    torch.testing.assert_close(traj.states[:, -1], expected, rtol=0, atol=1e-4)


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
    and closed forms) on the guided velocity of the transformer called directly; the log-prob is Normal's, per dim.
    The transformer runs as in the rollout, ∅ and c in one batch: the same computation, so the actions are equal."""
    args = ddpo.parse_args(["--model", "unused", "--num-steps", "4", "--guidance-scale", "3"])
    prompts = ["a cat", "a cow"]
    traj = ddpo.rollout(sd3, prompts, args, ddpo.noise_generators(3, range(2)))
    gens = ddpo.noise_generators(3, range(2))
    draws = [torch.stack([torch.randn((4, 8, 8), generator=g) for g in gens]) for _ in range(5)]  # x_T, then each step's
    cond, uncond = ddpo.encode_prompts(sd3, prompts), ddpo.repeat(ddpo.encode_prompts(sd3, [""]), 2)  # ∅ encoded once
    with torch.no_grad():
        for j, t in enumerate(traj.timesteps):
            x_t = traj.states[:, j]
            both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
            v = sd3.denoiser(hidden_states=torch.cat([x_t, x_t]), timestep=t.expand(4), **both).sample.chunk(2)
            mean, std = ddpo.flow_sde_step(sd3.scheduler, v[0] + 3.0 * (v[1] - v[0]), x_t, t.expand(2), 0.7)
            assert torch.equal(traj.states[:, j + 1], mean + std * draws[j + 1])
            normal = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(traj.states[:, j + 1]).mean((1, 2, 3))
            # Normal's own formula rounds apart: terms ≤ z²/2 + |log std| + 0.92 ≤ 12.5 + 5.1 + 0.92 (|z| ≤ 5, std ≥
            # 0.006) each within 3 ulp (≤ 3·9.5e-7), and each mean over 256 within log2(256)·1.2e-7·|mean| (≤ 5e-6):
            # < 1.3e-5 apart, under atol 1e-4
            torch.testing.assert_close(traj.log_probs[:, j], normal, rtol=0, atol=1e-4)


@pytest.mark.parametrize("lora_rank, precision", [("0", "no"), ("4", "no"), ("4", "bf16"), ("4", "fp16")])
def test_rescoring_unchanged_weights_gives_ratio_one_on_the_flow_policy(sd3_dir, lora_rank, precision):
    models = ddpo.load_models(str(sd3_dir), "cpu", lora_rank=int(lora_rank), mixed_precision=precision)
    args = ddpo.parse_args(["--model", str(sd3_dir), "--num-steps", "3", "--mixed-precision", precision,
                            "--lora-rank", lora_rank, "--noise-level", "0.5"])
    traj = ddpo.rollout(models, ["cat", "dog", "cow", "pig"], args, ddpo.noise_generators(1, range(4)))
    uncond = ddpo.encode_prompts(models, [""])
    with torch.no_grad():
        for j in range(3):
            # the rollout's own batch: the same computation, so ratio exactly 1 in every precision
            log_prob = ddpo.rescore(models, traj, torch.arange(4), torch.full((4,), j), uncond, args)[0]
            assert torch.equal(log_prob, traj.log_probs[:, j])
            if precision != "no":  # in bf16/fp16 another batch's kernels may round v by 2^-8 relative: no useful bound
                continue
            for rows in (torch.tensor([1, 3]), torch.tensor([2])):
                log_prob = ddpo.rescore(models, traj, rows, torch.full((len(rows),), j), uncond, args)[0]
                # another batch size rounds the transformer's v otherwise: the bound derived for either policy from
                # that measured difference, the SDE step's slope in v and the step's std (conftest.py)
                bound = rescoring_rounding_bound(models, traj, rows, j, uncond, args)
                assert ((log_prob - traj.log_probs[rows, j]).abs() <= bound).all(), (j, rows, log_prob, bound)


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
        # σ in closed form is the scheduler's to the last bit (the same float32 operations on (1000 − t) / 1000) and
        # x_t the same two products and one sum: the same computation, so the same loss to the last bit
        assert torch.equal(ddpo.flow_matching_loss(sd3, x0, cond, t, noise), expected)


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
    # the adapter switched off runs the base layers alone on the same weights: the base model's computation, so its
    # mean to the last bit, and the closed form on equal operands is equal too
    assert torch.equal(std, base_std)
    assert (kl > 0).all()
    expected = ((mean - base_mean) ** 2 / (2 * std**2)).mean((1, 2, 3))
    assert torch.equal(kl, expected)


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
    assert (not torch.equal(tuned, base)) == updated  # unchanged weights: the same computation, equal to the last bit


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


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_t5s_fp32_modules_stay_fp32_under_mixed_precision(sd3_t5_dir, precision):
    """T5's feed-forward output projections ("wo", T5EncoderModel._keep_in_fp32_modules) overflow in fp16, so
    transformers loads them in fp32 when asked for fp16 (not for bf16); load_models does the same when it casts the
    frozen encoders to the run's precision, and T5's output is that of the T5 transformers loads in that dtype."""
    from transformers import T5EncoderModel

    models = ddpo.load_models(str(sd3_t5_dir), "cpu", mixed_precision=precision)
    t5 = models.pipeline.text_encoder_3
    dtypes = {name: p.dtype for name, p in t5.named_parameters()}
    wo = torch.float32 if precision == "fp16" else torch.bfloat16
    assert {d for n, d in dtypes.items() if ".wo." in n} == {wo}
    assert {d for n, d in dtypes.items() if ".wo." not in n} == {ddpo.PRECISIONS[precision]}
    reference = T5EncoderModel.from_pretrained(sd3_t5_dir / "text_encoder_3", torch_dtype=ddpo.PRECISIONS[precision])
    assert {n: p.dtype for n, p in reference.named_parameters()} == dtypes
    ids = models.pipeline.tokenizer_3(["a cat riding a bike"], padding="max_length", max_length=8, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(t5(ids)[0], reference(ids)[0])  # the same weights in the same dtypes: the same bits


def test_a_flow_run_on_an_sd3_pipeline_with_t5_trains_with_the_kl_and_resumes_exactly(sd3_t5_dir, tmp_path):
    """SD3.5-M's layout (two CLIPs and T5) through --model FOLDER: DDPO_IS with DPOK's KL under LoRA trains its
    transformer (KL > 0 once the adapter has moved), and a run stopped after epoch 1 and resumed gives the metrics of
    one run straight through 2 epochs."""
    common = flow_argv(sd3_t5_dir, tmp_path, "x", "--algo", "is", "--kl-coef", "0.1", "--lora-rank", "4", "--lr", "1e-2",
                       "--seed", "5", "--save-every", "1")[:-2]
    ddpo.main([*common, "--epochs", "2", "--run-name", "straight"])
    ddpo.main([*common, "--epochs", "1", "--run-name", "halves"])
    ddpo.main(["--resume", str(tmp_path / "halves"), "--epochs", "2"])
    straight = metrics(tmp_path / "straight")
    assert without_times(straight) == without_times(metrics(tmp_path / "halves"))
    trained = [row for row in straight if "losses/kl" in row]  # (epoch 0's row is the evaluation before training)
    assert [row["epoch"] for row in trained] == [1, 2] and all(row["losses/kl"] > 0 for row in trained)
    tuned = ddpo.load_models(str(tmp_path / "straight"), "cpu")
    assert tuned.pipeline.text_encoder_3 is not None
    assert not torch.equal(transformer_outputs(tuned.denoiser),
                           transformer_outputs(ddpo.load_models(str(sd3_t5_dir), "cpu").denoiser))


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
    assert not torch.equal(ours, base)  # the run did change the transformer
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
    # the same weights in the same layers (diffusers' LoRA loading builds PEFT's LoRA layers, as ddpo.py's adapter
    # is): the same computation, so equal to the last bit
    assert torch.equal(transformer_outputs(pipe.transformer), ours)


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
    args = ddpo.parse_args([f"@{Path(ddpo.__file__).parent / 'configs' / 'sd35m_pickscore.txt'}", "--device", "cpu"])
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
    palettes = torch.tensor([drawing.PALETTES[drawing.prompt_attributes(p, rng)[0]][0] for p in prompts])
    other = palettes.roll(4, 0)  # the next prompt's palette
    differ = (palettes != other).any(1)
    assert differ.sum() >= 12  # most neighbours have different palettes
    own, near = (border - palettes).norm(dim=1), (border - other).norm(dim=1)
    assert (own < near)[differ].float().mean() > 0.8
