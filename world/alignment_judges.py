"""The judges of the alignment experiments (paper §5.3, §6.2, §6.3), trained on the world with activities
(world.drawing.scene), whose generator knows what it drew:
  - a VLM in LLaVA's classes (LlavaForConditionalGeneration, and a LlavaProcessor with a chat template; a CLIP
    vision tower of 4x4 patches and a small Llama), trained to answer rewards.Alignment.QUESTION with what the
    picture shows: "a cat riding a bike", or "a cat" where the activity is not shown. It knows the 45 animals
    (an unseen animal looks like one of them or like none) and all six activities;
  - BERTScore's text encoder (BertModel and its tokenizer), trained by masked language modelling on the world's
    sentences (the VLM's answers and "The image contains" + prompt) with every word a target, so that a word's
    last-layer vector says which word it is, and recall counts the prompt's words that the answer has. (With
    BERT's 15% of words as targets, words that fill the same slot, every animal, ended with nearly one vector:
    recall 0.604 for the wrong animal against 0.609 for the right one.);
  - the judge that is not the reward: an attribute classifier (ResNetForImageClassification, a CNN, trained on its
    own, from its own seed and pictures) that reads a picture's palette, shape and activity. shows_activity and
    shows_subject are its read-outs as reward functions: evaluate.py --judge world.alignment_judges:shows_activity.

The three ship in world/judges/ (vlm, bertscore, attributes), built on the VAE of the built-in tiny-activities model;
`--vlm tiny --bertscore-model tiny` name the first two, and the tiny models default to them:
    python -m world.tiny_world --alignment-judges --seed 0      # the three, into world/judges (or --out FOLDER)
    python -m world.tiny_world --alignment-judges-check         # how right they are (--model M --out FOLDER: others)
"""
import functools

import numpy as np
import torch
import torch.nn.functional as F

from rewards import with_article
from world import JUDGES
from world.drawing import ACTIVITIES, ANIMALS, SCENE_PALETTES, SCENE_SHAPES, scene, split_prompt, subject_look
from world.judges import half_through, train

LABELS = ([f"palette {i}" for i in range(len(SCENE_PALETTES))] + [f"shape {s}" for s in SCENE_SHAPES]
          + ["activity none"] + [f"activity {a}" for a in ACTIVITIES])  # the classifier's three groups of logits
P, S = len(SCENE_PALETTES), len(SCENE_SHAPES)
GROUPS = (slice(0, P), slice(P, P + S), slice(P + S, len(LABELS)))


def answer(subject, activity):
    """What the picture shows, in the VLM's words: "a cat riding a bike", or "a cat" (activity None: not shown)."""
    return with_article(subject) + (f" {activity}" if activity else "")


def scenes(rng, n, subjects=ANIMALS, vae=None):
    """n pictures of the world with activities, (n, 3, 32, 32) in [0, 1], their prompts and what was drawn. The
    subject is uniform over subjects, the activity over ACTIVITIES and none; a named activity is shown at even odds;
    half at the world's tile strengths, half at s uniform in [0, 0.8]; with a vae, half through it and back (as the
    tiny model draws)."""
    prompts, pictures, drawn = [], [], []
    for _ in range(n):
        subject = subjects[rng.integers(len(subjects))]
        activity = ([None] + list(ACTIVITIES))[rng.integers(len(ACTIVITIES) + 1)]
        prompt = answer(subject, activity)
        show = rng.random() < 0.5
        image, attributes = scene(prompt, rng, show, None if rng.random() < 0.5 else rng.uniform(0, 0.8), True)
        prompts.append(prompt)
        pictures.append(image)
        drawn.append(dict(attributes, subject=subject))
    images = half_through(torch.from_numpy(np.stack(pictures)), rng, vae)
    return (images / 2 + 0.5).clamp(0, 1), prompts, drawn


# --------------------------------------------------------------------------------------------------------
# The VLM: LLaVA's classes, small
# --------------------------------------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                 "{% if add_generation_prompt %} assistant:{% endif %}")


def sentences():
    """Every sentence of the world: the VLM's answers and Alignment's references ("The image contains" + prompt)."""
    import rewards

    answers = [answer(s, a) for s in ANIMALS for a in (None, *ACTIVITIES)]
    subjects = rewards.load_prompts("unseen_animals")
    return answers + [f"The image contains {answer(s, a)}" for s in ANIMALS + tuple(subjects) for a in (None, *ACTIVITIES)]


