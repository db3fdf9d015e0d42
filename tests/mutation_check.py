"""Tests are tested: each plausible wrong version of a formula or of the bookkeeping must fail a test.

First the named tests must all pass on an unchanged copy of the project (else nothing below means anything).
Then, for every mutant below, a copy gets that one change, and the tests named beside it must fail (pytest
exit code 1); with --jobs 2, two copies take a mutant each at a time. A mutant that passes them is a hole in the
suite: the check exits non-zero and names it. The right code must occur exactly once, so a mutant whose code has
since changed is reported, not ignored.

    python tests/mutation_check.py            # all mutants, two at a time (one thread each), on 2 CPU cores
    python tests/mutation_check.py rwr ratio  # only mutants whose name contains one of these words
    python tests/mutation_check.py --jobs 1   # one at a time
    python tests/mutation_check.py --list
    python tests/mutation_check.py --flags    # only the generated ones: every ddpo.Args field read as its default
    python tests/mutation_check.py --no-flags # only the hand-written MUTANTS (flag_mutants.py says more)
    python tests/mutation_check.py --passed LOG   # LOG: a passing whole-suite run with --durations=0 (.ci/run's) stands
                                            # for the baseline

Each mutant's tests run fastest first (their times from the baseline; tests of refusals last), so that pytest -x
stops early, in a fork of this process once it has imported the libraries the tests use (--fresh: in a new
interpreter each). A mutant's tests may take 4 times their passing time and 2 minutes more; one that runs out of time
is run once more, then reported with the stacks of the test that hung.

Every new formula adds its wrong versions here.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]  # the repository (this file is in its tests/)
D, E = "test_ddpo.py::", "course/test_exercises.py::"
P, R, T = "tests/test_paper_setup.py::", "tests/test_rewards.py::", "tests/test_distributed.py::"
F, EF, B = "tests/test_flow.py::", "tests/test_entry_files.py::", "tests/test_bookkeeping.py::"
J, A = "tests/test_judges.py::", "tests/test_activities.py::"

# (name, file, the right code, the wrong version, the tests that must catch it)
MUTANTS = [
    # §3.1: the policy step and its log-probability
    ("DDIM sigma_t without eta", "ddpo.py", "sigma_t = eta * ((1", "sigma_t = ((1", [D + "test_ddim_step_equals_diffusers"]),
    ("DDIM mean drops sigma_t^2 from the direction", "ddpo.py", "(1 - alpha_bar_prev - sigma_t**2).sqrt() * eps",
     "(1 - alpha_bar_prev).sqrt() * eps", [D + "test_ddim_step_equals_diffusers"]),
    ("@file lines read whole, comments and all", "plumbing/command_line.py", 'return line.split("#", 1)[0].split()',
     "return [line] if line.strip() else []", [D + "test_the_papers_config_files_give_the_papers_settings"]),
    ("a sample batch larger than the round refused", "plumbing/command_line.py",
     "args.sample_batch_size if args.sample_batch_size < args.samples_per_epoch // world else 1", "args.sample_batch_size",
     [D + "test_a_sample_batch_larger_than_the_round_is_one_batch_and_a_smaller_one_must_divide_it"]),
    ("guidance around the conditional prediction", "ddpo.py",
     "pred = pred_uncond + guidance_scale", "pred = pred_cond + guidance_scale",
     [D + "test_guidance_scale_combines_the_two_predictions",
      F + "test_the_rollout_becomes_the_pipelines_own_sampler_as_the_noise_level_goes_to_zero"]),
    ("log-prob summed over dimensions", "ddpo.py", "return log_prob.mean(dim=tuple(range(1, x_prev.ndim)))",
     "return log_prob.sum(dim=tuple(range(1, x_prev.ndim)))", [D + "test_log_prob_equals_torch_normal"]),
    ("log-prob with sigma instead of sigma^2", "ddpo.py", "-((x_prev - mean) ** 2) / (2 * sigma_t**2)",
     "-((x_prev - mean) ** 2) / (2 * sigma_t)",
     [D + "test_log_prob_equals_torch_normal"]),
    ("eta above 1 accepted", "plumbing/command_line.py", '"eta": (0 < args.eta <= 1,', '"eta": (0 < args.eta,',
     [D + "test_out_of_range_and_non_finite_flags_are_refused_by_name"]),
    ("rescore takes uncond rows as they come", "ddpo.py", "repeat(uncond, len(rows)),", "pick(uncond, slice(0, len(rows))),",
     [D + "test_rescoring_unchanged_weights_gives_ratio_one"]),
    # App. D.3: advantages
    ("compute_advantages ignores the per-prompt tracker", "ddpo.py", 'if args.advantage == "per-prompt":', "if False:",
     [D + "test_per_prompt_advantages_use_each_prompts_own_rewards"]),
    ("a prompt drawn twice keeps only its last group (the buffer cut to buffer_size)", "ddpo.py",
     "buffer[:] = (buffer[-(self.buffer_size - len(new)):] if len(new) < self.buffer_size else []) + new",
     "buffer[:] = (buffer + new)[-self.buffer_size:]",
     [D + "test_a_prompt_drawn_twice_in_a_round_is_normalised_by_all_of_its_rewards",
      E + "test_exercise_3_a_prompt_drawn_twice_keeps_all_its_rewards_of_the_round"]),
    ("group sampling normalises by the batch, not the group", "ddpo.py",
     "stats = rewards[of_prompt] if self.group_size > 1 else rewards", "stats = rewards",
     [D + "test_group_sampling_normalises_each_prompt_by_its_own_group"]),
    ("group sampling draws k different prompts", "ddpo.py",
     "prompts = [c for c in rng.choices(prompt_set, k=args.samples_per_epoch // k) for _ in range(k)]",
     "prompts = rng.choices(prompt_set, k=args.samples_per_epoch)",
     [D + "test_group_sampling_draws_k_samples_of_each_prompt_with_distinct_noise"]),
    ("batch advantages not divided by the std", "ddpo.py",
     "(rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6), 0.0", "(rewards - rewards.mean()), 0.0",
     [D + "test_advantages_batch_mode_and_clipping"]),
    ("advantages not clipped", "ddpo.py", "return advantages.clamp(-args.adv_clip, args.adv_clip), own",
     "return advantages, own", [D + "test_advantages_batch_mode_and_clipping"]),
    # §4.3: the estimators
    ("DDPO_SF loss with the wrong sign", "ddpo.py", "return -(advantages * log_prob).mean()",
     "return (advantages * log_prob).mean()", [D + "test_score_function_gradient_is_unbiased_on_a_toy_problem"]),
    ("DDPO_IS clip on the wrong side (min)", "ddpo.py", "torch.max(pg_loss1, pg_loss2)", "torch.min(pg_loss1, pg_loss2)",
     [D + "test_clipped_loss_matches_hand_computed"]),
    ("DDPO_IS old log-prob from the current policy", "ddpo.py", "ddpo_is_loss(log_prob, traj.log_probs[r, j], adv,",
     "ddpo_is_loss(log_prob, log_prob.detach(), adv,", [D + "test_ddpo_is_ratio_is_one_at_the_first_step_then_moves_and_clips"]),
    ("approx_kl as half the squared mean logratio", "ddpo.py", "approx_kl = 0.5 * (logratio**2).mean()",
     "approx_kl = 0.5 * logratio.mean() ** 2", [D + "test_approx_kl_and_clipfrac_over_several_samples"]),
    ("clipfrac summed instead of averaged", "ddpo.py", "clipfrac = ((ratio - 1).abs() > clip_range).float().mean()",
     "clipfrac = ((ratio - 1).abs() > clip_range).float().sum()", [D + "test_approx_kl_and_clipfrac_over_several_samples"]),
    ("DDPO_SF takes several optimizer steps per round", "ddpo.py", '(1, 1) if args.algo == "sf" else',
     '(args.num_minibatches, args.inner_epochs) if args.algo == "sf" else',
     [D + "test_batch_arithmetic_flags_decide_the_forward_passes"]),
    ("DDPO_IS takes one step a round by default (= DDPO_SF)", "ddpo.py", "num_minibatches: int = arg(2,",
     "num_minibatches: int = arg(1,", [D + "test_ddpo_is_and_sf_take_different_updates_at_the_defaults"]),
    ("trained timesteps rounded, not truncated", "ddpo.py", "max(1, int(args.timestep_fraction * T))",
     "max(1, round(args.timestep_fraction * T))", [D + "test_trained_timesteps_truncate_like_the_pytorch_port"]),
    ("chunks of a minibatch not weighted by their share", "ddpo.py", "share = len(chunk) / len(minibatch)", "share = 1.0",
     [P + "test_a_minibatch_in_chunks_of_train_batch_size_gives_the_same_update"]),
    ("fp16 gradients clipped before unscaling", "ddpo.py", "scaler.unscale_(optimizer)  #", "pass  #",
     [P + "test_fp16_loss_scaling_gives_the_unscaled_update"]),
    # §4.2: RWR
    ("RWR exponential weights not normalised", "ddpo.py", "torch.softmax(beta * x, dim=0) * len(x)",
     "torch.exp(beta * x)", [D + "test_rwr_exponential_weights_are_the_papers_formula_by_hand"]),
    ("RWR weights from the other quantity", "ddpo.py", 'rewards if args.rwr_weights == "reward" else advantages',
     'advantages if args.rwr_weights == "reward" else rewards', [D + "test_rwr_weights_exponentiate_the_configured_quantity"]),
    ("sparse RWR's default C at the 10th percentile", "ddpo.py", "torch.quantile(rewards, 0.9)",
     "torch.quantile(rewards, 0.1)", [D + "test_sparse_rwr_keeps_rewards_at_or_above_c_by_default_the_top_tenth"]),
    ("sparse RWR steps AdamW on an empty minibatch", "ddpo.py",
     'if args.algo == "rwr-sparse" and not weights[minibatch].any():', "if False:",
     [D + "test_sparse_rwr_takes_no_step_when_no_sample_reaches_c"]),
    ("RWR regresses on x_T instead of x_0", "ddpo.py", "rwr_loss(models, traj.states[rows, -1]",
     "rwr_loss(models, traj.states[rows, 0]", [D + "test_rwr_regresses_on_the_final_sample_x0"]),
    # DPOK: the KL to the pretrained model and the learned value baseline
    ("DPOK KL with sigma instead of sigma^2", "ddpo.py", "** 2 / (2 * sigma_t**2)", "** 2 / (2 * sigma_t)",
     [D + "test_gaussian_kl_equals_torch_kl_divergence_and_a_hand_computed_number"]),
    ("DPOK KL summed over dimensions", "ddpo.py", "return kl.mean(dim=tuple(range(1, mean.ndim)))",
     "return kl.sum(dim=tuple(range(1, mean.ndim)))", [D + "test_gaussian_kl_equals_torch_kl_divergence_and_a_hand_computed_number"]),
    ("DPOK KL penalty with the wrong sign", "ddpo.py", "loss = loss + args.kl_coef * kl.mean()",
     "loss = loss - args.kl_coef * kl.mean()",
     [D + "test_kl_is_zero_at_the_pretrained_model_and_its_gradient_pulls_back_towards_it"]),
    ("DPOK KL between the current model and itself", "ddpo.py", "gaussian_kl(mean, pretrained_mean(models, *policy_args), sigma_t)",
     "gaussian_kl(mean, policy(models, *policy_args)[0], sigma_t)",
     [D + "test_kl_is_zero_at_the_pretrained_model_and_its_gradient_pulls_back_towards_it",
      P + "test_dpok_kl_under_lora_is_to_the_base_model_loaded_on_its_own"]),
    ("DPOK pi_pre with the LoRA adapter left on", "ddpo.py", "    models.denoiser.disable_adapters()\n    try:",
     "    try:", [P + "test_dpok_kl_under_lora_is_to_the_base_model_loaded_on_its_own"]),
    ("DPOK pi_pre is the trained UNet itself, not a frozen copy", "ddpo.py",
     "models.reference = copy.deepcopy(models.denoiser).requires_grad_(False)", "models.reference = models.denoiser",
     [P + "test_resume_gives_the_same_metrics_as_training_straight[tiny-dpok]"]),
    ("DPOK pi_pre taken from the resumed checkpoint", "plumbing/checkpoints.py", "        if value:  # DPOK's V_φ and its optimizer\n",
     "        models.reference = models.reference and __import__('copy').deepcopy(models.denoiser)\n        if value:\n",
     [P + "test_resume_gives_the_same_metrics_as_training_straight[tiny-dpok]"]),
    ("value baseline leaks the sample's own reward (fitted first)", "ddpo.py",
     "                advantages, extra = value_advantages(baseline[0], traj, r, args)\n"
     "                fit_value(*baseline, traj, r, args)\n",
     "                fit_value(*baseline, traj, r, args)\n"
     "                advantages, extra = value_advantages(baseline[0], traj, r, args)\n",
     [D + "test_value_advantages_use_the_value_function_from_before_the_round"]),
    ("value baseline of step 0 for every step", "ddpo.py", "torch.cat([value_at(value, traj, j, rows) for rows in batches])",
     "torch.cat([value_at(value, traj, 0, rows) for rows in batches])",
     [D + "test_value_advantages_are_per_step_and_normalised"]),
    ("value function starts at random outputs", "ddpo.py", "        torch.nn.init.zeros_(self.head[-1].weight)", "        pass",
     [D + "test_value_advantages_are_per_step_and_normalised"]),
    ("value advantages not normalised", "ddpo.py", "advantages = (delta - delta.mean()) / (delta.std(unbiased=False) + 1e-6)",
     "advantages = delta", [D + "test_value_advantages_are_per_step_and_normalised"]),
    ("value function fitted to the wrong sign of the reward", "ddpo.py", "((value_at(value, traj, j) - my_share(rewards)).pow(2)",
     "((value_at(value, traj, j) + my_share(rewards)).pow(2)", [D + "test_value_baseline_lowers_the_gradient_variance_and_keeps_its_mean"]),
    ("value function not restored on resume", "plumbing/checkpoints.py", 'value[0].load_state_dict(state["value"])', "pass",
     [P + "test_resume_gives_the_same_metrics_as_training_straight[tiny-dpok]"]),
    ("value optimizer not restored on resume", "plumbing/checkpoints.py", 'value[1].load_state_dict(state["value_optimizer"])', "pass",
     [P + "test_resume_gives_the_same_metrics_as_training_straight[tiny-dpok]"]),
    ("ImageReward ViT norm1 and norm2 swapped", "rewards.py", '(".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2.")',
     '(".norm1.", ".layer_norm2."), (".norm2.", ".layer_norm1.")', [R + "test_imagereward_loads_the_published_format_and_equals_blip_written_out"]),
    ("ImageReward ViT with 32-wide heads", "rewards.py", "num_attention_heads=width // 64", "num_attention_heads=width // 32",
     [R + "test_imagereward_loads_the_published_format_and_equals_blip_written_out"]),
    ("ImageReward not standardised", "rewards.py", "- self.MEAN) / self.STD)", "))", [R + "test_imagereward_loads_the_published_format_and_equals_blip_written_out"]),
    ("ImageReward scores the last token, not [CLS]", "rewards.py", "hidden.last_hidden_state[:, 0]",
     "hidden.last_hidden_state[:, -1]", [R + "test_imagereward_loads_the_published_format_and_equals_blip_written_out"]),
    # the model and the reward leave and enter the project
    ("LoRA export in peft's key names, not diffusers'", "export.py",
     "unet_lora_layers=convert_state_dict_to_diffusers(layers)", "unet_lora_layers=layers",
     [P + "test_export_loads_in_diffusers_pipelines_with_the_runs_unet[tiny-4]"]),
    ("LoRA export without the adapter's metadata", "export.py",
     'unet_lora_adapter_metadata=metadata)', "unet_lora_adapter_metadata=None)",
     [P + "test_export_loads_in_diffusers_pipelines_with_the_runs_unet[tiny-4]"]),
    ("export writes the base model, not the run's", "export.py", 'models = ddpo.load_models(run_dir, "cpu")',
     'models = ddpo.load_models(run.model, "cpu", run.lora_rank)',
     [P + "test_export_loads_in_diffusers_pipelines_with_the_runs_unet[tiny-4]",
      P + "test_export_loads_in_diffusers_pipelines_with_the_runs_unet[tiny-0]"]),
    ("reward import path ignores the current folder", "rewards.py", "sys.path.append(os.getcwd())", "pass",
     [D + "test_a_reward_by_import_path_trains_resumes_and_evaluates"]),
    ("a run made with an imported reward cannot resume", "plumbing/command_line.py",
     ' and not (name == "reward" and known_reward(args.reward))', "",
     [D + "test_a_reward_by_import_path_trains_resumes_and_evaluates"]),
    ("train() runs an Args made in Python unchecked", "ddpo.py", "    run = Run(start_processes(complete(args, round_plan)))", "    run = Run(start_processes(args))",
     [D + "test_train_takes_args_made_in_python_and_a_reward_callable"]),
    ("a model folder's damaged .bin weights not looked at (the error blames the layout)", "plumbing/model_checks.py",
     ' + sorted(Path(name).glob("*/*.bin"))', "",
     [D + "test_a_model_folder_with_a_damaged_bin_weights_file_names_the_file"]),
    ("a model folder's damaged safetensors weights not looked at", "plumbing/model_checks.py",
     'sorted(Path(name).glob("*/*.safetensors")) + ', "",
     [D + "test_a_model_folder_with_a_damaged_weights_file_names_the_file"]),
    # non-finite numbers
    ("non-finite weights not checked", "ddpo.py",
     "    if not torch.stack([torch.isfinite(p).all() for p in params.values()]).all():",
     "    if False:", [D + "test_non_finite_weights_after_a_step_stop_the_round"]),
    ("non-finite latents not checked", "ddpo.py", "    if not finite.all():", "    if False:",
     [D + "test_non_finite_latents_stop_the_run_with_one_clean_line"]),
    # what a checkpoint restores, what a run's flags mean
    ("per-prompt reward buffers not saved", "plumbing/checkpoints.py", '"tracker": tracker.buffers,', '"tracker": {},',
     [P + "test_resume_gives_the_same_metrics_as_training_straight[tiny]"]),
    ("per-prompt reward buffers not restored", "plumbing/checkpoints.py", 'tracker.buffers = state["tracker"]', "tracker.buffers = {}",
     [P + "test_resume_gives_the_same_metrics_as_training_straight[tiny]"]),
    ("sampling generator not restored", "plumbing/checkpoints.py", 'generator.set_state(state["generator"])', "pass",
     [P + "test_resume_gives_the_same_metrics_as_training_straight[tiny]"]),
    ("fp16 loss scale not saved", "plumbing/checkpoints.py", '"scaler": scaler.state_dict() if scaler else {}', '"scaler": {}',
     [P + "test_resume_gives_the_same_metrics_as_training_straight[sd-fp16]"]),
    ("LoRA adapter initialised unseeded", "ddpo.py",
     "    torch.manual_seed(args.seed)  # before the models: a LoRA adapter's initial weights are drawn while loading\n"
     "    models = load_models(args.model, args.device, args.lora_rank, args.mixed_precision)\n",
     "    models = load_models(args.model, args.device, args.lora_rank, args.mixed_precision)\n"
     "    torch.manual_seed(args.seed)\n", [P + "test_lora_runs_follow_the_seed"]),
    ("--resume ignores a typed flag equal to its default", "plumbing/command_line.py",
     "**{k: getattr(args, k) for k in typed & set(RESUME_MAY_CHANGE)}",
     "**{k: getattr(args, k) for k in RESUME_MAY_CHANGE if getattr(args, k) != getattr(Args(), k)}",
     [D + "test_resume_takes_every_typed_flag_it_may_change_and_refuses_the_others"]),
    ("evaluate.py samples in fp32, not in the run's precision", "evaluate.py",
     "args.mixed_precision or run.mixed_precision", 'args.mixed_precision or "no"',
     [P + "test_eval_writes_side_by_side_grids_and_both_mean_rewards[4-bf16]"]),
    ("an unfinished epoch_N.tmp counted as a checkpoint", "plumbing/checkpoints.py", '.glob("epoch_[0-9][0-9][0-9][0-9]")',
     '.glob("epoch_*")', [P + "test_a_checkpointing_process_killed_with_sigkill_always_leaves_a_whole_checkpoint"]),
    ("Ctrl-C stops at once, without finishing the epoch or writing a checkpoint", "plumbing/processes.py",
     "        self.requested = True\n", "        raise KeyboardInterrupt\n",
     [P + "test_ctrl_c_finishes_the_epoch_writes_a_checkpoint_and_says_how_to_resume"]),
    ("SIGTERM not handled: the scheduler's kill loses the epochs since the last checkpoint", "plumbing/processes.py",
     'SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}', 'SIGNALS = {signal.SIGINT: "Ctrl-C"}',
     [P + "test_sigterm_finishes_the_epoch_writes_a_checkpoint_and_a_second_one_stops_at_once"]),
    ("the signal's line left in stdout's buffer: a kill after the grace period loses it", "plumbing/processes.py",
     "        sys.stdout.flush()  # into a scheduler's log now", "        pass  # into a scheduler's log now",
     [P + "test_sigterm_finishes_the_epoch_writes_a_checkpoint_and_a_second_one_stops_at_once"]),
    ("a run stopped at once before its first checkpoint names a checkpoint anyway", "plumbing/checkpoints.py",
     "is kept: resume with --resume {run_dir}\" if kept", "is kept: resume with --resume {run_dir}\" if True",
     [P + "test_a_run_stopped_at_once_before_its_first_checkpoint_says_there_is_nothing_to_resume"]),
    ("a second signal ignored: the run cannot be stopped at once", "plumbing/processes.py",
     "        if self.requested:\n            raise KeyboardInterrupt\n", "        if self.requested:\n            return\n",
     [P + "test_sigterm_finishes_the_epoch_writes_a_checkpoint_and_a_second_one_stops_at_once"]),
    ("a new run overwrites the run already in its folder", "plumbing/training_run.py",
     "if not args.resume and holds_run(self.dir):", "if False:",
     [P + "test_a_new_run_in_a_folder_that_holds_a_run_is_refused_and_the_run_is_kept"]),
    ("--resume refused as a run that exists", "plumbing/training_run.py",
     "if not args.resume and holds_run(self.dir):", "if holds_run(self.dir):",
     [P + "test_a_new_run_in_a_folder_that_holds_a_run_is_refused_and_the_run_is_kept"]),
    ("a damaged metrics.jsonl read as it is on resume", "plumbing/training_run.py", 'read_metrics(self.dir / "metrics.jsonl")',
     '[json.loads(line) for line in (self.dir / "metrics.jsonl").read_text().splitlines()]',
     [P + "test_resume_of_a_run_whose_metrics_are_damaged_is_one_line_naming_the_file_and_the_line"]),
    ("a reward that requires grad kept as it is", "rewards.py", "        r = r.detach()\n", "        pass\n",
     [D + "test_a_reward_that_requires_grad_is_detached_and_scored_as_its_values"]),
    ("a reward of strings taken to torch as it is", "rewards.py",
     "    except (TypeError, ValueError, RuntimeError) as e:  # strings, None, ragged lists, …",
     "    except ZeroDivisionError as e:",
     [D + "test_a_reward_whose_output_is_not_numbers_of_its_shape_is_one_line"]),
    ("a reward's extras that are not a dict taken as they are", "rewards.py",
     "    if isinstance(out, tuple) and (len(out) != 2 or not isinstance(out[1], dict)):",
     "    if isinstance(out, tuple) and len(out) != 2:",
     [D + "test_a_reward_whose_output_is_not_numbers_of_its_shape_is_one_line"]),
    ("a reward's extras of the wrong length taken as they are", "rewards.py",
     '        if n != len(prompts):', '        if n is None:',
     [D + "test_a_reward_whose_output_is_not_numbers_of_its_shape_is_one_line"]),
    ("a reward's extras kept as tensors (the grid's .json cannot hold them)", "rewards.py",
     '    extras = {k: v.tolist() if hasattr(v, "tolist") else [x.item() if hasattr(x, "item") else x for x in v]',
     '    extras = {k: v if hasattr(v, "tolist") else [x.item() if hasattr(x, "item") else x for x in v]',
     [D + "test_a_rewards_extras_go_into_the_grids_json_one_value_a_picture"]),
    ("a reward's extras: a list of tensor scalars kept as it is", "rewards.py",
     'else [x.item() if hasattr(x, "item") else x for x in v]', "else list(v)",
     [D + "test_a_rewards_extras_go_into_the_grids_json_one_value_a_picture"]),
    ("a reward's extra of one number (a 0-d tensor) taken as one a sample", "rewards.py",
     'hasattr(v, "__len__") and getattr(v, "ndim", 1) > 0 else None', 'hasattr(v, "__len__") else None',
     [D + "test_a_reward_whose_output_is_not_numbers_of_its_shape_is_one_line"]),
    ("--device cuda accepted on a machine without CUDA", "plumbing/command_line.py", "        if not torch.cuda.is_available():",
     "        if False:", [D + "test_bad_input_is_one_clear_line_and_nothing_is_written"]),
    ("--min-count above --buffer-size accepted", "plumbing/command_line.py",
     'if args.advantage == "per-prompt" and args.min_count > args.buffer_size:',
     'if args.advantage == "per-prompt" and args.min_count > args.buffer_size + 1000:',
     [D + "test_bad_input_is_one_clear_line_and_nothing_is_written"]),
    ("Ctrl-C's handler not given back after the run", "plumbing/processes.py", "            signal.signal(signum, previous)",
     "            pass", [P + "test_ctrl_c_finishes_the_epoch_writes_a_checkpoint_and_says_how_to_resume"]),
    # the tiny model's world and the latent path
    ("drawing.draw at a given strength skips the world's strength draw (another picture)", "world/drawing.py",
     "    s = world_strength(rng)\n    s = s if strength is None else strength\n",
     "    s = world_strength(rng) if strength is None else strength\n",
     [D + "test_draw_at_a_strength_is_the_same_picture_with_other_tiles"]),
    ("drawing.draw ignores the strength it is given", "world/drawing.py", "    s = s if strength is None else strength\n",
     "", [D + "test_draw_at_a_strength_is_the_same_picture_with_other_tiles"]),
    ("the world's strength spread applied twice", "world/drawing.py",
     "STRENGTH_MEDIAN * float(np.exp(STRENGTH_SPREAD * rng.standard_normal()))",
     "STRENGTH_MEDIAN * float(np.exp(2 * STRENGTH_SPREAD * rng.standard_normal()))",
     [D + "test_world_strengths_are_log_normal_around_the_median"]),
    ("--reward-range encodes without the VAE's scaling factor", "world/tiny_world.py",
     "z = models.vae.encode(x).latent_dist.mode() * models.vae.config.scaling_factor",
     "z = models.vae.encode(x).latent_dist.mode()", [D + "test_reward_range_sizes_images_as_the_reward_sees_them"]),
    ("--reward-range's last-step noise in the VAE's unscaled latent space", "world/tiny_world.py",
     "noisy = z + sigma * torch.randn(z.shape, generator=generator)",
     "noisy = z + sigma * models.vae.config.scaling_factor * torch.randn(z.shape, generator=generator)",
     [D + "test_reward_range_sizes_images_as_the_reward_sees_them"]),
    ("latents decoded without the VAE's scaling factor", "ddpo.py",
     "models.vae.decode(x0.to(models.vae.dtype) / config.scaling_factor + (config.shift_factor or 0)).sample",
     "models.vae.decode(x0.to(models.vae.dtype) + (config.shift_factor or 0)).sample",
     [D + "test_sampling_equals_stable_diffusion_pipeline_on_the_same_noise"]),
    ("latents decoded times the scaling factor", "ddpo.py",
     "models.vae.decode(x0.to(models.vae.dtype) / config.scaling_factor + (config.shift_factor or 0)).sample",
     "models.vae.decode(x0.to(models.vae.dtype) * config.scaling_factor + (config.shift_factor or 0)).sample",
     [D + "test_sampling_equals_stable_diffusion_pipeline_on_the_same_noise"]),
    ("the latent shape taken from the VAE's image size", "ddpo.py", " or models.denoiser.config.sample_size\n",
     " or models.vae.config.sample_size\n", [D + "test_sampling_equals_stable_diffusion_pipeline_on_the_same_noise"]),
    ("--resolution ignored: the latents always the model's own size", "ddpo.py",
     "    side = resolution // downsampling(models.vae.config) or models.denoiser.config.sample_size\n",
     "    side = models.denoiser.config.sample_size\n",
     [D + "test_resolution_samples_other_image_sizes_as_stable_diffusion_pipelines_height_and_width",
      F + "test_resolution_samples_smaller_images_as_the_pipelines_height_and_width"]),
    ("--resolution checked against the VAE's downsampling only, not SD3's patches", "plumbing/model_checks.py",
     "    unit = down * (config.patch_size if models.flow else 1)\n", "    unit = down\n",
     [F + "test_a_resolution_the_transformer_cannot_take_is_one_line"]),
    ("SD3's position embedding counted in latents, not patches", "plumbing/model_checks.py",
     "    if models.flow and resolution // unit > config.pos_embed_max_size:",
     "    if models.flow and resolution // down > config.pos_embed_max_size:",
     [F + "test_a_resolution_the_transformer_cannot_take_is_one_line"]),
    ("a negative --resolution let through", "plumbing/command_line.py", '"resolution": (args.resolution >= 0, "≥ 0")',
     '"resolution": (True, "≥ 0")', [D + "test_a_resolution_the_vae_cannot_give_is_one_line"]),
    ("the condition from the text encoder's pooled output", "ddpo.py",
     'return {"encoder_hidden_states": models.text_encoder(tok.input_ids.to(models.device))[0]}',
     'return {"encoder_hidden_states": models.text_encoder(tok.input_ids.to(models.device))[1][:, None].expand(-1, tok.input_ids.shape[1], -1)}',
     [D + "test_sampling_equals_stable_diffusion_pipeline_on_the_same_noise"]),
    ("VAE latent channels not checked against the UNet's input", "plumbing/model_checks.py",
     "    if vae.latent_channels != unet.in_channels:", "    if False:",
     [D + "test_components_that_do_not_fit_together_are_one_line_before_anything_is_written"]),
    ("the UNet's sample size checked against the VAE's image size itself", "plumbing/model_checks.py",
     "    if unet.sample_size * factor != vae.sample_size:", "    if unet.sample_size != vae.sample_size // factor // 2:",
     [D + "test_components_that_do_not_fit_together_are_one_line_before_anything_is_written"]),
    ("a pipeline without a VAE taken as pixel-space", "plumbing/model_folders.py",
     "        if missing := [c for c in COMPONENTS[kind] if c not in index or index[c][0] is None]:",
     "        if missing := [c for c in COMPONENTS[kind] if c not in index and c != \"vae\"]:",
     [D + "test_a_pipeline_without_a_vae_is_one_line_naming_what_is_missing"]),
    ("the rebuild's initial weights not seeded", "world/tiny_world.py",
     "    torch.manual_seed(seed)\n    rng = np.random.default_rng(seed)\n    generator = torch.Generator().manual_seed(seed)\n    vae =",
     "    rng = np.random.default_rng(seed)\n    generator = torch.Generator().manual_seed(seed)\n    vae =", [D + "test_the_rebuild_command_is_exact"]),
    # Flow-GRPO's policy through the project (the step itself: the flow_sde_step mutants above)
    ("the flow policy with DDIM's noise eta", "ddpo.py", "    return args.noise_level if models.flow else args.eta",
     "    return args.eta", [F + "test_the_rollout_becomes_the_pipelines_own_sampler_as_the_noise_level_goes_to_zero"]),
    ("an SD3 folder taken for a UNet one", "plumbing/model_folders.py", 'kind = "StableDiffusion3Pipeline" if "transformer" in index else',
     'kind = "StableDiffusionPipeline" if "transformer" in index else', [F + "test_an_sd3_folder_loads_with_its_own_classes_and_the_flow_policy"]),
    ("SD3's condition without its pooled embeddings", "ddpo.py", '"pooled_projections": pooled}',
     '"pooled_projections": torch.zeros_like(pooled)}',
     [F + "test_the_rollout_becomes_the_pipelines_own_sampler_as_the_noise_level_goes_to_zero"]),
    ("SD3 without T5 given T5 padding tokens", "ddpo.py", "t5 = 128 if models.pipeline.text_encoder_3 is not None else 0",
     "t5 = 128", [F + "test_the_rollout_becomes_the_pipelines_own_sampler_as_the_noise_level_goes_to_zero"]),
    ("SD3's VAE shift factor dropped", "ddpo.py", " / config.scaling_factor + (config.shift_factor or 0)).sample",
     " / config.scaling_factor).sample",
     [F + "test_the_rollout_becomes_the_pipelines_own_sampler_as_the_noise_level_goes_to_zero"]),
    ("flow RWR with the DDPM loss", "ddpo.py", "(flow_matching_loss if models.flow else ddpm_loss)", "ddpm_loss",
     [F + "test_each_estimator_trains_an_sd3_pipeline_and_the_tiny_flow_model[sd3-rwr-extra2]",
      F + "test_each_estimator_trains_an_sd3_pipeline_and_the_tiny_flow_model[tiny-flow-rwr-extra10]"]),
    ("flow-matching target x_0 - eps", "ddpo.py", "- (noise - x0).float()) ** 2", "- (x0 - noise).float()) ** 2",
     [F + "test_flow_matching_loss_is_the_velocity_error_at_the_schedulers_training_sigma"]),
    ("flow-matching loss at set_timesteps' sigmas", "ddpo.py",
     "schedule = type(models.scheduler).from_config(models.scheduler.config)", "schedule = models.scheduler",
     [F + "test_flow_matching_loss_is_the_velocity_error_at_the_schedulers_training_sigma"]),
    ("the KL on the flow policy against the current model", "ddpo.py",
     "return policy(dataclasses.replace(models, denoiser=models.reference), *policy_args)[0]", "return policy(models, *policy_args)[0]",
     [F + "test_resume_of_a_flow_run_gives_the_same_metrics_as_training_straight[full-dpok]"]),
    ("the KL on the flow policy with the adapter left on", "ddpo.py", "    models.denoiser.disable_adapters()\n    try:",
     "    try:", [F + "test_dpok_kl_on_the_flow_policy_is_to_the_base_model"]),
    ("LoRA on the flow transformer without its text stream", "ddpo.py",
     "target_modules=FLOW_LORA_TARGETS if models.flow else LORA_TARGETS", "target_modules=LORA_TARGETS",
     [F + "test_an_sd3_folder_loads_with_its_own_classes_and_the_flow_policy"]),
    ("a flow LoRA exported with the UNet's key prefix", "export.py",
     "StableDiffusion3Pipeline.save_lora_weights(tmp, transformer_lora_layers=layers,\n"
     "                                                           transformer_lora_adapter_metadata=metadata)",
     "StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)",
     [F + "test_export_of_a_flow_run_loads_in_stable_diffusion_3_pipelines_with_the_runs_transformer[4]"]),
    ("a fully fine-tuned flow model exported as the base", "export.py", "            models.pipeline.save_pretrained(tmp)",
     "            type(models.pipeline).from_pretrained(run.model, text_encoder_3=None, tokenizer_3=None).save_pretrained(tmp)",
     [F + "test_export_of_a_flow_run_loads_in_stable_diffusion_3_pipelines_with_the_runs_transformer[0]"]),
    ("a size-dependent flow shift let through", "plumbing/model_checks.py", '    if config.get("use_dynamic_shifting"):',
     "    if False:", [F + "test_a_flow_model_that_gives_no_density_or_does_not_fit_is_one_line[scheduler-changes0-use_dynamic_shifting=True takes its shift from the image size]"]),
    ("inverted flow sigmas let through", "plumbing/model_checks.py",
     "    if not (sigmas[:-1] > 0).all() or not (sigmas[:-1] <= 1).all() or not (sigmas[1:] < sigmas[:-1]).all() or",
     "    if False and not (sigmas[:-1] > 0).all() or False and not (sigmas[1:] < sigmas[:-1]).all() or False and", [F + "test_a_flow_model_that_gives_no_density_or_does_not_fit_is_one_line[scheduler-changes1-sigmas [0.0]"]),
    ("mismatched SD3 pooled embeddings let through", "plumbing/model_checks.py",
     "    if sum(c.projection_dim for c in clips) != net.pooled_projection_dim:", "    if False:",
     [F + "test_a_flow_model_that_gives_no_density_or_does_not_fit_is_one_line"]),
    ("flow noise level 0 let through", "plumbing/command_line.py", '"noise_level": (args.noise_level > 0, "> 0")',
     '"noise_level": (args.noise_level >= 0, "> 0")', [F + "test_a_noise_level_that_gives_no_density_is_one_line"]),
    # the course kit's graded tests (test_exercises.py) catch the usual wrong versions on their own
    ("exercise 1: sigma_t without eta", "ddpo.py", "sigma_t = eta * ((1", "sigma_t = ((1",
     [E + "test_exercise_1_sigma_is_the_noise_diffusers_adds"]),
    ("exercise 1: sigma_t squared (the variance)", "ddpo.py", "* (1 - alpha_bar / alpha_bar_prev).sqrt()\n",
     "* (1 - alpha_bar / alpha_bar_prev)\n", [E + "test_exercise_1_sigma_is_the_noise_diffusers_adds"]),
    ("exercise 1: the mean drops sigma_t^2 from the direction", "ddpo.py",
     "(1 - alpha_bar_prev - sigma_t**2).sqrt() * eps", "(1 - alpha_bar_prev).sqrt() * eps",
     [E + "test_exercise_1_mean_is_the_diffusers_step_without_its_noise"]),
    ("exercise 2: log-prob summed over dimensions", "ddpo.py", "return log_prob.mean(dim=tuple(range(1, x_prev.ndim)))",
     "return log_prob.sum(dim=tuple(range(1, x_prev.ndim)))",
     [E + "test_exercise_2_log_prob_is_the_gaussian_density_averaged_over_dimensions"]),
    ("exercise 2: sigma instead of sigma^2", "ddpo.py", "-((x_prev - mean) ** 2) / (2 * sigma_t**2)",
     "-((x_prev - mean) ** 2) / (2 * sigma_t)",
     [E + "test_exercise_2_log_prob_is_the_gaussian_density_averaged_over_dimensions"]),
    ("exercise 2: gradient into the action", "ddpo.py", "x_prev, mean = x_prev.detach().float(), mean.float()",
     "x_prev, mean = x_prev.float(), mean.float()", [E + "test_exercise_2_gradient_flows_into_the_mean_only"]),
    ("exercise 3: no division by the std", "ddpo.py",
     "advantages[of_prompt] = (rewards[of_prompt] - stats.mean()) / (stats.std() + 1e-6)",
     "advantages[of_prompt] = rewards[of_prompt] - stats.mean()", [E + "test_exercise_3_each_prompt_is_normalised_by_its_own_rewards"]),
    ("exercise 3: the buffer is never truncated", "ddpo.py",
     "buffer[:] = (buffer[-(self.buffer_size - len(new)):] if len(new) < self.buffer_size else []) + new",
     "buffer[:] = buffer + new", [E + "test_exercise_3_the_buffer_keeps_the_last_buffer_size_rewards"]),
    ("exercise 3: groups ignored (batch statistics)", "ddpo.py",
     "stats = rewards[of_prompt] if self.group_size > 1 else rewards", "stats = rewards",
     [E + "test_exercise_3_groups_of_a_prompt_normalise_by_the_group"]),
    ("exercise 4: DDPO_SF without the minus sign", "ddpo.py", "return -(advantages * log_prob).mean()",
     "return (advantages * log_prob).mean()", [E + "test_exercise_4_the_loss_descends_towards_higher_advantage"]),
    ("exercise 4: DDPO_SF summed over samples", "ddpo.py", "return -(advantages * log_prob).mean()",
     "return -(advantages * log_prob).sum()", [E + "test_exercise_4_the_loss_descends_towards_higher_advantage"]),
    ("exercise 5: the clip on the wrong side (min)", "ddpo.py", "loss = torch.max(pg_loss1, pg_loss2).mean()",
     "loss = torch.min(pg_loss1, pg_loss2).mean()", [E + "test_exercise_5_the_clip_is_pessimistic"]),
    ("exercise 5: ratio not clipped", "ddpo.py", "pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)",
     "pg_loss2 = -advantages * ratio", [E + "test_exercise_5_the_clip_is_pessimistic"]),
    ("exercise 5: clipfrac counts within the range", "ddpo.py", "clipfrac = ((ratio - 1).abs() > clip_range).float().mean()",
     "clipfrac = ((ratio - 1).abs() <= clip_range).float().mean()", [E + "test_exercise_5_approx_kl_and_clipfrac"]),
    ("exercise 6: exponential weights not normalised", "ddpo.py", "return torch.softmax(beta * x, dim=0) * len(x)",
     "return torch.exp(beta * x)", [E + "test_exercise_6_exponential_weights_average_one"]),
    ("exercise 6: sparse weights not rescaled", "ddpo.py", "return keep / keep.mean() if keep.any() else keep",
     "return keep", [E + "test_exercise_6_sparse_weights_keep_the_rewards_at_or_above_c"]),
    ("exercise 7: KL summed over dimensions", "ddpo.py", "return kl.mean(dim=tuple(range(1, mean.ndim)))",
     "return kl.sum(dim=tuple(range(1, mean.ndim)))", [E + "test_exercise_7_kl_is_the_gaussians_kl_averaged_over_dimensions"]),
    ("exercise 7: gradient into the pretrained mean", "ddpo.py", "kl = (mean.float() - mean_pre.detach().float())",
     "kl = (mean.float() - mean_pre.float())", [E + "test_exercise_7_gradient_flows_into_the_fine_tuned_mean_only"]),
    ("the hub's retry messages not silenced (an unreachable hub prints a page of them)", "plumbing/model_checks.py",
     "    huggingface_hub.utils.logging.set_verbosity_error()", "    pass",
     [D + "test_a_hub_id_with_the_hub_unreachable_is_one_line_saying_so"]),
    # several processes (torchrun): N processes take the update of one
    ("each process averages its own samples, then gradients are summed (N x the update)", "ddpo.py",
     "share = len(chunk) / len(minibatch)", "share = len(chunk) / len(held)",
     [T + "test_two_processes_take_the_update_of_one[is]"]),
    # the derived rounding bounds: a plausible small wrong version of the quantity each one guards
    # (conftest.rescoring_rounding_bound: only another layout shows it; a random model's prompt moves ε̂ little)
    ("rescore conditions its rows on the first prompts of the round, not their own", "ddpo.py",
     "policy_args = (traj.states[rows, j], traj.timesteps[j].to(models.device), pick(traj.cond, rows),",
     "policy_args = (traj.states[rows, j], traj.timesteps[j].to(models.device), pick(traj.cond, slice(0, len(rows))),",
     [D + "test_rescoring_unchanged_weights_gives_ratio_one", P + "test_ratio_is_one_at_the_first_minibatch_under_mixed_precision"]),
    # (test_distributed's update: equal by construction in its EXACT cases, where a bound would let this through)
    ("gradients rounded to fp16 for the all-reduce (as torch's fp16_compress_hook sends them)", "plumbing/processes.py",
     "for work in [torch.distributed.all_reduce(p.grad, async_op=True) for p in params if p.grad is not None]:",
     "for work in [torch.distributed.all_reduce(p.grad.copy_(p.grad.half()), async_op=True) for p in params\n"
     "                         if p.grad is not None]:",
     [T + "test_two_processes_take_the_update_of_one[rwr]"]),
    # per-step quantities by step, falsy flags, state across rounds and resume, schedules
    ("a trained step's advantage taken at the loop index i, not its step", "ddpo.py",
     "adv = advantages[c, j] if", "adv = advantages[c, i] if",
     [B + "test_each_trained_step_takes_its_own_advantage_old_log_prob_and_states[is-1]",
      B + "test_each_trained_step_takes_its_own_advantage_old_log_prob_and_states[sf-1]"]),
    ("a trained step's advantage taken at the sample's first step", "ddpo.py",
     "adv = advantages[c, j] if", "adv = advantages[c, 0] if",
     [B + "test_each_trained_step_takes_its_own_advantage_old_log_prob_and_states[sf-1]"]),
    ("DDPO_IS old log-prob of the loop index's step", "ddpo.py", "ddpo_is_loss(log_prob, traj.log_probs[r, j], adv,",
     "ddpo_is_loss(log_prob, traj.log_probs[r, i], adv,",
     [B + "test_each_trained_step_takes_its_own_advantage_old_log_prob_and_states[is-1]"]),
    # --timesteps-per-pass: k of each sample's steps stacked into one pass
    ("stacked steps sample-major against rows repeated step-major", "ddpo.py",
     "j = steps[chunk, i:i + args.timesteps_per_pass].T.flatten()", "j = steps[chunk, i:i + args.timesteps_per_pass].flatten()",
     [B + "test_each_trained_step_takes_its_own_advantage_old_log_prob_and_states[is-2]"]),
    ("a stacked pass weighted as one step", "ddpo.py", "backward(loss, share * k / n_timesteps,",
     "backward(loss, share / n_timesteps,", [B + "test_each_trained_step_takes_its_own_advantage_old_log_prob_and_states[sf-3]"]),
    ("the last, shorter pass weighted as a full one", "ddpo.py", "backward(loss, share * k / n_timesteps,",
     "backward(loss, share * args.timesteps_per_pass / n_timesteps,",
     [B + "test_each_trained_step_takes_its_own_advantage_old_log_prob_and_states[is-2]"]),
    ("a stacked pass's advantages one sample's steps after another", "ddpo.py",
     "r, c = rows.repeat(k), chunk.repeat(k)", "r, c = rows.repeat(k), chunk.repeat_interleave(k)",
     [B + "test_each_trained_step_takes_its_own_advantage_old_log_prob_and_states[sf-3]"]),
    ("the logs weigh a stacked pass as one step", "ddpo.py", 'logs["loss"] += [loss.item()] * k',
     'logs["loss"] += [loss.item()]', [B + "test_each_trained_step_takes_its_own_advantage_old_log_prob_and_states[is-2]"]),
    ("the logs weigh a stacked pass's approx_kl as one step", "ddpo.py", 'logs["approx_kl"] += [approx_kl.item()] * k',
     'logs["approx_kl"] += [approx_kl.item()]', [B + "test_each_trained_step_takes_its_own_advantage_old_log_prob_and_states[is-2]"]),
    ("the logs weigh a stacked pass's clipfrac as one step", "ddpo.py", 'logs["clipfrac"] += [clipfrac.item()] * k',
     'logs["clipfrac"] += [clipfrac.item()]', [B + "test_each_trained_step_takes_its_own_advantage_old_log_prob_and_states[is-2]"]),
    ("the logs weigh a stacked pass's KL as one step", "ddpo.py", 'logs["kl"] += [kl.mean().item()] * k',
     'logs["kl"] += [kl.mean().item()]', [B + "test_each_trained_step_takes_its_own_advantage_old_log_prob_and_states[is-2-kl]"]),
    ("a stacked pass's KL summed over its steps", "ddpo.py", "loss = loss + args.kl_coef * kl.mean()",
     "loss = loss + args.kl_coef * kl.view(k, -1).sum(0).mean()", [B + "test_each_trained_step_takes_its_own_advantage_old_log_prob_and_states[is-2-kl]"]),
    ("one advantage per sample, a stacked pass's rows one sample's steps after another", "ddpo.py",
     "else advantages[c]  # A per sample", "else advantages[chunk].repeat_interleave(k)  # A per sample",
     [B + "test_each_trained_step_takes_its_own_advantage_old_log_prob_and_states[sf-2-per-sample]"]),
    ("DPOK's KL: π_pre scored at the next state, θ at s_t", "ddpo.py",
     "kl = gaussian_kl(mean, pretrained_mean(models, *policy_args), sigma_t)",
     "kl = gaussian_kl(mean, pretrained_mean(models, traj.states[rows, j + 1], *policy_args[1:]), sigma_t)",
     [B + "test_each_trained_step_takes_its_own_advantage_old_log_prob_and_states[is-2-kl]"]),
    ("rescore's action a_t taken at the state's own step", "ddpo.py",
     "return gaussian_log_prob(traj.states[rows, j + 1], mean, sigma_t), kl",
     "return gaussian_log_prob(traj.states[rows, j], mean, sigma_t), kl",
     [B + "test_each_trained_step_takes_its_own_advantage_old_log_prob_and_states[sf-1]"]),
    ("--rwr-threshold 0 taken as unset (the 90th percentile)", "ddpo.py",
     "args.rwr_threshold if args.rwr_threshold is not None else torch.quantile(rewards, 0.9).item()",
     "args.rwr_threshold or torch.quantile(rewards, 0.9).item()",
     [B + "test_rwr_threshold_zero_keeps_the_rewards_at_or_above_zero"]),
    ("--rwr-beta 0 taken as unset (beta 1)", "ddpo.py",
     'rewards if args.rwr_weights == "reward" else advantages, args.rwr_beta)',
     'rewards if args.rwr_weights == "reward" else advantages, args.rwr_beta or 1.0)',
     [B + "test_rwr_beta_zero_weights_every_sample_alike"]),
    ("torch's global RNG not saved", "plumbing/checkpoints.py", '"torch_rng": torch.get_rng_state(),',
     '"torch_rng": torch.Generator().get_state(),',
     [B + "test_a_reward_drawing_from_the_global_rngs_gives_the_same_numbers_after_resume"]),
    ("torch's global RNG not restored", "plumbing/checkpoints.py", 'torch.set_rng_state(state["torch_rng"])', "pass",
     [B + "test_a_reward_drawing_from_the_global_rngs_gives_the_same_numbers_after_resume"]),
    ("python's and numpy's global RNGs not saved", "plumbing/checkpoints.py",
     '"random_rng": random.getstate(), "numpy_rng": numpy_rng_state(),', "",
     [B + "test_a_reward_drawing_from_the_global_rngs_gives_the_same_numbers_after_resume"]),
    ("python's global RNG not restored", "plumbing/checkpoints.py", 'random.setstate(state["random_rng"])', "pass",
     [B + "test_a_reward_drawing_from_the_global_rngs_gives_the_same_numbers_after_resume"]),
    ("numpy's global RNG not restored", "plumbing/checkpoints.py", "np.random.set_state((name, np.array(key, np.uint32), *rest))",
     "pass", [B + "test_a_reward_drawing_from_the_global_rngs_gives_the_same_numbers_after_resume"]),
    ("python's global RNG not seeded", "ddpo.py", "    random.seed(args.seed)  #", "    pass  #",
     [B + "test_a_reward_drawing_from_the_global_rngs_gives_the_same_numbers_after_resume"]),
    ("numpy's global RNG not seeded", "ddpo.py", "    np.random.seed(args.seed)  #", "    pass  #",
     [B + "test_a_reward_drawing_from_the_global_rngs_gives_the_same_numbers_after_resume"]),
    ("the prompt drawer's state not restored", "plumbing/checkpoints.py", 'rng.setstate(state["python_rng"])', "pass",
     [B + "test_a_reward_drawing_from_the_global_rngs_gives_the_same_numbers_after_resume"]),
    ("fp16 loss scale not restored", "plumbing/checkpoints.py", 'scaler.load_state_dict(state["scaler"])', "pass",
     [P + "test_resume_gives_the_same_metrics_as_training_straight[sd-fp16]"]),
    ("DPOK pi_pre of a run continuing a LoRA run is the base model (adapter off)", "ddpo.py",
     "if args.kl_coef > 0 and (args.lora_rank == 0 or is_run(args.model)):", "if args.kl_coef > 0 and args.lora_rank == 0:",
     [B + "test_a_run_continuing_a_lora_run_takes_that_run_as_pi_pre"]),
    ("--save-every off by one", "plumbing/training_run.py", "epoch % self.args.save_every == 0 or",
     "(epoch + 1) % self.args.save_every == 0 or",
     [B + "test_checkpoints_every_save_every_epochs_and_after_the_last_and_evaluation_every_epoch"]),
    ("no checkpoint after the last epoch", "plumbing/training_run.py",
     "epoch % self.args.save_every == 0 or epoch == self.args.epochs or stop", "epoch % self.args.save_every == 0 or stop",
     [B + "test_checkpoints_every_save_every_epochs_and_after_the_last_and_evaluation_every_epoch",
      B + "test_save_every_beyond_the_epochs_writes_one_checkpoint_after_the_last"]),
    ("a new run does not evaluate the pretrained model (epoch 0)", "plumbing/training_run.py", "                if not self.start:\n",
     "                if False:\n", [B + "test_save_every_beyond_the_epochs_writes_one_checkpoint_after_the_last"]),
    ("a resumed run evaluates epoch 0 again", "plumbing/training_run.py", "                if not self.start:\n",
     "                if True:\n",
     [B + "test_checkpoints_every_save_every_epochs_and_after_the_last_and_evaluation_every_epoch"]),
    # the entry files, on what they write; the error paths' promises in each of their forms
    ("evaluate.py's grid: all base pictures, then all fine-tuned ones", "evaluate.py",
     "images = torch.stack([base_images, tuned_images], 1).flatten(0, 1)", "images = torch.cat([base_images, tuned_images])",
     [EF + "test_evaluate_draws_each_prompt_base_then_tuned_in_order_and_reports_the_rewards_of_those_pictures[0]"]),
    ("evaluate.py's captions: each cell with the other model's reward", "evaluate.py",
     '(("base", b, bj, ba), ("tuned", t, tj, ta))', '(("base", t, bj, ba), ("tuned", b, tj, ta))',
     [EF + "test_evaluate_draws_each_prompt_base_then_tuned_in_order_and_reports_the_rewards_of_those_pictures[0]"]),
    ("evaluate.py draws other prompts for the fine-tuned model", "evaluate.py",
     "prompts = random.Random(args.seed).choices(prompt_set, k=16)",
     'prompts = random.Random(args.seed + (which == "tuned")).choices(prompt_set, k=16)',
     [EF + "test_evaluate_draws_each_prompt_base_then_tuned_in_order_and_reports_the_rewards_of_those_pictures[0]"]),
    ("export in the run's precision: the frozen VAE and text encoder rounded", "export.py",
     'models = ddpo.load_models(run_dir, "cpu")', 'models = ddpo.load_models(run_dir, "cpu", mixed_precision=run.mixed_precision)',
     [EF + "test_export_writes_the_runs_trained_weights_unrounded_in_fp32_whatever_its_precision[bf16-0]"]),
    ("a failed write leaves its temporary file", "plumbing/files.py", "        tmp.unlink(missing_ok=True)\n", "        pass\n",
     [EF + "test_a_full_disk_in_the_middle_of_an_epoch_is_one_line_leaves_no_half_file_and_keeps_the_checkpoint[metrics.jsonl-3-2]"]),
    ("a full disk while writing metrics or grids is a traceback", "plumbing/training_run.py",
     "if isinstance(error, (RunError, OSError)):", "if isinstance(error, RunError):",
     [EF + "test_a_full_disk_in_the_middle_of_an_epoch_is_one_line_leaves_no_half_file_and_keeps_the_checkpoint[grid_002.png-1-2]"]),
    ("evaluate.py lets a full disk through as a traceback", "evaluate.py",
     "    except OSError as e:  # its folder cannot be written", "    except ValueError as e:  # its folder cannot be written",
     [EF + "test_evaluate_on_a_full_disk_is_one_line_and_leaves_no_half_file"]),
    # the tiny judges (world/judges.py) and which judge a run loads
    ("the tiny judges replace a typed flag", "plumbing/command_line.py", "        if not getattr(args, name):",
     "        if True:", [J + "test_the_tiny_models_default_to_the_tiny_judges_and_a_typed_flag_wins"]),
    ("the tiny judges for every model (a hub model given the toy world's CLIP)", "plumbing/command_line.py",
     'MODEL_JUDGES[base] if base in TINY_MODELS else', 'MODEL_JUDGES.get(base, "tiny") if True else',
     [J + "test_the_tiny_models_default_to_the_tiny_judges_and_a_typed_flag_wins"]),
    ("a resumed run's typed judge replaced by the tiny one", "plumbing/command_line.py",
     "        if not getattr(args, name):", "        if args.resume or not getattr(args, name):",
     [J + "test_a_run_continuing_a_tiny_run_uses_the_tiny_judges_and_a_resumed_run_keeps_its_own"]),
    ("a run continuing a tiny run loads the hub's judges", "plumbing/command_line.py",
     "args.lora_rank, base = run.lora_rank, run.model", "args.lora_rank = run.lora_rank",
     [J + "test_a_run_continuing_a_tiny_run_uses_the_tiny_judges_and_a_resumed_run_keeps_its_own"]),
    ("PickScore's processor left at the hub's with the tiny models", "world/__init__.py",
     '"pickscore_model": JUDGES / "clip", "pickscore_processor": JUDGES / "clip",', '"pickscore_model": JUDGES / "clip",',
     [J + "test_the_tiny_models_default_to_the_tiny_judges_and_a_typed_flag_wins"]),
    ("alignment's VLM left at the hub's with the tiny models", "world/__init__.py", '{"vlm": JUDGES / "vlm", ', "{",
     [J + "test_the_tiny_models_default_to_the_tiny_judges_and_a_typed_flag_wins"]),
    ("--bertscore-model tiny loads the VLM's folder (AutoModel loads its language model)", "world/__init__.py",
     '"bertscore_model": JUDGES / "bertscore"}', '"bertscore_model": JUDGES / "vlm"}',
     [A + "test_the_tiny_bertscore_encoder_pays_most_for_the_right_animal_and_activity"]),
    ("--vlm tiny loads the CLIP's folder", "world/__init__.py", '"vlm": JUDGES / "vlm"', '"vlm": JUDGES / "clip"',
     [A + "test_the_tiny_vlm_says_a_drawn_cat_rides_a_bike_only_where_the_bike_is_drawn"]),
    ("tiny-activities defaults to the plain world's judges", "world/__init__.py",
     '"tiny-activities": "tiny-activities"}', '"tiny-activities": "tiny"}',
     [J + "test_the_tiny_models_default_to_the_tiny_judges_and_a_typed_flag_wins"]),
    ("--clip-model tiny-activities loads the plain world's CLIP", "world/__init__.py",
     '{"clip_model": JUDGES / "activities" / "clip",', '{"clip_model": JUDGES / "clip",',
     [A + "test_the_world_with_activities_clip_prefers_the_caption_of_what_is_drawn"]),
    ("'tiny-activities' resolved to the plain world's judges", "rewards.py",
     "chosen[k] = str(TINY_JUDGES[v][k])", 'chosen[k] = str(TINY_JUDGES["tiny"][k])',
     [A + "test_the_world_with_activities_aesthetic_head_ranks_the_raters_favourite_first"]),
    ("tiny-activities names the plain world's model", "world/__init__.py",
     '"tiny-activities": WORLD / "tiny_activities_model"', '"tiny-activities": WORLD / "tiny_model"',
     [A + "test_the_tiny_activities_model_draws_the_activity_its_prompt_names"]),
    ("the independent judge loaded from the VLM's folder (random weights, and a warning)", "world/alignment_judges.py",
     'JUDGE = JUDGES / "attributes"', 'JUDGE = JUDGES / "vlm"',
     [A + "test_the_independent_judge_reads_the_drawn_activity_and_subject"]),
    ("'tiny' passed on to from_pretrained as a hub id", "rewards.py", '            if v in TINY_JUDGES:', "            if False:",
     [J + "test_tiny_names_the_world_judges_and_a_reward_without_one_is_one_line"]),
    ("the rater's subject: every pixel nearer the shape's colour (busy tiles counted)", "world/judges.py",
     "subject = (to_fg < NEAR) & (to_fg < to_bg)", "subject = to_fg < to_bg",
     [J + "test_the_rater_measures_area_and_texture_on_the_pixels_and_scores_them_as_stated"]),
    ("the rater's texture over every pixel, the subject's too", "world/judges.py",
     "background = (to_bg <= to_fg).float()", "background = torch.ones_like(to_bg)",
     [J + "test_the_rater_measures_area_and_texture_on_the_pixels_and_scores_them_as_stated"]),
    ("the rater's bigger-is-better never saturates", "world/judges.py", "area.clamp(max=BEST_AREA)", "area",
     [J + "test_a_subject_larger_than_the_best_scores_no_more_and_a_busy_background_scores_less"]),
    ("the judges' rebuild not seeded (their initial weights)", "world/judges.py", "    torch.manual_seed(seed)\n", "",
     [J + "test_the_judges_rebuild_is_exact"]),
    ("the plain world's judges rebuilt over the whole judges folder (the alignment judges deleted)", "world/judges.py",
     'with files.atomic_folder(Path(out) / "clip") as tmp:\n        clip.save_pretrained(tmp)\n        processor.save_pretrained(tmp)\n',
     'with files.atomic_folder(out) as tmp:\n        clip.save_pretrained(tmp / "clip")\n        processor.save_pretrained(tmp / "clip")\n',
     [J + "test_the_judges_rebuild_is_exact"]),
    ("the judges' captions never say what the picture shows", "world/judges.py",
     '    return f"{prompt}, {size_word(attributes[\'radius\'])}, {background_word(attributes[\'strength\'])} background"',
     "    return prompt", [J + "test_captions_name_the_prompt_then_the_size_and_the_background"]),
    ("the rater of the world with activities counts a prop as background texture", "world/judges.py",
     "        background[:, BAND:] = 0\n", "        background[:, :0] = 0\n",
     [A + "test_the_rater_of_the_world_with_activities_measures_the_subject_and_not_the_props_band"]),
    ("the rater of the world with activities reads the plain world's palette", "world/judges.py",
     '    if world == "activities":\n        return torch.tensor([SCENE_PALETTES', '    if False:\n        return torch.tensor([SCENE_PALETTES',
     [A + "test_the_rater_of_the_world_with_activities_measures_the_subject_and_not_the_props_band"]),
    ("the CLIP of the world with activities learns the prompt, drawn or not (alt-text's noise)", "world/judges.py",
     '        return answer(attributes["subject"], attributes["activity"])', "        return prompt",
     [A + "test_the_world_with_activities_clip_learns_captions_true_of_the_picture"]),
    ("the CLIP trained on the prompts, not on what its pictures show", "world/judges.py",
     "else p for p, a in zip(said, drawn)]", "else p for p, a in zip(chosen, drawn)]",
     [A + "test_the_world_with_activities_clip_trains_on_those_captions"]),
    ("the judges of the world with activities learn from the plain world's VAE", "world/judges.py",
     'from_pretrained(TINY_MODELS[WORLD_MODELS[world]], subfolder="vae")', 'from_pretrained(TINY_MODELS["tiny"], subfolder="vae")',
     [J + "test_the_judges_rebuild_is_exact[activities]"]),
    # the world with activities and the alignment experiments' judges
    ("alt-text always shows the activity it names", "world/drawing.py",
     "shown = activity is not None and (shown if show is None else show)",
     "shown = activity is not None and (True if show is None else show)",
     [A + "test_alt_text_shows_the_named_activity_at_its_rate_and_no_other"]),
    ("alt-text's draw skipped when the picture is asked for by name (another picture)", "world/drawing.py",
     "    shown = rng.random() < ALT_TEXT_SHOWS\n", "    shown = rng.random() < ALT_TEXT_SHOWS if show is None else show\n",
     [A + "test_alt_text_shows_the_named_activity_at_its_rate_and_no_other"]),
    ("the subject placed as in the plain world, over the band", "world/drawing.py",
     "cy, cx, r = rng.uniform(8, 16), rng.uniform(11, 21)", "cy, cx, r = rng.uniform(11, 21), rng.uniform(11, 21)",
     [A + "test_every_subject_stands_above_the_band_and_the_empty_prompt_is_any_picture"]),
    ("the unconditional picture never shows an activity", "world/drawing.py",
     "    if not subject and activity is None:\n        activity =", "    if False:\n        activity =",
     [A + "test_every_subject_stands_above_the_band_and_the_empty_prompt_is_any_picture"]),
    ("a prop drawn in the subject's colour (the previous world)", "world/drawing.py",
     "np.array(PROPS[activity][1], dtype=np.float32)[:, None, None], image)", "fg, image)",
     [A + "test_every_prop_differs_and_the_background_tiles_do_not_move"]),
    ("the scene's subject in the plain world's palettes", "world/drawing.py",
     "for c in SCENE_PALETTES[palette])", "for c in PALETTES[palette % len(PALETTES)])",
     [A + "test_a_shown_activity_is_its_prop_under_the_subject_on_the_same_background"]),
    ("a prop's tiles drawn one tile to the left", "world/drawing.py", "mask[BAND:] = rows.repeat(TILE, 0).repeat(TILE, 1)",
     "mask[BAND:] = np.roll(rows, -1, 1).repeat(TILE, 0).repeat(TILE, 1)",
     [A + "test_a_shown_activity_is_its_prop_under_the_subject_on_the_same_background"]),
    ("the animals' looks repeat (palette i mod 8, as many palettes as the plain world's)", "world/drawing.py",
     "return i % len(SCENE_PALETTES), i % len(SCENE_SHAPES)", "return i % 8, i % len(SCENE_SHAPES)",
     [A + "test_every_animal_has_its_own_look_and_any_other_subject_is_picked_by_its_words"]),
    ("a prompt's article kept in its subject", "world/drawing.py", 'return " ".join(w for w in subject if w not in ("a", "an")), activity',
     'return " ".join(subject), activity', [A + "test_a_prompt_splits_into_its_subject_and_its_activity"]),
    ("the world with activities captioned as the plain world (the shipped prompts only)", "world/tiny_world.py",
     '    if world == "plain":\n        return lambda', "    if True:\n        return lambda",
     [A + "test_pretraining_captions_name_an_activity_more_often_in_the_world_with_activities"]),
    ("pretraining's denoiser draws the plain world whatever it is given", "world/tiny_world.py",
     "models.vae.encode(batch_of(picture, batch, rng))", "models.vae.encode(batch_of(draw, batch, rng))",
     [A + "test_pretraining_learns_the_world_it_is_given"]),
    ("--alignment-count reads the default judges' classifier, not the folder it is given", "world/tiny_world.py",
     "aj.shows_activity(images, prompts, classifier)", "aj.shows_activity(images, prompts)",
     [A + "test_alignment_count_reads_a_models_samples_with_the_classifier_it_is_given"]),
    ("--alignment-count counts the plain world's model unless told", "world/tiny_world.py",
     'a.model = a.model or ("tiny-activities" if aligning else "tiny")', 'a.model = a.model or "tiny"',
     [A + "test_alignment_count_reads_a_models_samples_with_the_classifier_it_is_given"]),
    ("--alignment-count's --guidance-scale not handed on (always w = 5)", "world/tiny_world.py",
     "a.samples, a.guidance_scale)", "a.samples)",
     [A + "test_alignment_count_reads_a_models_samples_with_the_classifier_it_is_given"]),
    ("the VLM's answers ignore the activity (captions that ignore it)", "world/alignment_judges.py",
     'return with_article(subject) + (f" {activity}" if activity else "")', "return with_article(subject)",
     [A + "test_answers_name_the_animal_and_only_a_shown_activity"]),
    ("the VLM learns the question too", "world/alignment_judges.py", "    ids[:, :len(question)] = question\n",
     "    ids[:, :len(question)] = labels[:, :len(question)] = question\n",
     [A + "test_the_vlm_learns_the_answer_and_its_end_and_not_the_question"]),
    ("the VLM never learns to stop ([EOS] not a target)", "world/alignment_judges.py",
     "add_special_tokens=False).input_ids + [tok.eos_token_id]\n               for d in drawn]",
     "add_special_tokens=False).input_ids\n               for d in drawn]",
     [A + "test_the_vlm_learns_the_answer_and_its_end_and_not_the_question"]),
    ("masked language modelling masks [CLS], [SEP] and padding too", "world/alignment_judges.py",
     "words = batch.attention_mask.bool() & ~batch.special_tokens_mask.bool()", "words = torch.ones_like(ids, dtype=torch.bool)",
     [A + "test_masked_language_modelling_hides_only_words_at_its_rate_and_asks_for_every_word"]),
    ("masked language modelling asks only for the hidden words (BERT's own labels)", "world/alignment_judges.py",
     "labels = torch.where(words, ids,", "labels = torch.where(target, ids,",
     [A + "test_masked_language_modelling_hides_only_words_at_its_rate_and_asks_for_every_word"]),
    ("the classifier's palette logits take the first shape's too", "world/alignment_judges.py",
     "GROUPS = (slice(0, P), slice(P, P + S),", "GROUPS = (slice(0, P + 1), slice(P, P + S),",
     [A + "test_the_classifier_learns_palette_shape_and_activity_each_by_its_own_cross_entropy"]),
    ("the independent judge reads activity k as activity k + 1", "world/alignment_judges.py",
     "wanted = [ACTIVITIES.index(a) + 1 if a else 0", "wanted = [ACTIVITIES.index(a) if a else 0",
     [A + "test_the_independent_judge_reads_the_prompts_activity_and_subject"]),
    ("the alignment judges' rebuild not seeded (their initial weights)", "world/alignment_judges.py",
     "    torch.manual_seed(seed)\n    rng = np.random.default_rng([seed, 0])\n", "    rng = np.random.default_rng([seed, 0])\n",
     [A + "test_the_alignment_judges_rebuild_is_exact_and_loads_as_a_users_models"]),
    ("BERTScore recall swapped for precision", "rewards.py",
     "        cand, cand_mask, _ = self.embed(candidates)  # (B, Lc, D)\n        ref, ref_mask, ref_special = self.embed(references)",
     "        cand, cand_mask, _ = self.embed(references)  # (B, Lc, D)\n        ref, ref_mask, ref_special = self.embed(candidates)",
     [R + "test_bertscore_missing_reference_token_lowers_recall_by_its_best_match"]),
    ("evaluate.py's judge is the run's own reward", "evaluate.py", "dataclasses.replace(run, reward=args.judge)", "run",
     [EF + "test_evaluate_judge_scores_the_same_pictures_beside_the_reward"]),
    ("evaluate.py's answers captioned under the other model's pictures", "evaluate.py",
     '(("base", b, bj, ba), ("tuned", t, tj, ta))', '(("base", b, bj, ta), ("tuned", t, tj, ba))',
     [EF + "test_evaluate_captions_each_picture_with_the_vlms_answer_under_its_reward"]),
    ("a caption's lines drawn over each other", "plumbing/pictures.py", "y + cell + 1 + 14 * k)", "y + cell + 1)",
     [EF + "test_evaluate_captions_each_picture_with_the_vlms_answer_under_its_reward"]),
    ("evaluate.py's judge captions swapped between base and fine-tuned", "evaluate.py",
     '(("base", b, bj, ba), ("tuned", t, tj, ta))', '(("base", b, tj, ba), ("tuned", t, bj, ta))',
     [EF + "test_evaluate_judge_scores_the_same_pictures_beside_the_reward"]),
    ("evaluate.py writes eval/ file by file (a full disk leaves grids of two evaluations)", "evaluate.py",
     "    with atomic_folder(out) as tmp:", "    out.mkdir(exist_ok=True)\n    for tmp in [out]:",
     [EF + "test_evaluate_on_a_full_disk_is_one_line_and_leaves_no_half_file"]),
    ("a failed folder write leaves its .tmp folder", "plumbing/files.py",
     "    except BaseException:\n        shutil.rmtree(tmp, ignore_errors=True)\n        raise",
     "    except BaseException:\n        raise", [EF + "test_export_on_a_full_disk_is_one_line_and_leaves_no_folder[4]"]),
    ("a reward of +inf or -inf accepted (only NaN refused)", "rewards.py",
     "bad = torch.nonzero(~torch.isfinite(r)).flatten()", "bad = torch.nonzero(torch.isnan(r)).flatten()",
     [EF + "test_a_reward_of_plus_or_minus_inf_is_refused_as_nan_is[inf]",
      EF + "test_an_infinite_reward_in_an_epoch_is_one_line_naming_the_sample_and_the_last_good_checkpoint[-inf]"]),
    ("non-finite images from the decoder scored", "ddpo.py", "    if not torch.isfinite(images).all():", "    if False:",
     [EF + "test_non_finite_images_from_the_decoder_stop_the_run_before_they_are_scored"]),
    # SD3's third text encoder (T5), the layout SD3.5-M's folder has
    ("SD3 with T5 given no T5 tokens", "ddpo.py", "t5 = 128 if models.pipeline.text_encoder_3 is not None else 0", "t5 = 0",
     [F + "test_encode_prompts_is_sd3s_encode_prompt_with_128_t5_tokens_when_there_is_a_t5[two CLIPs and T5]",
      F + "test_the_rollout_becomes_the_pipelines_own_sampler_as_the_noise_level_goes_to_zero[two CLIPs and T5-4.5]"]),
    ("SD3's T5 at CLIP's 77 tokens", "ddpo.py", "t5 = 128 if models.pipeline.text_encoder_3 is not None else 0",
     "t5 = 77 if models.pipeline.text_encoder_3 is not None else 0",
     [F + "test_encode_prompts_is_sd3s_encode_prompt_with_128_t5_tokens_when_there_is_a_t5[two CLIPs and T5]"]),
    ("SD3's T5 dropped on loading", "plumbing/model_folders.py",
     'absent = {c: None for c in ("text_encoder_3", "tokenizer_3") if index.get(c, [None])[0] is None}',
     'absent = {"text_encoder_3": None, "tokenizer_3": None}',
     [F + "test_encode_prompts_is_sd3s_encode_prompt_with_128_t5_tokens_when_there_is_a_t5[two CLIPs and T5]"]),
    ("SD3's T5 left trainable", "ddpo.py",
     "more = [models.pipeline.text_encoder_2, models.pipeline.text_encoder_3] if models.flow else []",
     "more = [models.pipeline.text_encoder_2] if models.flow else []",
     [F + "test_encode_prompts_is_sd3s_encode_prompt_with_128_t5_tokens_when_there_is_a_t5[two CLIPs and T5]"]),
    ("T5's fp32 modules cast to fp16 with the rest", "plumbing/model_folders.py",
     'if tensor.is_floating_point() and not any(k in name.split(".") for k in keep):', "if tensor.is_floating_point():",
     [F + "test_t5s_fp32_modules_stay_fp32_under_mixed_precision[fp16]"]),
    ("a short last chunk weighted as a full one (the summed gradient off by a fraction)", "ddpo.py",
     "share = len(chunk) / len(minibatch)", "share = args.train_batch_size / len(minibatch)",
     [T + "test_two_processes_take_the_update_of_one[is]"]),
    ("rescoring one timestep early (t - 1)", "ddpo.py",
     "policy_args = (traj.states[rows, j], traj.timesteps[j].to(models.device),",
     "policy_args = (traj.states[rows, j], (traj.timesteps[j] - 1).to(models.device),",
     [D + "test_rescoring_unchanged_weights_gives_ratio_one[defaults]",
      P + "test_ratio_is_one_at_the_first_minibatch_under_mixed_precision[bf16]"]),
    ("gradients not all-reduced", "plumbing/processes.py",
     "for work in [torch.distributed.all_reduce(p.grad, async_op=True) for p in params if p.grad is not None]:",
     "for work in []:",
     [T + "test_two_processes_take_the_update_of_one[is]"]),
    ("rescoring at the default guidance scale", "ddpo.py", "repeat(uncond, len(rows)), args.guidance_scale, noise_scale(models, args))",
     "repeat(uncond, len(rows)), 5.0, noise_scale(models, args))", [D + "test_rescoring_unchanged_weights_gives_ratio_one"]),
    ("rescoring at the default eta", "ddpo.py", "repeat(uncond, len(rows)), args.guidance_scale, noise_scale(models, args))",
     "repeat(uncond, len(rows)), args.guidance_scale, 1.0)", [D + "test_rescoring_unchanged_weights_gives_ratio_one"]),
    ("rescoring at the default noise level", "ddpo.py", "repeat(uncond, len(rows)), args.guidance_scale, noise_scale(models, args))",
     "repeat(uncond, len(rows)), args.guidance_scale, 0.7 if models.flow else args.eta)",
     [F + "test_rescoring_unchanged_weights_gives_ratio_one_on_the_flow_policy[0-no]"]),
    ("the noise key without its stream", "ddpo.py", "np.random.SeedSequence([seed, stream, epoch, i])",
     "np.random.SeedSequence([seed, epoch, i])", [D + "test_noise_streams_differ_where_they_must_and_repeat_where_they_must"]),
    ("the training noise the same every epoch", "ddpo.py", "noise_generators(args.seed, mine, epoch)",
     "noise_generators(args.seed, mine)", [D + "test_each_random_stream_is_keyed_as_it_must_be_in_a_run"]),
    ("the eval samples drawn from the training stream", "ddpo.py", "noise_generators(args.seed, range(8), stream=1)",
     "noise_generators(args.seed, range(8))", [D + "test_each_random_stream_is_keyed_as_it_must_be_in_a_run"]),
    ("the eval samples' noise new every epoch", "ddpo.py", "noise_generators(args.seed, range(8), stream=1)",
     "noise_generators(args.seed, range(8), epoch, stream=1)", [D + "test_each_random_stream_is_keyed_as_it_must_be_in_a_run"]),
    ("evaluate.py drawing the per-epoch eval stream", "evaluate.py", "ddpo.noise_generators(args.seed, range(len(prompts)), stream=2)",
     "ddpo.noise_generators(args.seed, range(len(prompts)), stream=1)", [D + "test_each_random_stream_is_keyed_as_it_must_be_in_a_run"]),
    ("the trained timesteps always the first ones", "ddpo.py",
     "steps = torch.stack([torch.randperm(T, generator=generator)[:n_timesteps] for _ in range(B)])",
     "steps = torch.arange(n_timesteps).expand(B, -1)",
     [D + "test_the_trained_timesteps_and_minibatches_are_the_ones_the_flags_select"]),
    ("the trained timesteps drawn once for every sample", "ddpo.py",
     "steps = torch.stack([torch.randperm(T, generator=generator)[:n_timesteps] for _ in range(B)])",
     "steps = torch.randperm(T, generator=generator)[:n_timesteps].expand(B, -1)",
     [D + "test_the_trained_timesteps_and_minibatches_are_the_ones_the_flags_select"]),
    ("minibatches drawn with replacement", "ddpo.py", "for minibatch in torch.randperm(B, generator=generator).chunk(n_minibatches):",
     "for minibatch in torch.randint(B, (B,), generator=generator).chunk(n_minibatches):",
     [D + "test_the_trained_timesteps_and_minibatches_are_the_ones_the_flags_select"]),
    ("noise drawn per process (by position in its share)", "ddpo.py", "noise_generators(args.seed, mine, epoch)",
     "noise_generators(args.seed, range(len(mine)), epoch)", [T + "test_two_processes_take_the_update_of_one[sf]"]),
    ("advantages from each process's own rewards", "ddpo.py",
     "advantages, fraction = compute_advantages(tracker, prompts, r, args)",
     "advantages, fraction = gather(compute_advantages(tracker, [prompts[i] for i in mine], my_share(r), args)[0]), 0.0",
     [T + "test_two_processes_take_the_update_of_one[sf]"]),
    ("a process holding none of a minibatch runs the UNet on an empty chunk", "ddpo.py",
     "for chunk in held.split(args.train_batch_size) if len(held) else ():", "for chunk in held.split(args.train_batch_size):",
     [T + "test_two_processes_take_the_update_of_one[rwr]",
      P + "test_under_fp16_a_process_holding_no_sample_of_a_minibatch_still_steps"]),
    ("fp16: no loss scale on a process holding none of the round's first minibatch", "ddpo.py",
     "    if scaler.is_enabled():  # creates the scale tensor, also on a process that trains no sample of a minibatch\n"
     "        scaler.scale(torch.zeros((), device=models.device))\n", "",
     [P + "test_under_fp16_a_process_holding_no_sample_of_a_minibatch_still_steps"]),
    ("V_phi's gradients not summed over processes", "ddpo.py", "        sum_gradients(list(value.parameters()))\n", "",
     [T + "test_two_processes_take_the_update_of_one[dpok]"]),
    ("only process 0 resumes from the checkpoint", "ddpo.py", "start = run.resume(checkpointed) if args.resume else 0",
     "start = run.resume(state) if args.resume and run.rank == 0 else 0",
     [T + "test_resume_under_two_processes_equals_an_unbroken_run"]),
    ("an error on one process is not shared with the others", "plumbing/processes.py",
     "for rank, e in enumerate(gather_objects(error)):", "for rank, e in enumerate([error]):",
     [T + "test_a_failure_on_one_process_stops_both_with_one_line"]),
    ("no timeout on collectives (torch's 30 minutes)", "plumbing/processes.py",
     "timeout=datetime.timedelta(seconds=args.collective_timeout))", ")",
     [T + "test_a_failure_on_one_process_stops_both_with_one_line"]),
    # the training loop's plumbing (training_run.Run) and the checks moved beside it
    ("each process samples the whole round", "ddpo.py", "mine = my_share(range(len(prompts)))", "mine = range(len(prompts))",
     [T + "test_two_processes_take_the_update_of_one[sf]"]),
    ("a scheduler's timestep spacing not checked against DDIMScheduler.step's", "plumbing/model_checks.py",
     "if not torch.equal(t[:-1] - step, t[1:]) or t[-1] - step >= 0:", "if t[-1] - step >= 0:",
     [D + "test_schedulers_without_a_ddim_density_are_refused[overrides5-timestep_spacing='linspace']"]),
    ("a stop between --save-every epochs writes no checkpoint", "plumbing/training_run.py", "epoch == self.args.epochs or stop)",
     "epoch == self.args.epochs)", [P + "test_ctrl_c_finishes_the_epoch_writes_a_checkpoint_and_says_how_to_resume"]),
    ("resume keeps the metrics of the epochs after its checkpoint", "plumbing/training_run.py",
     ' if h["epoch"] <= self.start]', "]",
     [P + "test_resume_drops_the_metrics_of_epochs_after_its_checkpoint_and_trains_them_again"]),
    ("--help after a config file shows the built-in defaults", "plumbing/command_line.py",
     '    p.set_defaults(**vars(p.parse_known_args([a for a in argv if a not in ("-h", "--help")])[0]))',
     "    pass", [D + "test_help_after_a_config_file_shows_the_files_values"]),
    # Flow-GRPO's policy: the flow's SDE step
    ("flow SDE without its drift correction", "ddpo.py", "mean = x_t + (v + sigma_t**2 / (2 * s) * (x_t + (1 - s) * v)) * dt",
     "mean = x_t + v * dt", [D + "test_flow_sde_keeps_the_flows_marginals_on_gaussian_data[3.0]"]),
    ("flow SDE std with sqrt(dt), not sqrt(|dt|)", "ddpo.py", "return mean, sigma_t * dt.abs().sqrt()",
     "return mean, sigma_t * dt.sqrt()", [D + "test_flow_sde_step_std_and_log_prob_in_closed_form"]),
    ("flow SDE mean taken at the next t", "ddpo.py", "mean = x_t + (v + sigma_t**2 / (2 * s) * (x_t + (1 - s) * v)) * dt",
     "mean = x_t + (v + sigma_t**2 / (2 * s_next) * (x_t + (1 - s_next) * v)) * dt",
     [D + "test_flow_sde_keeps_the_flows_marginals_on_gaussian_data[3.0]"]),
    ("flow SDE with the convention reversed: x_t = t x_0 + (1 - t) eps", "ddpo.py",
     "(s / (1 - torch.where(s == 1, sigmas[1], s))).sqrt()", "((1 - s) / torch.where(s == 1, sigmas[1], s)).sqrt()",
     [D + "test_flow_sde_step_std_and_log_prob_in_closed_form"]),
    ("flow SDE's mean in the reversed convention", "ddpo.py", "(x_t + (1 - s) * v)", "(x_t + s * v)",
     [D + "test_flow_sde_keeps_the_flows_marginals_on_gaussian_data[3.0]"]),
    ("flow SDE at t = 1 with 1 - t itself (an infinite sigma_t)", "ddpo.py", "torch.where(s == 1, sigmas[1], s)", "s",
     [D + "test_flow_sde_step_std_and_log_prob_in_closed_form"]),
    ("flow SDE's Euler step to the sigma after next", "ddpo.py", "s, s_next = sigmas[j].view(view), sigmas[j + 1].view(view)",
     "s, s_next = sigmas[j].view(view), sigmas[(j + 2).clamp(max=len(sigmas) - 1)].view(view)",
     [D + "test_flow_sde_step_at_noise_level_zero_is_the_schedulers_euler_step[1.0]"]),
]


def copy_project(dest):
    shutil.copytree(HERE, dest, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", ".pytest_cache", "*.tmp"))


def pytest_args(tests, workers=0, durations=False, hang_report=None):
    """pytest's arguments: -x (a mutant is caught at its first failing test); with hang_report, a test still running
    after that many seconds prints every thread's stack (pytest's faulthandler), so that a timeout says where."""
    return ["-q", "-x", "-p", "no:cacheprovider", *(["-n", str(workers), "--dist", "loadgroup"] if workers else []),
            *(["--durations=0", "--durations-min=0"] if durations else []),
            *(["-o", f"faulthandler_timeout={hang_report:.0f}"] if hang_report else []), *tests]


def threads_env(threads):
    """This environment, with every process started in it using that many threads (None: as it is)."""
    return {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}


def pytest(root, tests, threads=None, workers=0, durations=None):
    """pytest's exit code on these tests in root (0 passed, 1 a test failed, else an error; None: still running
    after 600 s), and its last lines; with threads, every process it starts uses that many; with workers,
    pytest-xdist runs the tests in parallel. durations: a dict that gets each test function's seconds (its cases,
    setup and teardown added up). The baseline's run; a mutant's is a Run."""
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", *pytest_args(tests, workers, durations is not None)],
                                cwd=root, capture_output=True, text=True, timeout=600, env=threads_env(threads))
    except subprocess.TimeoutExpired:
        return None, "timed out after 600 s"
    if durations is not None:
        read_durations(result.stdout, durations)
    return result.returncode, " | ".join((result.stdout + result.stderr).strip().splitlines()[-3:])


PRELOADED = False
# run in a fresh interpreter in the project: imports every test file (and so the project), then names the modules
# that came from elsewhere (torch, diffusers, transformers, pytest and its plugins, ...)
THIRD_PARTY = """
import importlib, sys
from pathlib import Path
here = Path.cwd().resolve()
sys.path.insert(0, str(here))
import pytest
sys.path[1:1] = [str(here / "tests"), str(here / "course")]
for path in sorted(here.glob("test_*.py")) + sorted(here.glob("*/test_*.py")) + [here / "conftest.py"]:
    importlib.import_module(path.stem)
