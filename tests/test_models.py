"""Real pretrained models load from the cache and still model English text."""

from __future__ import annotations

import math

import pytest
import torch

from llmrank import models
from llmrank.data import eval_tokens


@pytest.fixture(scope="module")
def smollm2():
    return models.load_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_loads_from_cache_folder(smollm2):
    model, tok = smollm2
    folder = models.resolve_model_dir("smollm2-135m")
    assert folder.parent.name == "models" and (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.gguf")) and not (folder / "_gguf").exists()
    cfg = model.config
    assert cfg.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert cfg.intermediate_size == 1536 and cfg.hidden_size == 576
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(cfg, "quantization_config", None) is None
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok("Hello world.", add_special_tokens=False)["input_ids"] == [19556, 905, 30]


@pytest.mark.slow
def test_smollm2_perplexity_on_wiki_eval_is_plausible(smollm2):
    model, tok = smollm2
    ids = eval_tokens(tok)[0, :4096].view(8, 512)  # 8 windows of 512 tokens
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(w[None]).logits[0, :-1], w[1:]) for w in ids]
    ppl = math.exp(torch.stack(losses).mean().item())
    assert math.isfinite(ppl) and 5 < ppl < 60, ppl  # a random init gives ~56,000


def test_unknown_name_and_unreachable_hub_errors_are_clear():
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        models.load_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="no local folder .* no model hub is reachable") as info:
        models.load_model("no-such-org-xyz/no-such-model-xyz")
    assert "smollm2-135m" in info.value.hint  # the built-in names, as the way out


def test_local_folder_loads_in_eval_mode(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "cat", "sat"])}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    assert models.resolve_model_dir(str(tmp_path)) == tmp_path
    model, tok = models.load_model(str(tmp_path))
    assert not model.training and model.config.num_hidden_layers == 2
    assert next(model.parameters()).dtype == torch.float32
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
    half, _ = models.load_model(str(tmp_path), dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    assert tok("the cat sat")["input_ids"] == [1, 2, 3]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.resolve_model_dir(str(tmp_path / "empty"))
