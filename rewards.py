"""Reward functions r(x_0, c) for DDPO (paper §5.1–5.3) and the rewards later work uses most.

Every reward is a plain callable: reward(images, prompts) -> float32 tensor (B,) on CPU, or a pair
(rewards, extras) where extras maps a name to one value per sample (e.g. the VLM's answers), logged next to
the sample grid so a user can see *why* an image scored as it did. images is a float tensor (B, 3, H, W) in
[0, 1], prompts a list of B strings.

REWARDS maps the --reward name to a function, or to a class whose models are loaded once, in-process, by
make_reward() before any sampling. DEFAULT_PROMPTS maps it to the prompt set the paper used for that task;
load_prompts reads a set. compute_rewards is the contract: it checks what a reward returns on every call.
"""
import io
import json
import math
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from plumbing.files import RunError, fail, why
from world import JUDGE_OPTIONS, TINY_JUDGES


def to_pil(images):
    """(B, 3, H, W) floats in [0, 1] → list of RGB PIL images (uint8, rounded)."""
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def jpeg_bytes(img, quality):
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def jpeg_kilobytes(images):
    """Size of each image saved as JPEG at quality 95, in kB (bytes / 1000), as the paper measures it."""
    return torch.tensor([len(jpeg_bytes(img, 95)) / 1000 for img in to_pil(images)], dtype=torch.float32)


def jpeg_compressibility(images, prompts):
    """Paper §5.1 compressibility: r = −(JPEG size in kB)."""
    return -jpeg_kilobytes(images)


def jpeg_incompressibility(images, prompts):
    """Paper §5.1 incompressibility: r = +(JPEG size in kB)."""
    return jpeg_kilobytes(images)


# --------------------------------------------------------------------------------------------------------
# Learned rewards: models from the hub (or local folders), loaded once on the run's device
# --------------------------------------------------------------------------------------------------------

class RewardLoadError(Exception):
    pass


def from_pretrained(loader, model_id, flag, **kwargs):
    """loader.from_pretrained(model_id) with one clear message when the model cannot be had."""
    try:
        return loader.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RewardLoadError(f"cannot load {model_id!r} ({reason}); without network pass a local folder "
                              f"with {flag}") from None


def dtype_for(device):
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def batched(n, size):
    return [slice(i, i + size) for i in range(0, n, size)]


def aesthetic_mlp():
    """The LAION improved aesthetic predictor v2 head (sac+logos+ava1-l14-linearMSE): 768→1024→128→64→16→1.

    The original has dropout between the layers and no activations; dropout is inactive at inference.
    """
    return torch.nn.Sequential(
        torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()


class Aesthetic:
    """Paper §5.2: LAION aesthetic score (1–10) of the L2-normalised CLIP ViT-L/14 image embedding."""
    OPTIONS = ("clip_model", "aesthetic_head")
    HEAD_FILE = "aesthetic-model.pth"

    def __init__(self, device, clip_model, aesthetic_head):
        from transformers import CLIPImageProcessor, CLIPModel

        self.device = device
        self.processor = from_pretrained(CLIPImageProcessor, clip_model, "--clip-model")
        self.clip = from_pretrained(CLIPModel, clip_model, "--clip-model", dtype=dtype_for(device)).to(device).eval()
        self.head = aesthetic_mlp()
        # state dict keys are layers.0.weight …: the original module kept the Sequential as .layers
        state = {k.removeprefix("layers."): v for k, v in torch.load(self.head_file(aesthetic_head), weights_only=True).items()}
        self.head.load_state_dict(state)
        self.head.to(device)

    def head_file(self, spec):
        if Path(spec).is_file():
            return spec
        try:
            from huggingface_hub import hf_hub_download
            return hf_hub_download(spec, self.HEAD_FILE)
        except Exception as e:  # huggingface_hub raises several kinds for offline / missing files
            raise RewardLoadError(f"cannot load the aesthetic head {spec!r} ({type(e).__name__}); without network pass "
                                  f"a local {self.HEAD_FILE} with --aesthetic-head") from None

    @torch.no_grad()
    def embed(self, images):
        pixels = self.processor(images=to_pil(images), return_tensors="pt").pixel_values
        features = self.clip.get_image_features(pixel_values=pixels.to(self.device, self.clip.dtype)).pooler_output
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def score(self, embeddings):
        return self.head(embeddings.float()).squeeze(-1).cpu()

    def __call__(self, images, prompts):
        return torch.cat([self.score(self.embed(images[s])) for s in batched(len(images), 32)])


class ClipSimilarity:
    """Cosine similarity of CLIP image and text embeddings (CLIPScore without the 2.5 rescaling)."""
    OPTIONS = ("clip_model",)
    scaled = False  # PickScore multiplies by CLIP's learned logit scale

    def __init__(self, device, clip_model, processor=None, flag="--clip-model"):
        from transformers import AutoProcessor, CLIPModel

        self.device = device
        self.processor = from_pretrained(AutoProcessor, processor or clip_model, flag)
        self.clip = from_pretrained(CLIPModel, clip_model, flag, dtype=dtype_for(device)).to(device).eval()

    @torch.no_grad()
    def __call__(self, images, prompts):
        scores = []
        for s in batched(len(images), 32):
            inputs = self.processor(text=prompts[s], images=to_pil(images[s]), padding=True, truncation=True,
                                    return_tensors="pt").to(self.device)
            image = self.clip.get_image_features(pixel_values=inputs.pixel_values.to(self.clip.dtype)).pooler_output
            text = self.clip.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).pooler_output
            cosine = F.cosine_similarity(image.float(), text.float(), dim=-1)
            scores.append(cosine * self.clip.logit_scale.exp().float() if self.scaled else cosine)
        return torch.cat(scores).cpu()