def build_vlm_processor():
    from transformers import CLIPImageProcessor, LlavaProcessor

    import rewards
    from world import tiny_world

    tokenizer = tiny_world.build_tokenizer(sentences() + [rewards.Alignment.QUESTION, "user assistant :"], max_length=128,
                                           eos=False, extra=("<image>",))
    return LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                          tokenizer=tokenizer, patch_size=4, chat_template=CHAT_TEMPLATE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_vlm(processor, width=64):
    """A random-init LLaVA: a CLIP vision tower (32x32 pictures, 4x4 patches, 3 layers) whose 64 patch features a
    two-layer projector hands to a Llama of 2 layers, all of width 64."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    return LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=4, hidden_size=width, intermediate_size=2 * width,
                                       num_hidden_layers=3, num_attention_heads=4),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1, pad_token_id=tok.pad_token_id))


def vlm_pixels(processor, images):
    """The VLM's input as rewards.Alignment makes it: JPEG at quality 80, then the image processor."""
    import rewards

    return processor.image_processor(rewards.Alignment.as_sent(images), return_tensors="pt").pixel_values


def question_ids(processor):
    """The token ids of the user's turn up to "assistant:", the <image> token expanded to the picture's 64."""
    import rewards

    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": rewards.Alignment.QUESTION}]}], add_generation_prompt=True)
    return processor(images=[np.zeros((32, 32, 3), np.uint8)], text=[text], return_tensors="pt").input_ids[0]


def vlm_loss(vlm, processor, question, images, drawn):
    """Teacher forcing: the mean cross-entropy of the answers' tokens and their [EOS], each after the question
    (question_ids); the question's tokens and the padding carry no loss (label -100)."""
    tok = processor.tokenizer
    answers = [tok(answer(d["subject"], d["activity"]), add_special_tokens=False).input_ids + [tok.eos_token_id]
               for d in drawn]
    longest = max(map(len, answers))
    ids = torch.full((len(answers), len(question) + longest), tok.pad_token_id)
    labels = torch.full_like(ids, -100)
    ids[:, :len(question)] = question
    for i, a in enumerate(answers):
        ids[i, len(question):len(question) + len(a)] = labels[i, len(question):len(question) + len(a)] = torch.tensor(a)
    return vlm(input_ids=ids, attention_mask=(labels != -100) | (torch.arange(ids.shape[1]) < len(question)),
               pixel_values=vlm_pixels(processor, images), labels=labels).loss


# --------------------------------------------------------------------------------------------------------
# BERTScore's text encoder and the attribute classifier
# --------------------------------------------------------------------------------------------------------

def build_bert_tokenizer():
    from transformers import BertTokenizerFast

    words = sorted({w for s in sentences() for w in s.lower().split()})
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])},
                             model_max_length=32)


def mask_tokens(batch, tokenizer, rng, p_mask=0.15):
    """Masked language modelling's inputs, as BERT's: p_mask of the word tokens are hidden, each shown as [MASK]
    (80%), a random word (10%) or itself (10%). Unlike BERT, every word token is a target (labels; [CLS], [SEP] and
    padding -100): the last layer must keep each word, which BERTScore reads. Returns (input ids, labels)."""
    ids = batch.input_ids.clone()
    words = batch.attention_mask.bool() & ~batch.special_tokens_mask.bool()
    u = torch.from_numpy(rng.random((2, *ids.shape)))
    target = words & (u[0] < p_mask)
    labels = torch.where(words, ids, torch.full_like(ids, -100))
    ids[target & (u[1] < 0.8)] = tokenizer.mask_token_id
    random_word = target & (u[1] >= 0.8) & (u[1] < 0.9)
    ids[random_word] = torch.from_numpy(rng.integers(5, len(tokenizer), size=int(random_word.sum())))
    return ids, labels


def mlm_loss(mlm, tokenizer, texts, rng, batch_size):
    batch = tokenizer([texts[i] for i in rng.integers(len(texts), size=batch_size)], padding=True, return_tensors="pt",
                      return_special_tokens_mask=True)
    ids, labels = mask_tokens(batch, tokenizer, rng)
    return mlm(input_ids=ids, attention_mask=batch.attention_mask, labels=labels).loss


def build_classifier():
    """A random-init ResNet (3 stages of basic blocks, 32 to 128 channels) with one logit per LABELS entry."""
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(
        embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], layer_type="basic",
        num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)}))


def truth(drawn):
    """(palette, shape, activity) indices of what was drawn, the classifier's targets; activity 0 is none."""
    return torch.tensor([[d["palette"], SCENE_SHAPES.index(d["shape"]),
                          0 if d["activity"] is None else 1 + ACTIVITIES.index(d["activity"])] for d in drawn])


def classifier_loss(classifier, images, drawn):
    """The sum of the three groups' cross-entropies: palette, shape, activity."""
    logits = classifier(pixel_values=images * 2 - 1).logits
    target = truth(drawn)
    return sum(F.cross_entropy(logits[:, g], target[:, k]) for k, g in enumerate(GROUPS))


