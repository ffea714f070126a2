"""Loading local model folders: the class config.json names, the positions limit, and errors
that name the file or folder at fault (issue 14, items 5, 7 and 9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from llmrank import models


def save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "cat", "sat"])}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    save_tokenizer(folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    return folder


# ---------------------------------------------------------------- item 5: the class named by config.json


def test_gpt2_lm_head_folder_loads_with_its_lm_head(gpt2_folder):
    model, _ = models.load_model(str(gpt2_folder))
    assert type(model).__name__ == "GPT2LMHeadModel"
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 3, 64)
    assert models._natural_task(gpt2_folder) == "causal-lm"


def test_architecture_class_falls_back_to_auto_classes(tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM

    assert models._auto_class("causal-lm", ["GPT2LMHeadModel"]).__name__ == "GPT2LMHeadModel"
    assert models._auto_class("causal-lm", ["LlamaForCausalLM"]).__name__ == "LlamaForCausalLM"
    assert models._auto_class("causal-lm", ["NoSuchForCausalLM"]) is AutoModelForCausalLM  # custom code
    assert models._auto_class("causal-lm", []) is AutoModelForCausalLM
    assert models._auto_class("base", ["BertModel"]) is AutoModel
    assert models._auto_class("base", ["GPT2LMHeadModel"]) is AutoModel  # an explicit task wins


def test_eval_loader_gets_the_lm_head_too(gpt2_folder):
    from llmrank.evalcmd import load_torch_model

    model, tok, kind = load_torch_model(str(gpt2_folder))
    assert type(model).__name__ == "GPT2LMHeadModel" and kind == "hf-folder" and tok is not None


def test_eval_loader_refuses_a_model_without_an_lm_head(tmp_path):
    from llmrank.evalcmd import load_torch_model

    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=64)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no language-model head"):
        load_torch_model(str(tmp_path))