class PickScore(ClipSimilarity):
    """PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on human preferences; logit_scale · cosine."""
    OPTIONS = ("pickscore_model", "pickscore_processor")
    scaled = True

    def __init__(self, device, pickscore_model, pickscore_processor):
        super().__init__(device, pickscore_model, pickscore_processor, "--pickscore-model / --pickscore-processor")


class ImageReward:
    """ImageReward (Xu et al. 2023), DPOK's reward: a BLIP ViT image encoder, a BERT text encoder that
    cross-attends to the image tokens, and an MLP on the text's [CLS] state, standardised with the published
    mean and std. Written on transformers' BLIP modules (BlipVisionModel, BlipTextModel), because the
    `image-reward` package pins timm 0.6.13 and needs fairscale; it loads the published checkpoint as it is:
    ImageReward.pt (the original module names, mapped below) and med_config.json, from a hub repo or a folder.
    """
    OPTIONS = ("imagereward_model", "imagereward_tokenizer")
    MEAN, STD = 0.16717362830052426, 1.0333394966054072  # the published standardisation of the MLP's output
    VISION_PREFIXES = [("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
                       ("patch_embed.proj.", "embeddings.patch_embedding."), ("blocks.", "encoder.layers."),
                       ("norm.", "post_layernorm.")]  # the original BLIP ViT's (timm) names → BlipVisionModel's
    VISION_INFIXES = [(".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."), (".attn.qkv.", ".self_attn.qkv."),
                      (".attn.proj.", ".self_attn.projection.")]

    def __init__(self, device, imagereward_model, imagereward_tokenizer):
        from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel
        from transformers import BlipImageProcessorPil as BlipImageProcessor  # PIL's bicubic, as the original

        self.device = device
        try:
            state = torch.load(self.file(imagereward_model, "ImageReward.pt"), map_location="cpu", weights_only=True)
            med = json.loads(Path(self.file(imagereward_model, "med_config.json")).read_text())
            vision = {self.vision_name(k.removeprefix("blip.visual_encoder.")): v for k, v in state.items()
                      if k.startswith("blip.visual_encoder.")}
            text = {k.removeprefix("blip.text_encoder."): v for k, v in state.items()
                    if k.startswith("blip.text_encoder.") and not k.endswith("position_ids")}
            head = {k.removeprefix("mlp.layers."): v for k, v in state.items() if k.startswith("mlp.layers.")}
            width, patch = vision["embeddings.patch_embedding.weight"].shape[0], vision["embeddings.patch_embedding.weight"].shape[-1]
            grid = round(math.sqrt(vision["embeddings.position_embedding"].shape[1] - 1))
            med = {k: med[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                       "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")}
        except RewardLoadError:
            raise
        except Exception as e:  # unreadable, not a state dict, or missing the names and settings ImageReward has
            raise RewardLoadError(f"cannot read ImageReward.pt / med_config.json from {imagereward_model!r} "
                                  f"({why(e)})") from None
        self.vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=width, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=len({k.split(".")[2] for k in vision if k.startswith("encoder.layers.")}),
            num_attention_heads=width // 64, image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6))  # ViT-B/L: 64 per head
        self.text = BlipTextModel(BlipTextConfig(
            vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=width,
            intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
            num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
            layer_norm_eps=med["layer_norm_eps"], hidden_act=med["hidden_act"], pad_token_id=med["pad_token_id"],
            bos_token_id=None, sep_token_id=None, is_decoder=True), add_pooling_layer=False)  # is_decoder: cross-attention layers
        self.head = aesthetic_mlp()  # the same 768→1024→128→64→16→1 stack as LAION's
        self.head[0] = torch.nn.Linear(med["hidden_size"], 1024)
        for module, weights in ((self.vision, vision), (self.text, text), (self.head, head)):
            try:
                module.load_state_dict(weights)
            except RuntimeError as e:
                raise RewardLoadError(f"{imagereward_model!r} is not an ImageReward checkpoint ({str(e).splitlines()[0]})") from None
            module.to(device, dtype_for(device) if module is not self.head else torch.float32).eval()  # the MLP in fp32
        self.processor = BlipImageProcessor(size={"height": grid * patch, "width": grid * patch})  # bicubic, CLIP's mean/std
        self.tokenizer = from_pretrained(AutoTokenizer, imagereward_tokenizer, "--imagereward-tokenizer")

    @classmethod
    def vision_name(cls, name):
        for old, new in cls.VISION_PREFIXES:
            name = new + name[len(old):] if name.startswith(old) else name
        for old, new in cls.VISION_INFIXES:
            name = name.replace(old, new)
        return name

    @staticmethod
    def file(spec, name):
        if (Path(spec) / name).is_file():
            return Path(spec) / name
        try:
            from huggingface_hub import hf_hub_download
            return hf_hub_download(spec, name)
        except Exception as e:
            raise RewardLoadError(f"cannot load {name} of {spec!r} ({type(e).__name__}); without network pass a local "
                                  f"folder holding ImageReward.pt and med_config.json with --imagereward-model") from None

    @torch.no_grad()
    def __call__(self, images, prompts):
        scores = []
        for s in batched(len(images), 32):
            pixels = self.processor(images=to_pil(images[s]), return_tensors="pt").pixel_values
            image_tokens = self.vision(pixel_values=pixels.to(self.device, self.vision.dtype)).last_hidden_state
            text = self.tokenizer(prompts[s], padding="max_length", truncation=True, max_length=35,
                                  return_tensors="pt").to(self.device)
            hidden = self.text(input_ids=text.input_ids, attention_mask=text.attention_mask,
                               encoder_hidden_states=image_tokens,
                               encoder_attention_mask=torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=self.device))
            scores.append((self.head(hidden.last_hidden_state[:, 0].float()).squeeze(-1) - self.MEAN) / self.STD)
        return torch.cat(scores).cpu()


