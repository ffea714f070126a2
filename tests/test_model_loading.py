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


# ---------------------------------------------------------------- item 7: --seq-len against the positions


def test_max_positions_of_the_families():
    assert models.max_positions(transformers.LlamaConfig(max_position_embeddings=64)) == 64
    assert models.max_positions(transformers.GPT2Config(n_positions=128)) == 128
    assert models.max_positions(transformers.Gemma3Config(text_config={"max_position_embeddings": 96})) == 96
    # RoBERTa's position ids start after the padding index: 514 - (1 + 1) usable positions
    assert models.max_positions(transformers.RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert models.max_positions({"max_position_embeddings": 32}) == 32  # a raw config.json dict
    assert models.max_positions({"model_type": "custom"}) is None


def test_check_seq_len_names_the_limit_and_the_option():
    cfg = transformers.GPT2Config(n_positions=64)
    models.check_seq_len(cfg, 64)  # at the limit is fine
    with pytest.raises(ValueError, match=r"--seq-len 65 exceeds the model's 64 positions \(n_positions\); use --seq-len <= 64"):
        models.check_seq_len(cfg, 65)
    with pytest.raises(models.SeqLenError, match="--calib-seq-len 100"):
        models.check_seq_len(cfg, 100, option="--calib-seq-len")
    models.check_seq_len({"model_type": "custom"}, 10 ** 6)  # no known limit: nothing to check


def test_read_config_reads_a_folder_without_loading_weights(gpt2_folder, monkeypatch):
    import safetensors.torch

    def no_weights(*a, **k):
        raise AssertionError("read_config must not read weights")

    monkeypatch.setattr(safetensors.torch, "load_file", no_weights)
    cfg = models.read_config(str(gpt2_folder))
    assert cfg.model_type == "gpt2" and models.max_positions(cfg) == 64


def test_read_config_of_a_builtin_only_when_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRANK_CACHE", str(tmp_path / "cache"))
    assert models.read_config("smollm2-135m") is None  # not converted yet: nothing fetched, nothing built
    assert not (tmp_path / "cache" / "models" / "smollm2-135m").exists()
    cached = tmp_path / "cache" / "models" / "smollm2-135m"
    transformers.LlamaConfig(max_position_embeddings=77).save_pretrained(cached)
    (cached / ".llmrank-complete").write_text("ok\n")
    assert models.max_positions(models.read_config("smollm2-135m")) == 77
    assert models.read_config("no-such-org-xyz/no-such-model-xyz") is None  # hub id, not cached


def test_eval_refuses_a_seq_len_past_the_positions(gpt2_folder, tmp_path, capsys):
    from llmrank.cli import main

    text = tmp_path / "text.txt"
    text.write_text("the cat sat " * 200)
    code = main(["eval", str(gpt2_folder), "--ppl-source", str(text), "--seq-len", "65", "--tasks", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--seq-len 65 exceeds the model's 64 positions (n_positions); use --seq-len <= 64" in err
    assert main(["eval", str(gpt2_folder), "--ppl-source", str(text), "--seq-len", "64", "--tasks", "none", "--quiet"]) == 0


# ---------------------------------------------------------------- item 9: errors that name the file at fault


def test_invalid_config_json_names_the_file(tmp_path, capsys):
    from llmrank.cli import main

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(models.ModelConfigError, match="not valid JSON") as err:
        models.load_model(str(folder))
    assert str(folder / "config.json") in str(err.value) and isinstance(err.value, ValueError)
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert str(folder / "config.json") in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["models/lama", "./lama", "../lama", "models/lama/sub"])
def test_mistyped_local_folder_is_not_a_hub_error(tmp_path, monkeypatch, name):
    work = tmp_path / "work"
    (work / "models" / "llama").mkdir(parents=True)
    monkeypatch.chdir(work)
    with pytest.raises(models.ModelNotFoundError, match="does not exist") as err:
        models.load_model(name)
    assert "hub" not in str(err.value) and isinstance(err.value, FileNotFoundError)
    if name == "models/lama":
        assert "models/llama" in str(err.value)  # the close match is suggested


def test_missing_calibration_file_gets_no_model_hint(gpt2_folder, tmp_path, capsys):
    from llmrank.cli import main

    code = main(["prune", str(gpt2_folder), "--calib", str(tmp_path / "calib.txt"), "--out", str(tmp_path / "out"), "--seq-len", "16", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "calib.txt" in err and "does not exist" in err
    hint = [line for line in err.splitlines() if line.startswith("hint:")]
    assert len(hint) == 1 and "--calib" in hint[0] and "model" not in hint[0]
    assert not (tmp_path / "out").exists()
