"""Tests for rewards.py, offline: tiny random CLIP / BERT / LLaVA models are built from configs, saved with
save_pretrained to a temp folder and loaded back through the same from_pretrained path a hub id takes.

    python -m pytest -q tests/test_rewards.py         # this file
    python -m pytest -q -n 2 --dist loadgroup   # the whole suite, as the README and CI run it
"""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (BertConfig, BertModel, BertTokenizerFast, CLIPConfig, CLIPImageProcessor, CLIPModel,
                          CLIPProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaProcessor, PreTrainedTokenizerFast)

import ddpo
from conftest import SHORT_RUN
import rewards

WORDS = ("the image contains a an cat dog cow sitting on grass playing chess riding bike washing dishes what is "
         "going in this answer concisely user assistant").split()


def word_tokenizer(template, specials=("[BOS]", "[EOS]"), extra=()):
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]", *extra]))
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(s, tok.token_to_id(s)) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   unk_token="[UNK]", model_max_length=32)


def image_processor():
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def vision_config():
    return dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders of tiny random models: clip (with processor), bert, vlm (LLaVA), and an aesthetic head .pth."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("reward_models")
    tok = word_tokenizer("[BOS] $A [EOS]")
    clip = CLIPModel(CLIPConfig(projection_dim=768, vision_config=vision_config(), text_config=dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=0)))
    clip.save_pretrained(d / "clip")
    CLIPProcessor(image_processor=image_processor(), tokenizer=tok).save_pretrained(d / "clip")

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    bert_tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=64)
    assert bert_tok.unk_token_id not in bert_tok(" ".join(WORDS)).input_ids
    bert_tok.save_pretrained(d / "bert")
    BertModel(BertConfig(vocab_size=len(bert_tok), hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                         num_attention_heads=4)).save_pretrained(d / "bert")

    vlm_tok = word_tokenizer("[BOS] $A", specials=("[BOS]",), extra=("<image>",))
    chat = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} assistant:{% endif %}")
    LlavaProcessor(image_processor=image_processor(), tokenizer=vlm_tok, patch_size=8, chat_template=chat,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(d / "vlm")
    LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(**vision_config()), image_token_index=vlm_tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        text_config=LlamaConfig(vocab_size=len(vlm_tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                bos_token_id=vlm_tok.bos_token_id, eos_token_id=vlm_tok.eos_token_id, pad_token_id=0),
    )).save_pretrained(d / "vlm")

    head = rewards.aesthetic_mlp()  # saved as the hub file is: keys layers.0.weight …
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, d / "aesthetic-model.pth")
    return d


def images(n, seed=0):
    return torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------
# aesthetic
# --------------------------------------------------------------------------------------------------------

def test_aesthetic_embedding_uses_clip_processor_preprocessing(tiny):
    scorer = rewards.make_reward("aesthetic", "cpu", clip_model=str(tiny / "clip"), aesthetic_head=str(tiny / "aesthetic-model.pth"))
    x = images(3)
    inputs = CLIPProcessor.from_pretrained(tiny / "clip")(images=rewards.to_pil(x), return_tensors="pt")
    with torch.no_grad():
        expected = F.normalize(CLIPModel.from_pretrained(tiny / "clip").get_image_features(**inputs).pooler_output, dim=-1)
    torch.testing.assert_close(scorer.embed(x), expected)
    # bound: x/‖x‖ rounds once per value, the norm again sums 768 squares (~10 levels): ≈ 12u = 7e-7; we allow 1e-6
    assert torch.allclose(scorer.embed(x).norm(dim=-1), torch.ones(3), rtol=1e-6, atol=0)