print("\\n".join(name for name, module in list(sys.modules.items()) if name != "__main__"
                 and getattr(module, "__file__", None) and not Path(module.__file__).resolve().is_relative_to(here)))
"""


def preload(threads):
    """Imports here, once, the libraries the tests import (not the project's own modules: their names come from a
    subprocess; only ddpo, which flag_mutants imports for the defaults, is in this process, and each fork drops it).
    Each mutant's pytest is then a fork of this process (Run) that imports only the project, from its copy: a fresh
    interpreter spends ~5-15 s of every mutant importing torch, diffusers and transformers. threads: set before
    torch's OpenMP reads it."""
    global PRELOADED
    import importlib

    if not hasattr(os, "fork"):
        return
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    names = subprocess.run([sys.executable, "-c", THIRD_PARTY], cwd=HERE, capture_output=True, text=True, check=True)
    for name in names.stdout.split():
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 (a module that imports only as part of another; its parent has it)
            pass
    PRELOADED = True


def forked_pytest(root, args, threads, out):
    """The pid of a fork of this process that runs pytest.main(args) in root, with the project's modules imported
    afresh from there, its output to the file out. The fork leads its own process group, so that a timeout stops
    what it started too. Only ever called from this process's one thread: a fork copies every lock as it is, and
    one held by another thread at that moment (stdout's, a module's import lock) would never be released in it."""
    import traceback

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 3  # the child: never returns
    try:
        os.setsid()
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        for name, module in list(sys.modules.items()):  # this checkout's modules (ddpo via flag_mutants)
            if name != "__main__" and Path(getattr(module, "__file__", None) or "/").resolve().is_relative_to(HERE):
                del sys.modules[name]
        sys.path[:] = [str(root)] + [p for p in sys.path if not Path(p or ".").resolve().is_relative_to(HERE)]
        os.chdir(root)
        if threads:
            import torch
            torch.set_num_threads(threads)
        import pytest as pytest_module
        code = int(pytest_module.main(args))
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Run:
    """One mutant's tests on a copy: its edits written, pytest started (a fork of this preloaded process, or a fresh
    interpreter), and on poll() once it has ended or run out of time, the copy's files put back."""

    def __init__(self, root, edits, tests, threads, timeout):
        self.root, self.edits, self.tests, self.timeout = root, edits, tests, timeout
        self.originals = {file: (root / file).read_text() for file in edits}
        for file, text in edits.items():
            (root / file).write_text(text)
        self.out = tempfile.TemporaryFile()
        # its own temporary folder, removed when it ends: a fork leaves through os._exit, which skips pytest's
        # clean-up of old sessions, and a mutant's failing tests keep theirs (about 1 GB per 100 mutants, else)
        self.basetemp = tempfile.mkdtemp(prefix="mutant-")
        args = [f"--basetemp={self.basetemp}", *pytest_args(tests, hang_report=max(timeout - 20, 10))]
        if PRELOADED:
            self.pid, self.process = forked_pytest(root, args, threads, self.out), None
        else:
            self.process = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=root, env=threads_env(threads),
                                            stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)
            self.pid = self.process.pid
        self.deadline = time.time() + timeout

    def _exit_code(self, block=False):
        if self.process:
            return self.process.wait() if block else self.process.poll()
        done, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        return os.waitstatus_to_exitcode(status) if done else None

    def poll(self):
        """None while running; else (pytest's exit code, None if it ran out of time; its output's last lines)."""
        code = self._exit_code()
        if code is None and time.time() < self.deadline:
            return None
        if code is None:  # out of time: SIGINT first (pytest then runs its fixtures' cleanup), then SIGKILL
            os.killpg(self.pid, signal.SIGINT)
            for _ in range(100):
                if self._exit_code() is not None:
                    break
                time.sleep(0.1)
            else:
                os.killpg(self.pid, signal.SIGKILL)
                self._exit_code(block=True)
        for file, text in self.originals.items():
            (self.root / file).write_text(text)
        shutil.rmtree(self.basetemp, ignore_errors=True)
        self.out.seek(0)
        lines = self.out.read().decode(errors="replace").strip().splitlines()
        self.out.close()
        if code is None:  # where it was: the stacks that pytest's faulthandler printed (innermost first), if any
            hung = max((i for i, line in enumerate(lines) if line.startswith("Timeout (")), default=len(lines))
            return None, f"timed out after {self.timeout:.0f} s: " + " | ".join(lines[hung:hung + 10] + lines[-3:])
        return code, " | ".join(lines[-3:])

    def stop(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(self.basetemp, ignore_errors=True)


def read_durations(text, durations):
    """Adds up pytest's --durations lines ("0.52s call     test_x.py::test_y[a]") per test function, in seconds."""
    for line in text.splitlines():
        parts = line.split(maxsplit=2)  # a case's id may hold spaces; under xdist a grouped one ends in @GROUP
        if len(parts) == 3 and re.fullmatch(r"[0-9.]+s", parts[0]) and parts[1] in ("call", "setup", "teardown"):
            function = function_of(parts[2])
            durations[function] = durations.get(function, 0.0) + float(parts[0][:-1])


def function_of(test):
    """A test's node id without its case or xdist group: test_x.py::test_y[a b]@torchrun -> test_x.py::test_y."""
    return re.sub(r"@\w+$", "", test).split("[")[0]


def edits_of(mutant):
    """({file: its wrong text}, None) for a mutant that can run, or (None, why not) as a verdict."""
    import flag_mutants

    if len(mutant) != 5:
        return flag_mutants.flag_mutant_edits(*mutant)
    name, file, right, wrong, tests = mutant
    original = (HERE / file).read_text()
    if original.count(right) != 1:
        return None, f"NOT APPLIED: the right code occurs {original.count(right)} times in {file} (update this mutant)"
    return {file: original.replace(right, wrong)}, None


def verdict(code, tail):
    if code == 1:
        return "caught"
    if code == 0:
        return "MISSED: every named test passed"
    return f"INCONCLUSIVE: pytest exit {code} (a test name that does not exist, or a hang?): {tail}"


def run_all(mutants, copies, threads, limit):
    """Yields (index, verdict, seconds) of each mutant as it ends, len(copies) running at once, each in a copy of
    its own. All from this one thread (see forked_pytest). One that runs out of time is run once more: a stall of
    the machine is not the mutant's."""
    waiting, running, free = list(enumerate(mutants)), {}, list(copies)
    try:
        while waiting or running:
            while waiting and free:
                i, mutant = waiting.pop(0)
                edits, why_not = edits_of(mutant)
                if why_not:
                    yield i, why_not, 0.0
                    continue
                running[i] = [Run(free.pop(), edits, mutant[-1], threads, limit(mutant[-1])), 1, time.time()]
            time.sleep(0.1)
            for i, (run, attempt, started) in list(running.items()):
                result = run.poll()
                if result is None:
                    continue
                if result[0] is None and attempt == 1:
                    running[i] = [Run(run.root, run.edits, run.tests, threads, run.timeout), 2, started]
                    continue
                del running[i]
                free.append(run.root)
                yield i, verdict(*result), time.time() - started
    finally:  # interrupted: nothing left running
        for run, *_ in running.values():
            run.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("words", nargs="*", help="run only the mutants whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="list the mutants and the tests that must catch them")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once, each in its own copy of the project "
                        "and with one thread per process when more than one (default: 2, for 2 cores)")
    kinds = parser.add_mutually_exclusive_group()  # flag_mutants.py: every ddpo.Args field read as its default
    kinds.add_argument("--flags", action="store_true", help="only the generated mutants, one per flag (flag_mutants.py)")
    kinds.add_argument("--no-flags", action="store_true", help="only the hand-written mutants above")
    parser.add_argument("--fresh", action="store_true", help="each mutant's pytest in a fresh interpreter, not in a "
                        "fork of one that has imported torch and the other libraries (slower by ~5 s a mutant)")
    parser.add_argument("--passed", metavar="LOG", help="the output of a whole-suite run with --durations=0 on this "
                        "same tree that passed (.ci/run's): it stands for the baseline, and gives the tests' times")
    opts = parser.parse_args()
    if opts.jobs < 1:
        parser.error(f"--jobs {opts.jobs}: must be at least 1")
    import flag_mutants

    everything = ([] if opts.flags else MUTANTS) + ([] if opts.no_flags else flag_mutants.generate())
    chosen = [m for m in everything if not opts.words or any(w.lower() in m[0].lower() for w in opts.words)]
    if opts.list:
        for name, file, *_, tests in chosen:  # a flag mutant's "file" is {file: its mutated text}
            print(f"{name}  ({file if isinstance(file, str) else ', '.join(file) or 'no reads'})  ←  "
                  f"{', '.join(tests) or 'NO TEST'}")
        return
    failures, start, threads = [], time.time(), (1 if opts.jobs > 1 else None)
    with tempfile.TemporaryDirectory() as tmp:
        copies = [Path(tmp) / f"project{i}" for i in range(opts.jobs)]
        for copy in copies:
            copy_project(copy)
        named, seconds = sorted({test for *_, tests in chosen for test in tests}), {}
        if opts.passed:  # the whole suite passed on this tree just before: the named tests with it
            log = Path(opts.passed).read_text()
            last = log.strip().splitlines()[-1] if log.strip() else ""
            if not re.search(r"\d+ passed", last) or re.search(r"failed|error", last):
                sys.exit(f"{opts.passed} is not a passing run of the suite: {last!r}")
            read_durations(log, seconds)
            print(f"baseline: the suite passed on this tree ({opts.passed}: {last.strip('= ')})", flush=True)
        else:
            code, tail = pytest(copies[0], named, threads, workers=opts.jobs if opts.jobs > 1 else 0,
                                durations=seconds)
            print(f"baseline: the {len(named)} named tests on the unchanged code: {'pass' if code == 0 else 'FAIL'} "
                  f"({time.time() - start:.0f} s)", flush=True)
            if code != 0:
                sys.exit(f"the named tests must pass before mutants mean anything: {tail}")
        # each mutant's tests fastest first, so that pytest -x stops at the first that fails and a caught mutant
        # costs little; but tests of refusals last, whatever their time: the checks stay as they are in a flag
        # mutant, so those seldom catch one, and one whose refusal a mutant skips may start a long run
        order = lambda test: (bool(flag_mutants.REFUSAL_TEST.search(test)), seconds.get(function_of(test), 0.0))  # noqa: E731
        chosen = [(*m[:-1], sorted(m[-1], key=order)) for m in chosen]
        if not opts.fresh:
            preload(threads)

        def limit(tests):  # a mutant may make its tests slower, not endless: 4 x their passing time and 2 minutes
            known = [seconds.get(function_of(test)) for test in tests]  # (a test's own waits are up to 200 s)
            return 600.0 if None in known else min(600.0, 120 + 4 * sum(known))

        done, shown = {}, 0
        for i, outcome, took in run_all(chosen, copies, threads, limit):
            done[i] = outcome, took
            while shown in done:  # in the mutants' order
                (outcome, took), mutant = done.pop(shown), chosen[shown]
                shown += 1
                print(f"[{shown:2d}/{len(chosen)}] {outcome:8.8s} {mutant[0]} ({took:.0f} s)"
                      + ("" if outcome.startswith("caught") else f"\n        {outcome}"), flush=True)
                if not outcome.startswith("caught"):
                    failures.append(mutant[0])
    print(f"mutation check: {len(chosen) - len(failures)} of {len(chosen)} wrong versions caught "
          f"in {time.time() - start:.0f} s")
    if failures:
        sys.exit(f"not caught: {'; '.join(failures)}")


if __name__ == "__main__":
    main()
