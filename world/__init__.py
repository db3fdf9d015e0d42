"""The toy world: its picture generator and the rebuild commands (tiny_world.py), and the two built-in models they
made, which --model names: 'tiny' (a Stable Diffusion v1) and 'tiny-flow' (a Stable Diffusion 3)."""
from pathlib import Path

WORLD = Path(__file__).resolve().parent
TINY_MODELS = {"tiny": WORLD / "tiny_model", "tiny-flow": WORLD / "tiny_flow_model"}
JUDGES = WORLD / "judges"  # the tiny judges (world/judges.py): a CLIP and LAION's aesthetic head, trained on the world
TINY_JUDGES = {"clip_model": JUDGES / "clip", "aesthetic_head": JUDGES / "aesthetic-model.pth",
               "pickscore_model": JUDGES / "clip", "pickscore_processor": JUDGES / "clip"}