def test_aesthetic_head_hand_set_gives_hand_computed_score(tiny):
    scorer = rewards.make_reward("aesthetic", "cpu", clip_model=str(tiny / "clip"), aesthetic_head=str(tiny / "aesthetic-model.pth"))
    linears = [m for m in scorer.head if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for layer, w in zip(linears, (2.0, 3.0, 1.0, 1.0, 0.5)):
            layer.weight.zero_()
            layer.bias.zero_()
            layer.weight[0, 0] = w
        linears[-1].bias.fill_(5.0)
    embedding = torch.zeros(1, 768)
    embedding[0, 0], embedding[0, 1] = 0.6, 0.8
    # no activations in the LAION head: 5 + 0.5·1·1·3·2·0.6 = 6.8
    # bound: 0.6 and 6.8 in float32 (0.5u each), the products ×2, ×3 one rounding each, + 5: ≈ 3u; we allow 6u
    assert scorer.score(embedding).item() == pytest.approx(6.8, rel=3.6e-7)


def test_aesthetic_loads_the_hub_format_head_and_batches_agree(tiny):
    scorer = rewards.make_reward("aesthetic", "cpu", clip_model=str(tiny / "clip"), aesthetic_head=str(tiny / "aesthetic-model.pth"))
    saved = torch.load(tiny / "aesthetic-model.pth", weights_only=True)
    assert torch.equal(scorer.head[0].weight, saved["layers.0.weight"])  # loaded, not computed: the same bits
    assert torch.equal(scorer.head[7].bias, saved["layers.7.bias"])
    x = images(5)
    together = scorer(x, ["cat"] * 5)
    alone = torch.cat([scorer(x[i:i + 1], ["cat"]) for i in range(5)])
    assert together.shape == (5,) and together.dtype == torch.float32
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# BERTScore and alignment
# --------------------------------------------------------------------------------------------------------

def test_bertscore_recall_identical_is_one_and_equals_the_bert_score_package(tiny):
    scorer = rewards.BERTScore("cpu", str(tiny / "bert"))
    refs = ["the image contains a cat", "the image contains a dog playing chess", "a cow"]
    cands = ["the image contains a cat", "a dog is sitting on grass", "what is going on in this image"]
    ours = scorer.recall(cands, refs)
    # bound: the cosine of a token with itself, x·x/(‖x‖‖x‖) over 768 dimensions: ~10 summation levels + 3: 13u =
    # 8e-7; we allow 1e-6
    assert ours[0].item() == pytest.approx(1.0, abs=1e-6)
    bert_score = pytest.importorskip("bert_score")
    _, recall, _ = bert_score.score(cands, refs, model_type=str(tiny / "bert"), num_layers=3)
    torch.testing.assert_close(ours, recall.float(), rtol=1e-5, atol=1e-5)


def test_bertscore_missing_reference_token_lowers_recall_by_its_best_match(tiny):
    """With attention and positions switched off, a token's embedding depends on the token alone, so recall is
    hand-checkable: reference 'the image contains a cat' vs candidate '... a dog': 4 exact matches, and 'cat'
    scores its best cosine with any candidate token ([CLS] and [SEP] included, as in bert-score)."""
    scorer = rewards.BERTScore("cpu", str(tiny / "bert"))
    model = scorer.model
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
        for layer in model.encoder.layer:
            layer.attention.output.dense.weight.zero_()
            layer.attention.output.dense.bias.zero_()
    recall = scorer.recall(["the image contains a dog"], ["the image contains a cat"]).item()
    emb, _, _ = scorer.embed(["cat", "the image contains a dog"])
    best = max(F.cosine_similarity(emb[0, 1], emb[1, j], dim=0).item() for j in range(7))
    assert best < 0.999
    # bound: five cosines (four of them of a token with itself) each ≈ 13u off (as in the test above), averaged:
    # ≈ 13u = 8e-7; we allow 1e-6
    assert recall == pytest.approx((4 + best) / 5, abs=1e-6)


def test_alignment_reward_is_bertscore_of_what_the_vlm_generated(tiny):
    scorer = rewards.make_reward("alignment", "cpu", vlm=str(tiny / "vlm"), bertscore_model=str(tiny / "bert"))
    prompts = ["a cat playing chess", "a dog riding a bike", "a cow"]
    x = images(3, seed=1)
    scores, extras = scorer(x, prompts)
    answers = extras["answer"]
    assert len(answers) == 3 and all(isinstance(a, str) and a for a in answers)
    # generate again by hand, straight from transformers: the same greedy answers
    processor = scorer.processor
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rewards.Alignment.QUESTION}]}],
                                         add_generation_prompt=True)
    jpegs = [rewards.Image.open(rewards.io.BytesIO(rewards.jpeg_bytes(img, 80))) for img in rewards.to_pil(x)]
    for i in range(3):
        inputs = processor(images=[jpegs[i]], text=[text], return_tensors="pt")
        out = scorer.vlm.generate(**inputs, max_new_tokens=32, do_sample=False)
        assert processor.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip() == answers[i]
    expected = scorer.bertscore.recall(answers, [f"The image contains {p}" for p in prompts])
    assert torch.equal(scores, expected)  # the same recall call on the same strings: the same bits