class BERTScore:
    """BERTScore recall (Zhang et al. 2020) written out: greedy cosine matching of contextual token embeddings.

    recall = mean over reference tokens (no [CLS]/[SEP]) of the best cosine with any candidate token; no idf,
    no baseline rescaling. Like the bert-score package, the embeddings come from one layer of the model.
    """
    LAYERS = {"microsoft/deberta-xlarge-mnli": 40}  # bert-score's choice for its default model

    def __init__(self, device, model_id):
        from transformers import AutoModel, AutoTokenizer

        self.device = device
        self.tokenizer = from_pretrained(AutoTokenizer, model_id, "--bertscore-model")
        self.model = from_pretrained(AutoModel, model_id, "--bertscore-model", dtype=dtype_for(device)).to(device).eval()
        self.layer = self.LAYERS.get(model_id, self.model.config.num_hidden_layers)

    @torch.no_grad()
    def embed(self, sentences):
        tok = self.tokenizer(sentences, padding=True, truncation=True, return_tensors="pt",
                             return_special_tokens_mask=True).to(self.device)
        hidden = self.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                            output_hidden_states=True).hidden_states[self.layer]
        return F.normalize(hidden.float(), dim=-1), tok.attention_mask.bool(), tok.special_tokens_mask.bool()

    def recall(self, candidates, references):
        cand, cand_mask, _ = self.embed(candidates)  # (B, Lc, D)
        ref, ref_mask, ref_special = self.embed(references)  # (B, Lr, D)
        sim = torch.bmm(ref, cand.transpose(1, 2)) * (ref_mask[:, :, None] & cand_mask[:, None, :])  # (B, Lr, Lc)
        best = sim.max(dim=2).values  # each reference token's best match
        weight = (ref_mask & ~ref_special).float()
        return ((best * weight).sum(1) / weight.sum(1)).cpu()


