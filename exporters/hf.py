"""Save and reload physically shrunk Hugging Face causal LMs.

Stock `from_pretrained` rebuilds every MLP from one `config.intermediate_size`, so a
model whose layers kept different widths cannot round-trip through it. When all
layers agree we write that width into the config (stock loading then works); when
they differ we record the widths under `config.llmrank` and `load_hf` rebuilds the
model from the saved weight shapes. Nothing here scores or prunes: it only reads
the shapes the model already has.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_path, refuse_input_overlap

__all__ = ["save_hf", "load_hf", "mlp_widths", "SaveResult"]

# Output projections of an FFN; their input dimension is the FFN width.
_DOWN_NAMES = ("down_proj", "fc2", "dense_4h_to_h", "w2")
# Config fields that hold the FFN width, by family (Llama-likes, GPT-2, OPT).
_WIDTH_FIELDS = ("intermediate_size", "n_inner", "ffn_dim")


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old/new transformers
        return None
    return Conv1D


def _in_width(module: nn.Module) -> int | None:
    """Input width of a projection: Linear (out x in) or GPT-2 Conv1D (in x out)."""
    conv1d = _conv1d_type()
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


def _width_field(config: Any) -> str | None:
    for field in _WIDTH_FIELDS:
        if hasattr(config, field):
            return field
    return None


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def _config_for_save(model: nn.Module, metadata: Mapping[str, Any]) -> tuple[Any, dict[str, int], bool]:
    """A copy of the model's config that describes the shrunk shapes (the live model is untouched)."""
    config = copy.deepcopy(model.config)
    # save_pretrained records the class on the live config; this copy was taken before that, and
    # loaders that dispatch on it (onnxruntime-genai's builder) need it.
    config.architectures = [type(model).__name__]
    widths = mlp_widths(model)
    text = _text_config(config)
    uniform = len(set(widths.values())) == 1
    field = _width_field(text)
    if uniform and field is not None:
        setattr(text, field, next(iter(widths.values())))
    info: dict[str, Any] = {"metadata": {k: str(v) for k, v in metadata.items()}}
    if widths and not uniform:
        info["layer_widths"] = widths
        info["loader"] = "llmrank.load"
    config.llmrank = info
    return config, widths, uniform


@dataclass
class SaveResult:
    """Where the model went and whether stock `from_pretrained` can reload it (`uniform`)."""

    path: Path
    uniform: bool
    widths: dict[str, int]
    files: list[str]
    seconds: float


def save_hf(
    model: nn.Module,
    tokenizer: Any | None,
    out_dir: Path | str,
    *,
    metadata: Mapping[str, Any] | None = None,
    force: bool = False,
    max_shard_size: str | int = "5GB",
) -> SaveResult:
    """Write safetensors + config (+ tokenizer) into `out_dir`, atomically.

    With uniform FFN widths the config's width field is set so stock
    `AutoModelForCausalLM.from_pretrained(out_dir)` reloads exactly; with per-layer
    widths use `load_hf` (the widths are in `config.llmrank["layer_widths"]`).
    """
    out_dir = Path(out_dir)
    refuse_input_overlap(out_dir, getattr(model, "name_or_path", None) or None)
    start = time.perf_counter()
    config, widths, uniform = _config_for_save(model, metadata or {})
    with atomic_path(out_dir, force=force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        config.save_pretrained(tmp)  # overwrite config.json with the shrunk-shape description
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    files = sorted(p.name for p in out_dir.iterdir())
    return SaveResult(out_dir, uniform, widths, files, time.perf_counter() - start)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint; never unpickles."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(path / shard)))
    return state


def _resize_to(module: nn.Module, name: str, state: Mapping[str, torch.Tensor]) -> bool:
    """Give a Linear/Conv1D the weight shape found in the checkpoint; True if it changed."""
    conv1d = _conv1d_type()
    weight = state.get(f"{name}.weight")
    if weight is None or tuple(weight.shape) == tuple(module.weight.shape):
        return False
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = int(weight.shape[0]), int(weight.shape[1])
    elif conv1d is not None and isinstance(module, conv1d):
        module.nx, module.nf = int(weight.shape[0]), int(weight.shape[1])
    else:
        raise ValueError(
            f"{name}: saved shape {tuple(weight.shape)} differs and {type(module).__name__} cannot be resized"
        )
    module.weight = nn.Parameter(torch.empty_like(weight), requires_grad=module.weight.requires_grad)
    bias = state.get(f"{name}.bias")
    if getattr(module, "bias", None) is not None and bias is not None:
        module.bias = nn.Parameter(torch.empty_like(bias), requires_grad=module.bias.requires_grad)
    return True


def _tied_targets(model: nn.Module) -> set[str]:
    keys = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) if isinstance(keys, Mapping) else set(keys)


def load_hf(path: Path | str, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a (possibly per-layer shrunk) causal LM saved by `save_hf`.

    Builds the architecture from the config, resizes every Linear/Conv1D whose
    saved weight has another shape, then loads the safetensors strictly: the only
    keys allowed to be missing are tied ones (e.g. `lm_head.weight`), re-tied after.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover
        from transformers.modeling_utils import no_init_weights

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    state = _read_state_dict(path)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    conv1d = _conv1d_type()
    kinds = (nn.Linear,) + ((conv1d,) if conv1d is not None else ())
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            _resize_to(module, name, state)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = set(result.missing_keys) - _tied_targets(model)
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint at {path} does not match the architecture: missing {sorted(missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
