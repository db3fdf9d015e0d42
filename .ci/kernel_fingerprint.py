"""Prints a fingerprint of one short rollout of the tiny model (8 samples, 3 DDIM steps, one thread): the sums of
its final latents and of its log-probs, to full precision. .ci/run prints it under the default kernels and under
the second kernel path (ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41), and fails if the two are equal: the
second run of the suite stands in for another machine only if its low-order bits really differ."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddpo  # noqa: E402

torch.set_num_threads(1)
models = ddpo.load_models("tiny", "cpu")
args = ddpo.parse_args(["--num-steps", "3"])
traj = ddpo.rollout(models, ["a cat"] * 4 + ["a dog"] * 4, args, ddpo.noise_generators(0, range(8)))
print(f"{traj.states[:, -1].double().sum().item()!r} {traj.log_probs.double().sum().item()!r}")