class Alignment:
    """Paper §5.3 (RLAIF): a VLM describes the image; r = BERTScore recall of the description against the prompt.

    As in the original server, images go to the VLM JPEG-compressed at quality 80.
    """
    OPTIONS = ("vlm", "bertscore_model")
    QUESTION = "Answer concisely: what is going on in this image?"

    def __init__(self, device, vlm, bertscore_model):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = device
        self.processor = from_pretrained(AutoProcessor, vlm, "--vlm")
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row from its end
        self.vlm = from_pretrained(AutoModelForImageTextToText, vlm, "--vlm", dtype=dtype_for(device)).to(device).eval()
        self.bertscore = BERTScore(device, bertscore_model)

    @staticmethod
    def as_sent(images):
        """The pictures as the original server received them: JPEG at quality 80, decoded (PIL images)."""
        return [Image.open(io.BytesIO(jpeg_bytes(img, 80))) for img in to_pil(images)]

    @torch.no_grad()
    def describe(self, images):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.QUESTION}]}]
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        pictures = self.as_sent(images)
        inputs = self.processor(images=pictures, text=[text] * len(pictures), padding=True,
                                return_tensors="pt").to(self.device, self.vlm.dtype)
        out = self.vlm.generate(**inputs, max_new_tokens=32, do_sample=False)
        return [a.strip() for a in self.processor.batch_decode(out[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)]

    def __call__(self, images, prompts):
        answers = sum((self.describe(images[s]) for s in batched(len(images), 8)), [])
        scores = self.bertscore.recall(answers, [f"The image contains {p}" for p in prompts])
        return scores, {"answer": answers}


REWARDS = {
    "jpeg": jpeg_compressibility,
    "compressibility": jpeg_compressibility,  # the paper's name; "jpeg" is kept for existing runs and commands
    "incompressibility": jpeg_incompressibility,
    "aesthetic": Aesthetic,
    "alignment": Alignment,
    "clipscore": ClipSimilarity,
    "pickscore": PickScore,
    "imagereward": ImageReward,
}

DEFAULT_PROMPTS = {  # paper §6: the prompt distribution p(c) of each task
    "jpeg": "imagenet_animals",
    "compressibility": "imagenet_animals",
    "incompressibility": "imagenet_animals",
    "aesthetic": "simple_animals",
    "alignment": "alignment",
    "clipscore": "alignment",
    "pickscore": "simple_animals",
    "imagereward": "simple_animals",
}

HELDOUT_PROMPTS = {  # the paper's generalisation checks: prompts the fine-tuning never saw
    "jpeg": "everyday_objects",
    "compressibility": "everyday_objects",
    "incompressibility": "everyday_objects",
    "aesthetic": "everyday_objects",
    "alignment": "alignment_unseen_activities",
    "clipscore": "alignment_unseen_activities",
    "pickscore": "unseen_animals",
    "imagereward": "unseen_animals",
}

MODEL_OPTIONS = {  # the model of each learned reward: a --flag, a hub id by default, or a local folder; 'tiny' and
    # 'tiny-activities' name the toy world's judges (world.TINY_JUDGES) where there are some
    "clip_model": ("openai/clip-vit-large-patch14", "CLIP for aesthetic and clipscore"),
    "aesthetic_head": ("trl-lib/ddpo-aesthetic-predictor", "LAION aesthetic MLP: hub repo holding "
                       "aesthetic-model.pth, or a local .pth file"),
    "vlm": ("llava-hf/llava-1.5-7b-hf", "image-to-text model that describes images for alignment (the tiny one "
            "learned the pictures of --model tiny-activities)"),
    "bertscore_model": ("microsoft/deberta-xlarge-mnli", "text encoder of alignment's BERTScore (the tiny one learned "
                        "the sentences of tiny-activities' world)"),
    "pickscore_model": ("yuvalkirstain/PickScore_v1", "PickScore CLIP model"),
    "pickscore_processor": ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "PickScore's processor"),
    "imagereward_model": ("THUDM/ImageReward", "ImageReward: hub repo or folder holding ImageReward.pt and med_config.json"),
    "imagereward_tokenizer": ("bert-base-uncased", "ImageReward's BERT tokenizer"),
}


