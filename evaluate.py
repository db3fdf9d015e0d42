"""A fine-tuned run beside its base model: the paper's Fig. 3 and its generalisation check in one command.

    python evaluate.py runs/NAME                                 # its training prompts and its reward's held-out set
    python evaluate.py runs/NAME --eval-prompts unseen_animals --seed 1

Both models sample the same 16 prompts of each set with the same noise (a stream of its own, never a training
sample's), in the run's precision unless --mixed-precision is given. Writes RUN/eval/train.png and heldout.png
(base | fine-tuned side by side, each captioned with its reward, and under it the reward's "answer" where its
extras have one, as alignment's VLM answers: the paper's Fig. 5-6; two lines of 21 characters, so a long answer is
cut) and RUN/eval/eval.json (the mean rewards).
--judge scores the same pictures with a second reward that is not the run's (captioned "reward / judge"), to see
whether what the reward rose for is what was wanted; with the toy world's rater, or its attribute classifier:
    python evaluate.py runs/NAME --judge world.judges:taste          # a run of tiny or tiny-flow
    python evaluate.py runs/NAME --judge world.judges:scene_taste    # the same rater, a run of tiny-activities
    python evaluate.py runs/NAME --judge world.alignment_judges:shows_activity
"""
import dataclasses
import json
import os
import random
import textwrap
from pathlib import Path

import torch

import ddpo
from plumbing.command_line import ArgumentParser, HelpFormatter, device_problem
from plumbing.files import RunError, atomic_folder, fail, why, write_text
from plumbing.model_checks import check_scheduler, quiet_libraries
from plumbing.pictures import save_grid
from plumbing.processes import clear_bars
from rewards import HELDOUT_PROMPTS, compute_rewards, load_prompts


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("run", help="a run folder, e.g. runs/jpeg__is__0__1764000000")
    p.add_argument("--eval-prompts", default="", help="held-out prompt set; default: the run's reward's "
                                                      "generalisation set (rewards.HELDOUT_PROMPTS)")
    p.add_argument("--seed", type=int, default=0, help="fixes the prompts drawn and the noise, the same for both models")
    p.add_argument("--judge", default="", help="a second reward (a --reward name or module:function, e.g. "
                   "world.judges:taste) that scores the same pictures beside the run's; its models as the run's flags say")
    p.add_argument("--device", default=ddpo.Args.device, help="torch device")
    p.add_argument("--mixed-precision", choices=tuple(ddpo.PRECISIONS), default=None,
                   help="no | fp16 | bf16; default: the run's own")
    args = p.parse_args(argv)
    if args.seed < 0:
        p.error(f"--seed {args.seed} is out of range (must be ≥ 0)")
    if problem := device_problem(args.device):
        fail(problem)
    return args


def base_and_tuned(run, args):
    """("base", models), then ("tuned", models). With LoRA they are one model, its adapter switched off for the
    base (exactly the base model, tested): one UNet in memory and one load. A fully fine-tuned UNet is loaded
    after the base one is released."""
    if run.lora_rank > 0:
        models = ddpo.load_models(args.run, args.device, mixed_precision=run.mixed_precision)  # base + adapter
        models.denoiser.disable_adapters()
        yield "base", models
        models.denoiser.enable_adapters()
        yield "tuned", models
    else:
        yield "base", ddpo.load_models(run.model, args.device, mixed_precision=run.mixed_precision)
        yield "tuned", ddpo.load_models(args.run, args.device, mixed_precision=run.mixed_precision)


def evaluate(args):
    """Sample, score and draw both models on both prompt sets; returns eval.json's summary."""
    quiet_libraries()
    run = ddpo.load_run_args(args.run)
    run.device, run.mixed_precision = args.device, args.mixed_precision or run.mixed_precision
    reward_fn = ddpo.load_reward(run)
    judge_fn = args.judge and ddpo.load_reward(dataclasses.replace(run, reward=args.judge))
    names = {"train": run.prompts, "heldout": args.eval_prompts or HELDOUT_PROMPTS.get(run.reward, "unseen_animals")}
    prompt_sets = {name: load_prompts(spec) for name, spec in names.items()}
    out = Path(args.run) / "eval"
    results = {}
    for which, models in base_and_tuned(run, args):
        if problem := check_scheduler(models.scheduler, run.num_steps):
            fail(f"cannot use model {run.model}: its {problem}")
        for name, prompt_set in prompt_sets.items():
            prompts = random.Random(args.seed).choices(prompt_set, k=16)
            noise = ddpo.noise_generators(args.seed, range(len(prompts)), stream=2)  # the same for base and tuned
            _, images = ddpo.sample(models, prompts, run, noise, run.sample_batch_size, f"{which} {name}")
            r, extras = compute_rewards(reward_fn, run.reward, images, prompts)
            judged = compute_rewards(judge_fn, args.judge, images, prompts)[0] if judge_fn else None
            results.setdefault(name, {})[which] = (images, r, judged, extras.get("answer"))
        del models  # one UNet in memory at a time
    summary = {}
    with atomic_folder(out) as tmp:  # the grids and eval.json of one evaluation together, or the older ones kept
        for name, res in results.items():
            (base_images, base_r, base_j, base_a), (tuned_images, tuned_r, tuned_j, tuned_a) = res["base"], res["tuned"]
            images = torch.stack([base_images, tuned_images], 1).flatten(0, 1)  # base, tuned, base, tuned, …
            judged = (base_j.tolist(), tuned_j.tolist()) if judge_fn else ([None] * len(base_r),) * 2
            answers = (base_a, tuned_a) if base_a else ([None] * len(base_r),) * 2  # a VLM's (alignment's), as Fig. 5
            captions = [f"{w} {v:.3g}" + (f" / {j:.3g}" if j is not None else "")  # reward / judge
                        + ("\n" + "\n".join(textwrap.wrap(a, 21)[:2]) if a is not None else "")  # and the answer
                        for b, t, bj, tj, ba, ta in zip(base_r.tolist(), tuned_r.tolist(), *judged, *answers)
                        for w, v, j, a in (("base", b, bj, ba), ("tuned", t, tj, ta))]
            save_grid(images, captions, tmp / f"{name}.png")
            summary[name] = {"prompts": names[name], "base_reward_mean": base_r.mean().item(),
                             "tuned_reward_mean": tuned_r.mean().item()}
            line = f"{name:8s} ({summary[name]['prompts']}): base {base_r.mean():.4g} → fine-tuned {tuned_r.mean():.4g}"
            if judge_fn:
                summary[name].update(judge=args.judge, base_judge_mean=base_j.mean().item(),
                                     tuned_judge_mean=tuned_j.mean().item())
                line += f"; judge {args.judge}: base {base_j.mean():.4g} → fine-tuned {tuned_j.mean():.4g}"
            print(line)
        write_text(tmp / "eval.json", json.dumps(summary, indent=2) + "\n")
    print(f"grids and eval.json in {out}")
    return summary


def main(argv=None):
    """The command line; also callable as evaluate.main([...]) from Python."""
    try:
        args = parse_args(argv)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            fail("evaluate.py runs in one process: python evaluate.py, not torchrun")
        return evaluate(args)
    except RunError as e:  # a reward that raises or returns NaN, non-finite samples
        fail(str(e))
    except OSError as e:  # its folder cannot be written (read-only, a full disk)
        fail(why(e))
    finally:
        clear_bars()


if __name__ == "__main__":
    main()
