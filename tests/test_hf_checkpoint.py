"""HF checkpoints that say what they hold: biases added by compensation, and the LM head of
models whose architecture is not a *ForCausalLM (issue 14, items 1 and 5)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from torch import nn

from llmrank.exporters.hf import ReloadMismatchError, check_reload, load_hf, save_hf

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64)
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def with_down_bias(model: nn.Module) -> nn.Module:
    """What `--compensation bias` does to a model whose FFN has no bias: down_proj gains one."""
    gen = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        down = layer.mlp.down_proj
        assert down.bias is None
        down.bias = nn.Parameter(torch.randn(down.out_features, generator=gen))
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("tied", [False, True])
def test_llama_down_bias_turns_on_mlp_bias_and_reloads_stock(tmp_path, tied):
    torch.manual_seed(0)
    model = with_down_bias(transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, tie_word_embeddings=tied)).eval())
    keys_before = set(model.state_dict())
    saved = save_hf(model, None, tmp_path / "hf", metadata={})
    assert set(model.state_dict()) == keys_before and model.config.mlp_bias is False  # the caller's model is untouched
    assert saved.stock_loadable
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["mlp_bias"] is True
    stock, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"] and not info["mismatched_keys"]
    # gate/up biases the switch also declares are written as zeros, so the function is unchanged
    assert torch.count_nonzero(stock.model.layers[0].mlp.up_proj.bias) == 0
    assert torch.equal(logits(stock.eval()), logits(model))
    assert torch.equal(logits(load_hf(tmp_path / "hf")), logits(model))
    assert check_reload(tmp_path / "hf", model, stock=True, sample_ids=IDS) == 0.0
    assert check_reload(tmp_path / "hf", model, stock=False) == 0.0


def test_family_without_a_bias_switch_is_marked_for_llmrank_load(tmp_path):
    """Qwen2's MLP has no bias switch: the checkpoint must not claim stock loading."""
    torch.manual_seed(0)
    model = with_down_bias(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL)).eval())
    saved = save_hf(model, None, tmp_path / "hf", metadata={})
    assert saved.uniform and not saved.stock_loadable
    info = json.loads((tmp_path / "hf" / "config.json").read_text())["llmrank"]
    assert info["loader"] == "llmrank.load"
    assert info["undeclared_biases"] == ["model.layers.0.mlp.down_proj.bias", "model.layers.1.mlp.down_proj.bias"]
    assert torch.equal(logits(load_hf(tmp_path / "hf")), logits(model))
    assert check_reload(tmp_path / "hf", model, stock=False, sample_ids=IDS) == 0.0
    with pytest.raises(ReloadMismatchError, match="down_proj.bias"):  # stock loading drops the biases
        check_reload(tmp_path / "hf", model, stock=True, sample_ids=IDS)


def test_model_without_extra_bias_is_saved_as_before(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).eval()
    saved = save_hf(model, None, tmp_path / "hf", metadata={})
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved.stock_loadable and config["mlp_bias"] is False and "loader" not in config["llmrank"]
    assert check_reload(tmp_path / "hf", model, stock=True) == 0.0


def test_check_reload_reports_a_checkpoint_that_is_not_the_model(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).eval()
    save_hf(model, None, tmp_path / "hf", metadata={})
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.add_(0.5)
    for stock in (True, False):
        with pytest.raises(ReloadMismatchError, match="differ") as err:
            check_reload(tmp_path / "hf", other, stock=stock, sample_ids=IDS)
        assert str(tmp_path / "hf") in str(err.value)