def model_option(name):
    """ddpo.Args' default and --help of a model option: its hub id, or '' (unset) where the toy world has a judge,
    which the command line's completion fills in: the tiny model's own judges, the hub id otherwise."""
    default, help = MODEL_OPTIONS[name]
    if name not in JUDGE_OPTIONS:
        return default, help
    return "", (f"{help}; default: the tiny model's own judge ('tiny', or 'tiny-activities' with --model "
                f"tiny-activities), else {default}")


def import_reward(spec):
    """Your own reward: "module:name" (a module on the path or in the current folder) or "path/to/file.py:name"."""
    import importlib
    import importlib.util
    import os
    import sys

    where, _, attr = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            if module_spec is None or not Path(where).is_file():
                raise FileNotFoundError(f"no file {where}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module  # as an import would (dataclasses and pickle look it up there)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # `python ddpo.py` puts only its own folder on the path
                sys.path.append(os.getcwd())
            module = importlib.import_module(where)
        reward = getattr(module, attr)
    except Exception as e:  # ImportError, a SyntaxError in the file, AttributeError, …
        raise RewardLoadError(f"cannot import it ({why(e)})") from None
    if not callable(reward):
        raise RewardLoadError(f"{attr} in {where} is a {type(reward).__name__}, not a function or class")
    return reward


def make_reward(name, device, **options):
    """The callable for --reward name; a learned reward loads its models here, before any sampling. A name with a
    colon is your own reward, imported: a function reward(images, prompts), or a class built as Class(device) (or with
    the MODEL_OPTIONS named in its OPTIONS) whose instances are called so."""
    if ":" in name:
        reward = import_reward(name)
    elif name in REWARDS:
        reward = REWARDS[name]
    else:
        raise KeyError(f"unknown reward {name!r}; known rewards: {', '.join(REWARDS)}")
    if isinstance(reward, type):
        wanted = getattr(reward, "OPTIONS", ())
        defaults = {k: MODEL_OPTIONS[k][0] for k in wanted if k in MODEL_OPTIONS}
        chosen = {**defaults, **{k: v for k, v in options.items() if k in wanted and v}}  # '': unset
        for k, v in chosen.items():  # 'tiny', 'tiny-activities': the judges trained on the toy world
            if v in TINY_JUDGES:
                if k not in TINY_JUDGES[v]:
                    raise RewardLoadError(f"the toy world has no tiny judge for --{k.replace('_', '-')}; name a "
                                          f"model or a local folder")
                chosen[k] = str(TINY_JUDGES[v][k])
        return reward(device, **chosen)
    return reward


# --------------------------------------------------------------------------------------------------------
# Prompt sets p(c) (paper §6): prompts/<name>.txt, one prompt a line, or the alignment task's products
# --------------------------------------------------------------------------------------------------------

PROMPTS = Path(__file__).resolve().parent / "prompts"  # the prompt sets: <name>.txt, one prompt a line


def read_prompt_file(path):
    """One prompt a line (blank lines skipped); a missing, unreadable, binary or empty file is one line."""
    path = Path(path)
    if not path.is_file():
        fail(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"prompt file {path} cannot be read as UTF-8 text ({why(e)})")
    if "\0" in text:
        fail(f"prompt file {path} is not a text file (it holds NUL bytes)")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        fail(f"prompt file {path} has no prompts")
    return prompts


def with_article(subject):
    """'a cat', 'an owl': the article the alignment prompts (and the tiny VLM's answers) put before a subject."""
    return f"{'an' if subject[0] in 'aeiou' else 'a'} {subject}"


def alignment_prompts(activities_file, animals_file=PROMPTS / "simple_animals.txt"):
    """Paper §5.3: "a(n) [animal] [activity]" from a file of animals (the 45 simple animals) and one of activities."""
    animals = read_prompt_file(animals_file)
    return [f"{with_article(a)} {act}" for a in animals for act in read_prompt_file(activities_file)]


PROMPT_SETS = {  # sets built from two files; every prompts/<name>.txt is a set too
    "alignment": lambda: alignment_prompts(PROMPTS / "activities.txt"),
    "alignment_unseen_activities": lambda: alignment_prompts(PROMPTS / "unseen_activities.txt"),  # paper §6.3
    "alignment_unseen_animals": lambda: alignment_prompts(PROMPTS / "activities.txt", PROMPTS / "unseen_animals.txt"),
}


def load_prompts(spec):
    """A prompt set by name (prompts/<name>.txt or PROMPT_SETS) or a path to a text file, one prompt a line."""
    if spec in PROMPT_SETS:
        return PROMPT_SETS[spec]()
    if (PROMPTS / f"{spec}.txt").is_file():
        return read_prompt_file(PROMPTS / f"{spec}.txt")
    if not Path(spec).is_file():
        names = sorted([p.stem for p in PROMPTS.glob("*.txt")] + list(PROMPT_SETS))
        fail(f"prompt file or set {spec!r} does not exist; known sets: {', '.join(names)}")
    return read_prompt_file(spec)


# --------------------------------------------------------------------------------------------------------
# The reward contract: what train() accepts from a reward, checked on every call
# --------------------------------------------------------------------------------------------------------

def compute_rewards(reward_fn, name, images, prompts):
    """r(x_0, c) and per-sample extras (a dict of sequences, one value a sample); stops the run on an exception, a
    wrong shape, extras that are not one a sample, or a non-finite value, naming the sample (a batch that raises is
    retried one sample at a time to find it)."""
    try:
        out = reward_fn(images, prompts)
    except Exception as e:
        traceback.print_exc()  # the reward's own traceback, then our one line
        culprit = next((i for i in range(len(prompts)) if raises(reward_fn, images[i:i + 1], prompts[i:i + 1])), None)
        which = f"sample {culprit} (prompt {prompts[culprit]!r})" if culprit is not None else f"a batch of {len(prompts)}"
        raise RunError(f"reward {name!r} raised {why(e)} on {which}") from e
    if isinstance(out, tuple) and (len(out) != 2 or not isinstance(out[1], dict)):
        raise RunError(f"reward {name!r} returned a tuple that is not (rewards, a dict of per-sample extras)")
    r, extras = out if isinstance(out, tuple) else (out, {})
    for k, v in extras.items():  # one per sample: the grids caption sample i with v[i]
        n = len(v) if hasattr(v, "__len__") and getattr(v, "ndim", 1) > 0 else None  # (a 0-d tensor's len raises)
        if n != len(prompts):
            count = f"{n} values" if n is not None else f"a {type(v).__name__}"
            raise RunError(f"reward {name!r} returned extras {k!r} of {count} for {len(prompts)} samples")
    extras = {k: v.tolist() if hasattr(v, "tolist") else [x.item() if hasattr(x, "item") else x for x in v]
              for k, v in extras.items()}  # tensors, arrays and their scalars: plain numbers, as the grid's .json holds
    if isinstance(r, torch.Tensor):  # a score, not a loss: DDPO's gradient never flows through the reward (§4)
        r = r.detach()
    try:
        r = torch.as_tensor(r, dtype=torch.float32).cpu()
    except (TypeError, ValueError, RuntimeError) as e:  # strings, None, ragged lists, …
        raise RunError(f"reward {name!r} returned {type(r).__name__} that is not numbers ({why(e)}): it must return "
                       f"{len(prompts)} numbers") from e
    if r.shape != (len(prompts),):
        raise RunError(f"reward {name!r} returned shape {tuple(r.shape)}, expected ({len(prompts)},)")
    bad = torch.nonzero(~torch.isfinite(r)).flatten()
    if len(bad):
        i = bad[0].item()
        raise RunError(f"reward {name!r} returned {r[i].item()} for sample {i} (prompt {prompts[i]!r})")
    return r, extras


def raises(fn, *inputs):
    try:
        fn(*inputs)
        return False
    except Exception:
        return True
