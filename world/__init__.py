"""The toy world: its picture generator and the rebuild commands (tiny_world.py), and the built-in models they made,
which --model names: 'tiny' (a Stable Diffusion v1) and 'tiny-flow' (a Stable Diffusion 3) on the plain world, and
'tiny-activities' (a Stable Diffusion v1) on the world with activities, for the alignment experiments."""
from pathlib import Path

WORLD = Path(__file__).resolve().parent
TINY_MODELS = {"tiny": WORLD / "tiny_model", "tiny-flow": WORLD / "tiny_flow_model",
               "tiny-activities": WORLD / "tiny_activities_model"}
JUDGES = WORLD / "judges"  # the tiny judges (world/judges.py, world/alignment_judges.py)
ALIGNMENT_JUDGES = {"vlm": JUDGES / "vlm", "bertscore_model": JUDGES / "bertscore"}  # one pair, which learned the
# world with activities (alignment_judges.py, which also leaves the independent classifier in judges/attributes)
TINY_JUDGES = {  # what --clip-model tiny (etc.) names, and --clip-model tiny-activities: each world's own judges
    # the plain world's CLIP and LAION's aesthetic head (judges.py)
    "tiny": {"clip_model": JUDGES / "clip", "aesthetic_head": JUDGES / "aesthetic-model.pth",
             "pickscore_model": JUDGES / "clip", "pickscore_processor": JUDGES / "clip", **ALIGNMENT_JUDGES},
    # the world with activities' own CLIP and aesthetic head (judges.py, world="activities")
    "tiny-activities": {"clip_model": JUDGES / "activities" / "clip",
                        "aesthetic_head": JUDGES / "activities" / "aesthetic-model.pth",
                        "pickscore_model": JUDGES / "activities" / "clip",
                        "pickscore_processor": JUDGES / "activities" / "clip", **ALIGNMENT_JUDGES},
}
JUDGE_OPTIONS = tuple(TINY_JUDGES["tiny"])  # the model options (rewards.MODEL_OPTIONS) that the toy world serves
MODEL_JUDGES = {"tiny": "tiny", "tiny-flow": "tiny", "tiny-activities": "tiny-activities"}  # each model's judges
WORLD_MODELS = {"plain": "tiny", "activities": "tiny-activities"}  # each world's built-in DDIM model, and judge set
