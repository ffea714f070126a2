"""The Hugging Face config of a slim model: the widths, biases and head counts its shapes need.

A pruned model keeps the dense model's config object, which still describes the dense shapes.
Both writers of a slim checkpoint, the in-memory one (``llmrank.exporters.hf.save_hf``) and the
block-by-block one (``llmrank.passes.blocks.checkpoint``), describe the shapes with the same rules:
a width every layer shares goes into the family's width field, per-layer widths and head counts
under ``config.llmrank`` (read back by ``llmrank.load``), and a bias the refit added turns on
the family's bias switch where it has one. Nothing here writes a file.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from llmrank.passes.headcut import layer_heads

# Output projections of an FFN; their input dimension is the FFN width.
_DOWN_NAMES = ("down_proj", "fc2", "dense_4h_to_h", "w2")
# Config fields that hold the FFN width, by family (Llama-likes, GPT-2, OPT).
_WIDTH_FIELDS = ("intermediate_size", "n_inner", "ffn_dim")
# Config switches that give a family's FFN Linears a bias (Llama, Granite, SmolLM3, ...).
# Qwen2, Mistral and Gemma have none: there an added bias needs `llmrank.load`.
_BIAS_SWITCHES = ("mlp_bias",)


def conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old/new transformers
        return None
    return Conv1D


def _in_width(module: nn.Module) -> int | None:
    """Input width of a projection: Linear (out x in) or GPT-2 Conv1D (in x out)."""
    conv1d = conv1d_type()
    if isinstance(module, nn.Linear):
        return module.in_features
    if conv1d is not None and isinstance(module, conv1d):
        return int(module.weight.shape[0])
    return None


def mlp_widths(model: nn.Module) -> dict[str, int]:
    """FFN width of every layer, keyed by the FFN module path, read from the down projection.

    GPT-2 names both its attention and MLP output `c_proj`; only the one under an
    `mlp` module counts.
    """
    widths: dict[str, int] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        is_down = leaf in _DOWN_NAMES or (leaf == "c_proj" and parent.rsplit(".", 1)[-1] == "mlp")
        if not is_down:
            continue
        width = _in_width(module)
        if width is not None:
            widths[parent] = width
    return widths


def width_field(config: Any) -> str | None:
    for name in _WIDTH_FIELDS:
        if hasattr(config, name):
            return name
    return None


def text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def _declared_keys(model: nn.Module, config: Any) -> set[str]:
    """State-dict keys that `config` makes stock loading build, read on the meta device (no memory)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover
        from transformers.modeling_utils import no_init_weights

    with torch.device("meta"), no_init_weights():
        fresh = type(model)(copy.deepcopy(config))
    return set(fresh.state_dict())


def _zero_bias(model: nn.Module, key: str) -> torch.Tensor:
    """A zero bias for the Linear/Conv1D that owns `key` (a declared bias the model lacks)."""
    module = model.get_submodule(key.rsplit(".", 1)[0])
    weight = module.weight
    width = weight.shape[0] if isinstance(module, nn.Linear) else weight.shape[1]
    return torch.zeros(width, dtype=weight.dtype, device=weight.device)


def _declare_biases(model: nn.Module, config: Any) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Make `config` declare every bias the model has (compensation may have added some).

    Returns (biases the config still cannot declare, zero tensors to add to the checkpoint).
    Turning a family's switch on (`mlp_bias`) also declares gate/up biases the model lacks;
    they are written as zeros so stock loading builds exactly the model's function.
    """
    have = set(model.state_dict())
    try:
        declared = _declared_keys(model, config)
    except Exception:  # noqa: BLE001 - a class that cannot be built from its config alone: nothing to compare
        return [], {}
    undeclared = sorted(k for k in have - declared if k.endswith(".bias"))
    if not undeclared:
        return [], {}
    text = text_config(config)
    for switch in _BIAS_SWITCHES:
        if getattr(text, switch, None) is not False:
            continue
        setattr(text, switch, True)
        declared = _declared_keys(model, config)
        extra = declared - have
        if set(undeclared) <= declared and all(k.endswith(".bias") for k in extra):
            return [], {k: _zero_bias(model, k) for k in sorted(extra)}
        setattr(text, switch, False)
    return undeclared, {}


def config_for_save(model: nn.Module, metadata: Mapping[str, Any]) -> tuple[Any, dict[str, int], bool, list[str], dict[str, torch.Tensor]]:
    """A copy of the model's config that describes the shrunk shapes (the live model is untouched)."""
    config = copy.deepcopy(model.config)
    # save_pretrained records the class on the live config; this copy was taken before that, and
    # loaders that dispatch on it (onnxruntime-genai's builder) need it.
    config.architectures = [type(model).__name__]
    widths = mlp_widths(model)
    text = text_config(config)
    uniform = len(set(widths.values())) == 1
    field_name = width_field(text)
    if uniform and field_name is not None:
        setattr(text, field_name, next(iter(widths.values())))
    _valid_head_counts(config, text)
    undeclared, zeros = _declare_biases(model, config)
    info: dict[str, Any] = {"metadata": {k: str(v) for k, v in metadata.items()}}
    if widths and not uniform:
        info["layer_widths"] = widths
        info["loader"] = "llmrank.load"
    if undeclared:
        info["undeclared_biases"] = undeclared
        info["loader"] = "llmrank.load"
    heads = _per_layer_heads(model, text)
    if heads:
        info["layer_heads"] = heads
        info["loader"] = "llmrank.load"
    config.llmrank = info
    return config, widths, uniform, undeclared, zeros


def _validates(config: Any) -> bool:
    """Whether transformers accepts `config` (its strict validators run on save and on load)."""
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return True
    try:
        validate()
    except Exception:  # noqa: BLE001 - any validator's complaint means the file would not load
        return False
    return True


def _valid_head_counts(config: Any, text: Any) -> None:
    """Head counts that transformers' validators accept, when the cut ones are refused.

    A head cut can leave counts that do not divide ``hidden_size`` (3 of 4 heads of width 640),
    which Llama/Qwen2/Gemma3 configs refuse on save and on load even with an explicit
    ``head_dim``. The config then keeps the nearest count that validates, the attention is
    built from the explicit ``head_dim`` and every layer's real counts go under
    ``config.llmrank["layer_heads"]`` (``_per_layer_heads`` sees them differ), which
    ``llmrank.load`` applies.
    """
    heads, kv = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
    hidden = getattr(text, "hidden_size", None)
    if _validates(config) or not all(isinstance(v, int) for v in (heads, hidden)) \
            or not isinstance(getattr(text, "head_dim", None), int):
        return
    kv = kv if isinstance(kv, int) else heads
    divisors = sorted((d for d in range(1, hidden + 1) if hidden % d == 0), key=lambda d: (d < heads, abs(d - heads)))
    for count in divisors:
        for kv_count in dict.fromkeys((kv, math.gcd(count, kv), count)):
            text.num_attention_heads, text.num_key_value_heads = count, kv_count
            if _validates(config):
                return
    text.num_attention_heads, text.num_key_value_heads = heads, kv  # nothing validates: save reports why


def _per_layer_heads(model: nn.Module, text: Any) -> dict[str, list[int]]:
    """[query heads, KV heads] per attention module when some layer's counts differ from the
    config's (a per-layer head cut); empty when the config describes every layer."""
    heads = layer_heads(model)
    want = [getattr(text, "num_attention_heads", None)]
    want.append(getattr(text, "num_key_value_heads", None) or want[0])
    return heads if any(counts != want for counts in heads.values()) else {}
