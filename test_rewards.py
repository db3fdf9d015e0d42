"""Tests for rewards.py, offline: tiny random CLIP / BERT / LLaVA models are built from configs, saved with
save_pretrained to a temp folder and loaded back through the same from_pretrained path a hub id takes.

    python -m pytest -q
"""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (BertConfig, BertModel, BertTokenizerFast, CLIPConfig, CLIPImageProcessor, CLIPModel,
                          CLIPProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaProcessor, PreTrainedTokenizerFast)

import ddpo
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
    assert torch.allclose(scorer.embed(x).norm(dim=-1), torch.ones(3))


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
    assert scorer.score(embedding).item() == pytest.approx(6.8)


def test_aesthetic_loads_the_hub_format_head_and_batches_agree(tiny):
    scorer = rewards.make_reward("aesthetic", "cpu", clip_model=str(tiny / "clip"), aesthetic_head=str(tiny / "aesthetic-model.pth"))
    saved = torch.load(tiny / "aesthetic-model.pth", weights_only=True)
    torch.testing.assert_close(scorer.head[0].weight, saved["layers.0.weight"])
    torch.testing.assert_close(scorer.head[7].bias, saved["layers.7.bias"])
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
    torch.testing.assert_close(scores, expected)


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
    result = subprocess.run([sys.executable, ddpo.__file__, "--reward", "aesthetic", "--out-dir", str(tmp_path / "runs")],
                            capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: reward 'aesthetic': cannot load 'openai/clip-vit-large-patch14'")
    assert "--clip-model" in lines[0] and not (tmp_path / "runs").exists()


def test_cli_alignment_logs_the_vlm_answers_next_to_the_grid(tiny, tmp_path):
    ddpo.main(["--reward", "alignment", "--vlm", str(tiny / "vlm"), "--bertscore-model", str(tiny / "bert"),
               "--epochs", "1", "--num-steps", "2", "--samples-per-epoch", "4", "--sample-batch-size", "4",
               "--num-minibatches", "1", "--out-dir", str(tmp_path), "--run-name", "align"])
    cells = json.loads((tmp_path / "align" / "grid_001.json").read_text())
    assert len(cells) == 8 and all(set(c) == {"prompt", "reward", "answer"} for c in cells)
    assert all(" " in c["prompt"] and 0 < c["reward"] <= 1 for c in cells)  # alignment prompts; a recall