@torch.no_grad()
def read(classifier, images):
    """The classifier's reading of images (B, 3, 32, 32) in [0, 1]: (B, 3) palette, shape, activity indices."""
    logits = classifier(pixel_values=images.float() * 2 - 1).logits
    return torch.stack([logits[:, g].argmax(1) for g in GROUPS], 1)


def build(seed, out, model, vlm_steps=3000, bert_steps=1500, classifier_steps=1500, batch_size=64):
    """The three judges, each into its folder under out/ (vlm/, bertscore/, attributes/), written whole. The
    classifier learns from its own random stream and from every subject the prompts hold, seen and unseen."""
    from diffusers import AutoencoderKL
    from transformers import BertConfig, BertForMaskedLM

    import rewards
    from plumbing import files, model_checks

    model_checks.quiet_libraries()
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").eval()
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 0])
    processor = build_vlm_processor()
    vlm, question = build_vlm(processor), question_ids(processor)
    train(vlm, lambda: vlm_loss(vlm, processor, question, *scenes(rng, batch_size, vae=vae)[::2]), vlm_steps, "VLM")
    tokenizer = build_bert_tokenizer()
    mlm = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32))
    texts = sentences()
    train(mlm, lambda: mlm_loss(mlm, tokenizer, texts, rng, 2 * batch_size), bert_steps, "BERTScore encoder")
    torch.manual_seed(seed + 1)
    r = np.random.default_rng([seed, 1])  # the independent judge: its own stream, its own architecture
    subjects = ANIMALS + tuple(rewards.load_prompts("unseen_animals"))
    classifier = build_classifier()
    train(classifier, lambda: classifier_loss(classifier, *scenes(r, batch_size, subjects, vae)[::2]),
                       classifier_steps, "attribute classifier")
    for name, save in (("vlm", (vlm, processor)), ("bertscore", (mlm.bert, tokenizer)), ("attributes", (classifier,))):
        with files.atomic_folder(out / name) as tmp:
            for part in save:
                part.save_pretrained(tmp)
    print(f"saved {out}/vlm, bertscore, attributes")


# --------------------------------------------------------------------------------------------------------
# The independent judge as reward functions, and how right the judges are
# --------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def classifier_at(folder):
    from transformers import ResNetForImageClassification

    return ResNetForImageClassification.from_pretrained(folder).eval()


JUDGE = JUDGES / "attributes"  # the classifier that shows_activity and shows_subject read


def shows_activity(images, prompts, judge=None):
    """1 where the independent classifier (the folder judge, by default JUDGE) reads the prompt's activity in the
    picture (for a prompt that names none: reads none), else 0."""
    reading = read(classifier_at(str(judge or JUDGE)), images)
    wanted = [ACTIVITIES.index(a) + 1 if a else 0 for _, a in map(split_prompt, prompts)]
    return (reading[:, 2] == torch.tensor(wanted)).float()


def shows_subject(images, prompts, judge=None):
    """1 where the independent classifier (the folder judge, by default JUDGE) reads the prompt's subject: its
    palette and shape."""
    reading = read(classifier_at(str(judge or JUDGE)), images)
    wanted = torch.tensor([subject_look(s, None) for s, _ in map(split_prompt, prompts)])
    return (reading[:, :2] == wanted).all(1).float()


def check(folder, model, n=256, seed=12345):
    """The judges on n freshly drawn pictures of the 45 animals: how often the VLM's answer is the truth (animal
    and activity), the classifier's accuracy on each attribute, and the reward (BERTScore recall) with and without
    the activity shown."""
    from diffusers import AutoencoderKL

    import rewards
    from plumbing import model_checks

    model_checks.quiet_libraries()
    rng = np.random.default_rng(seed)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").eval()
    images, prompts, drawn = scenes(rng, n, vae=vae)
    reward = rewards.make_reward("alignment", "cpu", vlm=str(folder / "vlm"), bertscore_model=str(folder / "bertscore"))
    scores, info = reward(images, prompts)
    truths = [answer(d["subject"], d["activity"]) for d in drawn]
    right = [a == t for a, t in zip(info["answer"], truths)]
    print(f"VLM: the answer names the right animal and activity for {np.mean(right):.1%} of {n} pictures")
    shown = torch.tensor([d["activity"] is not None for d in drawn])
    named = torch.tensor([split_prompt(p)[1] is not None for p in prompts])
    for name, rows in (("activity shown", shown), ("activity named, not shown", named & ~shown), ("none named", ~named)):
        print(f"  alignment reward, {name}: mean {scores[rows].mean():.3f} over {int(rows.sum())}")
    reading, target = read(classifier_at(str(folder / "attributes")), images), truth(drawn)
    print("classifier: " + ", ".join(f"{k} {(reading[:, i] == target[:, i]).float().mean():.1%}"
                                     for i, k in enumerate(("palette", "shape", "activity"))))
