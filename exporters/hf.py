"""Save and reload physically shrunk Hugging Face causal LMs.

Stock `from_pretrained` rebuilds every MLP from one `config.intermediate_size`, so a
model whose layers kept different widths cannot round-trip through it. When all
layers agree we write that width into the config (stock loading then works); when
they differ we record the widths under `config.llmrank` and `load_hf` rebuilds the
model from the saved weight shapes. Compensation can add a bias the family's config
does not declare (Llama with `mlp_bias: false`): the config's switch is turned on
where the family has one, otherwise the checkpoint is marked for `llmrank.load`,
because stock loading would silently drop those biases. Attention heads
follow the same rule: head counts every layer shares are in the config (the pruning rewrite
writes them), per-layer counts go under `config.llmrank["layer_heads"]` and `load_hf` sets
them on each attention module. `check_reload` proves the
claim by reloading the folder and comparing logits. Nothing here scores or prunes:
it only reads the shapes the model already has.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_path, refuse_input_overlap
from llmrank.ir.errors import ExportError
from llmrank.passes.headcut import set_head_counts
from llmrank.passes.slimconfig import conv1d_type, config_for_save, mlp_widths, text_config, width_field

__all__ = ["save_hf", "load_hf", "check_reload", "mlp_widths", "SaveResult", "ReloadMismatchError"]


class ReloadMismatchError(ExportError):
    """A written checkpoint does not reload into the model it was written from."""


@dataclass
class SaveResult:
    """Where the model went and how to reload it.

    `uniform`: every FFN kept the same width. `stock_loadable`: stock `from_pretrained`
    rebuilds the model exactly; when False, use `llmrank.load` (per-layer widths, or biases
    the family's config cannot declare, listed in `undeclared_biases`).
    """

    path: Path
    uniform: bool
    widths: dict[str, int]
    files: list[str]
    seconds: float
    stock_loadable: bool = True
    undeclared_biases: list[str] = field(default_factory=list)


def save_hf(
    model: nn.Module,
    tokenizer: Any | None,
    out_dir: Path | str,
    *,
    metadata: Mapping[str, Any] | None = None,
    force: bool | int = False,
    max_shard_size: str | int = "5GB",
) -> SaveResult:
    """Write safetensors + config (+ tokenizer) into `out_dir`, atomically.

    With uniform FFN widths the config's width field is set so stock
    `AutoModelForCausalLM.from_pretrained(out_dir)` reloads exactly; with per-layer
    widths use `load_hf` (the widths are in `config.llmrank["layer_widths"]`). A bias the
    config does not declare turns on the family's switch (`mlp_bias`) or, where there is
    none, marks the checkpoint for `load_hf` (`SaveResult.stock_loadable` is then False).
    `force`: see `atomic.check_writable` (2 replaces a folder that is not an llmrank output).
    """
    out_dir = Path(out_dir)
    refuse_input_overlap(out_dir, getattr(model, "name_or_path", None) or None)
    start = time.perf_counter()
    config, widths, uniform, undeclared, zeros = config_for_save(model, metadata or {})
    state = {**model.state_dict(), **zeros} if zeros else None
    with atomic_path(out_dir, force=force) as tmp:
        try:
            with _config_of(model, config):  # save_pretrained validates and writes the live config
                model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size, state_dict=state)
            config.save_pretrained(tmp)  # config.json: the shrunk-shape description
        except Exception as exc:  # transformers' validation errors span lines; the CLI prints one
            raise ExportError(f"cannot write the checkpoint {out_dir}: {type(exc).__name__}: {' '.join(str(exc).split())}") from exc
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    files = sorted(p.name for p in out_dir.iterdir())
    stock = (not widths or (uniform and width_field(text_config(config)) is not None)) and not undeclared
    stock = stock and "layer_heads" not in config.llmrank
    return SaveResult(out_dir, uniform, widths, files, time.perf_counter() - start, stock, undeclared)


@contextlib.contextmanager
def _config_of(model: nn.Module, config: Any) -> Iterator[None]:
    """`model.config` is `config` inside the block (the live one is put back after)."""
    live = model.config
    model.config = config
    try:
        yield
    finally:
        model.config = live


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
    conv1d = conv1d_type()
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


def _add_saved_bias(module: nn.Module, name: str, state: Mapping[str, torch.Tensor]) -> bool:
    """Give a bias-less Linear the bias the checkpoint holds (added by compensation)."""
    bias = state.get(f"{name}.bias")
    if bias is None or not isinstance(module, nn.Linear) or module.bias is not None:
        return False
    module.bias = nn.Parameter(torch.empty_like(bias), requires_grad=module.weight.requires_grad)
    return True


def _tied_targets(model: nn.Module) -> set[str]:
    keys = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) if isinstance(keys, Mapping) else set(keys)


def load_hf(path: Path | str, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a (possibly per-layer shrunk) causal LM saved by `save_hf`.

    Builds the architecture from the config, resizes every Linear/Conv1D whose
    saved weight has another shape, gives a bias to every Linear the checkpoint has one
    for, then loads the safetensors strictly: the only keys allowed to be missing are
    tied ones (e.g. `lm_head.weight`), re-tied after.
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
    conv1d = conv1d_type()
    kinds = (nn.Linear,) + ((conv1d,) if conv1d is not None else ())
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            _resize_to(module, name, state)
            _add_saved_bias(module, name, state)
    for name, (heads, kv_heads) in (getattr(config, "llmrank", None) or {}).get("layer_heads", {}).items():
        set_head_counts(model, name, heads, kv_heads)
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


def _is_causal_lm(model: nn.Module) -> bool:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover
        return True
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False)
    return out.logits if getattr(out, "logits", None) is not None else out[0]


def check_reload(
    folder: Path | str,
    model: nn.Module,
    *,
    stock: bool,
    sample_ids: torch.Tensor | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> float:
    """Reload `folder` the way the report will tell users to, and compare with `model`.

    stock=True: `AutoModelForCausalLM.from_pretrained` (the model's own class for non-causal
    models), which must use every saved tensor and miss none; stock=False: `load_hf`. The
    outputs on `sample_ids` (default: 2 x 8 seeded random ids) must agree within
    atol + rtol * max|output|. Returns the max abs difference; raises ReloadMismatchError.
    """
    folder = Path(folder)
    dtype = next(model.parameters()).dtype
    if stock:
        from transformers import AutoModelForCausalLM

        cls = AutoModelForCausalLM if _is_causal_lm(model) else type(model)
        how = f"stock {cls.__name__}.from_pretrained"
        try:
            reloaded, info = cls.from_pretrained(folder, dtype=dtype, local_files_only=True, output_loading_info=True)
        except Exception as exc:  # noqa: BLE001 - any failure means the claim is wrong
            raise ReloadMismatchError(f"{folder} does not load with {how}: {type(exc).__name__}: {exc}; "
                                      f"load it with llmrank.load") from exc
        ignored = sorted(info.get("unexpected_keys") or [])
        missing = sorted(set(info.get("missing_keys") or []) - _tied_targets(reloaded))
        mismatched = sorted(str(k) for k in info.get("mismatched_keys") or [])
        if ignored or missing or mismatched:
            raise ReloadMismatchError(
                f"{how} does not rebuild {folder} exactly: ignores {ignored}, misses {missing}, "
                f"mismatches {mismatched}; load it with llmrank.load instead")
    else:
        how = "llmrank.load"
        reloaded = load_hf(folder, dtype=dtype)
    reloaded.eval()
    if sample_ids is None:
        vocab = model.get_input_embeddings().num_embeddings
        sample_ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    ids = sample_ids.to(device)
    ref = _outputs(model, ids).float()
    got = _outputs(reloaded.to(device), ids).float()
    diff = float((ref - got).abs().max()) if ref.shape == got.shape else float("inf")
    bound = atol + rtol * float(ref.abs().max())
    if not diff <= bound:  # also catches NaN
        raise ReloadMismatchError(
            f"{folder} reloaded with {how} gives outputs that differ from the model it was written from "
            f"by {diff:.3g} (bound {bound:.3g}); the checkpoint is not the pruned model, please report this")
    return diff