# --------------------------------------------------------------------------------------------------------
# clipscore, pickscore, registry, errors
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["clipscore", "pickscore"])
def test_clip_similarities_equal_clip_model_outputs(tiny, name):
    options = {"clip_model": str(tiny / "clip")} if name == "clipscore" else \
        {"pickscore_model": str(tiny / "clip"), "pickscore_processor": str(tiny / "clip")}
    scorer = rewards.make_reward(name, "cpu", **options)
    prompts, x = ["a cat", "a dog playing chess", "the cow"], images(3, seed=2)
    clip = CLIPModel.from_pretrained(tiny / "clip")
    inputs = CLIPProcessor.from_pretrained(tiny / "clip")(text=prompts, images=rewards.to_pil(x), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = clip(**inputs).logits_per_image.diagonal()  # logit_scale · cosine(image_i, text_i)
    expected = logits if name == "pickscore" else logits / clip.logit_scale.exp()
    torch.testing.assert_close(scorer(x, prompts), expected, rtol=1e-5, atol=1e-5)


def test_registry_rejects_unknown_names_with_the_known_ones():
    with pytest.raises(KeyError, match="unknown reward 'beauty'; known rewards: jpeg, compressibility, incompressibility, aesthetic"):
        rewards.make_reward("beauty", "cpu")


def test_unloadable_model_names_the_model_and_the_flag():
    with pytest.raises(rewards.RewardLoadError, match=r"cannot load '/no/such/clip' .*pass a local folder with --clip-model"):
        rewards.make_reward("clipscore", "cpu", clip_model="/no/such/clip")


def test_cli_reward_model_offline_is_one_line_before_anything_is_written(tmp_path):
    """The hub's CLIP named (the tiny models' default is the toy world's), with the hub unreachable."""
    result = subprocess.run([sys.executable, ddpo.__file__, "--reward", "aesthetic", *SHORT_RUN,
                             "--clip-model", "openai/clip-vit-large-patch14", "--out-dir", str(tmp_path / "runs")],
                            capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: reward 'aesthetic': cannot load 'openai/clip-vit-large-patch14'")
    assert "--clip-model" in lines[0] and not (tmp_path / "runs").exists()


def test_cli_alignment_logs_the_vlm_answers_next_to_the_grid(tiny, tmp_path):
    ddpo.main(["--reward", "alignment", "--vlm", str(tiny / "vlm"), "--bertscore-model", str(tiny / "bert"),
               "--epochs", "1", "--num-steps", "2", "--samples-per-epoch", "4", "--samples-per-prompt", "4", "--sample-batch-size", "4",
               "--num-minibatches", "1", "--out-dir", str(tmp_path), "--run-name", "align"])
    cells = json.loads((tmp_path / "align" / "grid_001.json").read_text())
    assert len(cells) == 8 and all(set(c) == {"prompt", "reward", "answer"} for c in cells)
    assert all(" " in c["prompt"] and 0 < c["reward"] <= 1 for c in cells)  # alignment prompts; a recall


# --------------------------------------------------------------------------------------------------------
# ImageReward (DPOK's reward): the published checkpoint format, checked against BLIP's forward written out
# --------------------------------------------------------------------------------------------------------

VIT = dict(width=128, depth=2, patch=8, image=32, heads=2)  # heads = width // 64, as in ViT-B/L
MED = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=40,
           layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0, architectures=["BertModel"], model_type="bert")


def original_imagereward_state(vocab_size, seed=0):
    """A random state dict under the names the published ImageReward.pt uses (BLIP's timm ViT, BLIP's med BERT,
    the MLP), written out here from the original module layout, not from rewards.py's name mapping."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.2 * torch.randn(*shape, generator=g)  # noqa: E731
    D, H, T = VIT["width"], MED["hidden_size"], MED["intermediate_size"]
    n = (VIT["image"] // VIT["patch"]) ** 2
    v = "blip.visual_encoder."
    state = {v + "cls_token": r(1, 1, D), v + "pos_embed": r(1, n + 1, D),
             v + "patch_embed.proj.weight": r(D, 3, VIT["patch"], VIT["patch"]), v + "patch_embed.proj.bias": r(D),
             v + "norm.weight": 1 + r(D), v + "norm.bias": r(D)}
    for i in range(VIT["depth"]):
        b = f"{v}blocks.{i}."
        state.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D), b + "attn.qkv.weight": r(3 * D, D),
                      b + "attn.qkv.bias": r(3 * D), b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
                      b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D), b + "mlp.fc1.weight": r(4 * D, D),
                      b + "mlp.fc1.bias": r(4 * D), b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D)})
    t = "blip.text_encoder."
    state.update({t + "embeddings.word_embeddings.weight": r(vocab_size, H),
                  t + "embeddings.position_embeddings.weight": r(MED["max_position_embeddings"], H),
                  t + "embeddings.LayerNorm.weight": 1 + r(H), t + "embeddings.LayerNorm.bias": r(H),
                  t + "embeddings.position_ids": torch.arange(MED["max_position_embeddings"])[None]})
    for i in range(MED["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for att, kv_width in (("attention", H), ("crossattention", D)):
            state.update({b + f"{att}.self.query.weight": r(H, H), b + f"{att}.self.query.bias": r(H),
                          b + f"{att}.self.key.weight": r(H, kv_width), b + f"{att}.self.key.bias": r(H),
                          b + f"{att}.self.value.weight": r(H, kv_width), b + f"{att}.self.value.bias": r(H),
                          b + f"{att}.output.dense.weight": r(H, H), b + f"{att}.output.dense.bias": r(H),
                          b + f"{att}.output.LayerNorm.weight": 1 + r(H), b + f"{att}.output.LayerNorm.bias": r(H)})
        state.update({b + "intermediate.dense.weight": r(T, H), b + "intermediate.dense.bias": r(T),
                      b + "output.dense.weight": r(H, T), b + "output.dense.bias": r(H),
                      b + "output.LayerNorm.weight": 1 + r(H), b + "output.LayerNorm.bias": r(H)})
    state.update({"blip.vision_proj.weight": r(256, D), "blip.vision_proj.bias": r(256),  # in the file, unused by the score
                  "blip.text_proj.weight": r(256, H), "blip.text_proj.bias": r(256)})
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), ((H, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        state.update({f"mlp.layers.{i}.weight": 5 * r(n_out, n_in) / math.sqrt(n_in), f"mlp.layers.{i}.bias": r(n_out)})
    return state


def blip_imagereward_by_hand(state, pixels, input_ids, attention_mask):
    """ImageReward.score written out with torch.nn.functional: BLIP's ViT (timm Block: pre-norm, fused qkv), the
    med BERT with cross-attention to every image token, the MLP on [CLS], then (r − mean) / std."""
    def attention(x, kv, p, heads, mask=None):
        B, N, W = x.shape
        split = lambda y: y.view(B, -1, heads, W // heads).transpose(1, 2)  # noqa: E731
        q, k, v = (split(F.linear(y, state[p + n + ".weight"], state[p + n + ".bias"])) for y, n in
                   ((x, "query"), (kv, "key"), (kv, "value")))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, N, W)

    ln = lambda x, p, eps: F.layer_norm(x, x.shape[-1:], state[p + ".weight"], state[p + ".bias"], eps)  # noqa: E731
    lin = lambda x, p: F.linear(x, state[p + ".weight"], state[p + ".bias"])  # noqa: E731
    v, D, heads = "blip.visual_encoder.", VIT["width"], VIT["heads"]
    x = F.conv2d(pixels, state[v + "patch_embed.proj.weight"], state[v + "patch_embed.proj.bias"], stride=VIT["patch"])
    x = torch.cat([state[v + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + state[v + "pos_embed"]
    for i in range(VIT["depth"]):
        b = f"{v}blocks.{i}."
        B, N, _ = x.shape
        qkv = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv").view(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        x = x + lin(F.scaled_dot_product_attention(*qkv).transpose(1, 2).reshape(B, N, D), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)
    t, eps = "blip.text_encoder.", MED["layer_norm_eps"]
    h = state[t + "embeddings.word_embeddings.weight"][input_ids] + state[t + "embeddings.position_embeddings.weight"][:input_ids.shape[1]]
    h = ln(h, t + "embeddings.LayerNorm", eps)
    pad = (attention_mask[:, None, None, :] == 0) * torch.finfo(h.dtype).min  # padding tokens are not attended to
    for i in range(MED["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        h = ln(h + lin(attention(h, h, b + "attention.self.", MED["num_attention_heads"], pad), b + "attention.output.dense"),
               b + "attention.output.LayerNorm", eps)
        h = ln(h + lin(attention(h, image, b + "crossattention.self.", MED["num_attention_heads"]), b + "crossattention.output.dense"),
               b + "crossattention.output.LayerNorm", eps)
        h = ln(h + lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense"), b + "output.LayerNorm", eps)
    r = h[:, 0]
    for i in (0, 2, 4, 6, 7):  # Linear layers with dropout (inactive) between them, no activations
        r = lin(r, f"mlp.layers.{i}")
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


@pytest.fixture(scope="module")
def imagereward_dir(tiny):
    folder = tiny / "imagereward"
    folder.mkdir(exist_ok=True)
    vocab_size = len(BertTokenizerFast.from_pretrained(tiny / "bert"))
    torch.save(original_imagereward_state(vocab_size), folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps({**MED, "vocab_size": vocab_size, "encoder_width": 768,
                                                        "add_cross_attention": True}))
    return folder


def test_imagereward_loads_the_published_format_and_equals_blip_written_out(tiny, imagereward_dir):
    reward = rewards.make_reward("imagereward", "cpu", imagereward_model=str(imagereward_dir),
                                 imagereward_tokenizer=str(tiny / "bert"))
    imgs, prompts = images(3), ["a cat sitting on grass", "a dog riding a bike", "cow"]
    # the preprocessing by hand: PIL bicubic resize to the ViT's input size, CLIP's mean and std
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    pixels = torch.stack([torch.tensor(np.asarray(im.resize((32, 32), Image.BICUBIC)), dtype=torch.float32).permute(2, 0, 1) / 255
                          for im in rewards.to_pil(imgs)])
    pixels = (pixels - mean[:, None, None]) / std[:, None, None]
    tok = BertTokenizerFast.from_pretrained(tiny / "bert")(prompts, padding="max_length", max_length=35, return_tensors="pt")
    vocab_size = len(BertTokenizerFast.from_pretrained(tiny / "bert"))
    expected = blip_imagereward_by_hand(original_imagereward_state(vocab_size), pixels, tok.input_ids, tok.attention_mask)
    got = reward(imgs, prompts)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert got.std() > 1e-3  # the images and prompts differ, and so do their scores
    torch.testing.assert_close(reward(imgs[:1], prompts[:1]), got[:1], rtol=1e-5, atol=1e-5)  # batching changes nothing


def test_imagereward_bad_folder_is_one_line_naming_the_flag(tmp_path):
    (tmp_path / "ImageReward.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "med_config.json").write_text("{}")
    with pytest.raises(rewards.RewardLoadError, match=r"cannot read ImageReward.pt / med_config.json from"):
        rewards.make_reward("imagereward", "cpu", imagereward_model=str(tmp_path))
    with pytest.raises(rewards.RewardLoadError, match=r"without network pass a local folder holding ImageReward.pt"):
        rewards.make_reward("imagereward", "cpu", imagereward_model=str(tmp_path / "missing"))


def test_cli_trains_on_imagereward_with_dpoks_kl_and_value_baseline(tiny, imagereward_dir, tmp_path):
    ddpo.main(["--reward", "imagereward", "--imagereward-model", str(imagereward_dir), "--imagereward-tokenizer",
               str(tiny / "bert"), "--kl-coef", "0.1", "--advantage", "value", "--epochs", "1", "--num-steps", "2",
               "--samples-per-epoch", "4", "--samples-per-prompt", "4", "--sample-batch-size", "4", "--out-dir", str(tmp_path), "--run-name", "ir"])
    row = [json.loads(line) for line in (tmp_path / "ir" / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["epoch"] == 1 and all(math.isfinite(row[k]) for k in ("reward/mean", "losses/kl", "value/loss"))
    assert json.loads((tmp_path / "ir" / "args.json").read_text())["prompts"] == "simple_animals"  # DPOK's own sets are not here
