"""The toy world: its picture generator and the rebuild commands (tiny_world.py), and the two built-in models they
made, which --model names: 'tiny' (a Stable Diffusion v1) and 'tiny-flow' (a Stable Diffusion 3)."""
from pathlib import Path

WORLD = Path(__file__).resolve().parent
TINY_MODELS = {"tiny": WORLD / "tiny_model", "tiny-flow": WORLD / "tiny_flow_model"}
