"""The toy world: its picture generator and the rebuild commands (tiny_world.py), and the built-in models they made,
which --model names: 'tiny' (a Stable Diffusion v1) and 'tiny-flow' (a Stable Diffusion 3) on the plain world, and
'tiny-activities' (a Stable Diffusion v1) on the world with activities, for the alignment experiments."""
from pathlib import Path

WORLD = Path(__file__).resolve().parent
TINY_MODELS = {"tiny": WORLD / "tiny_model", "tiny-flow": WORLD / "tiny_flow_model",
               "tiny-activities": WORLD / "tiny_activities_model"}
JUDGES = WORLD / "judges"  # the tiny judges, what --clip-model tiny (etc.) names: trained on the plain world, a CLIP
# and LAION's aesthetic head (world/judges.py); on the world with activities, the VLM and BERTScore's encoder
# (world/alignment_judges.py, which also leaves the independent classifier in judges/attributes)
TINY_JUDGES = {"clip_model": JUDGES / "clip", "aesthetic_head": JUDGES / "aesthetic-model.pth",
               "pickscore_model": JUDGES / "clip", "pickscore_processor": JUDGES / "clip",
               "vlm": JUDGES / "vlm", "bertscore_model": JUDGES / "bertscore"}
