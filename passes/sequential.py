"""Sequential refit: each consumer is refitted on the inputs the *pruned* model gives it.

The plain refit (compensate.py) fits every consumer on the dense model's inputs, so the errors
of earlier layers are never seen by later ones. Here the decoder blocks are walked in depth
order with two streams of hidden states per calibration batch, the dense model's and the
pruned model's (earlier blocks already cut and refitted). A consumer with dense input x_d and
pruned input x_p (its kept columns S) is fitted to the dense output:

    W' = W C[:, S] (P[S, S] + lambda I)^-1,  C = E[x_d x_p^T],  P = E[x_p x_p^T]

(``lstsq+bias``: centred moments, b' = b + W mu_d - W' mu_p[S]), with lambda as in
compensate.py. The ``self`` target fits W x_p instead (C = P), as SparseGPT's sequential mode. Cost: one dense and two pruned passes over the refit sample (the pruned block
runs again after its own refit), block by block, hidden states held in memory.

The pruned model is the dense one with the dropped channels zeroed (``mask``), which equals the
shrunk model (what Verify checks), so the plan holds for the shrunk weights as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from llmrank.ir.errors import ConfigError, InputError, UnsupportedModelError
from llmrank.ir.graph import ModelIR
from llmrank.passes.calibrate import check_token_ids, symmetric_gram
from llmrank.passes.blocks.capture import Recorder, Stop, layers_path  # how the block-by-block route finds and records its blocks
from llmrank.passes.compensate import Refit, apply_refit, dense_weight, kept_columns, ridge_solve, shifted_bias
from llmrank.passes.hooks import forward_hooks
from llmrank.passes.shrink import mask

SEQUENTIAL_METHODS = ("lstsq", "lstsq+bias")


@dataclass
class CrossStats:
    """Streamed moments of one consumer's pruned input x_p against its dense input x_d (fp64)."""

    pruned_gram: torch.Tensor  # sum x_p x_p^T
    cross: torch.Tensor  # sum x_d x_p^T
    sum_dense: torch.Tensor
    sum_pruned: torch.Tensor
    count: int

    @classmethod
    def of(cls, dense: torch.Tensor, pruned: torch.Tensor) -> CrossStats:
        d = dense.detach().reshape(-1, dense.shape[-1]).float()
        p = pruned.detach().reshape(-1, pruned.shape[-1]).float()
        return cls(symmetric_gram(p).double(), (d.T @ p).double(), d.double().sum(0), p.double().sum(0), d.shape[0])

    def add(self, other: CrossStats) -> None:
        self.pruned_gram += other.pruned_gram
        self.cross += other.cross
        self.sum_dense += other.sum_dense
        self.sum_pruned += other.sum_pruned
        self.count += other.count


def solve_cross(w: torch.Tensor, s: CrossStats, keep: torch.Tensor, offset: int, width: int, *, method: str = "lstsq",
                ridge: float = 1e-3, target: str = "dense") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(kept columns, W', bias shift or None) of one consumer (weight ``w``: out x in, fp64).

    ``target``: ``dense`` fits W' x_p[S] to the dense output W x_d; ``self`` to W x_p, the dense
    weights' response to the pruned inputs (SparseGPT's sequential mode)."""
    cols, _ = kept_columns(w.shape[1], keep, offset, width)
    n = float(s.count)
    p = s.pruned_gram[cols][:, cols] / n
    own = target == "self"
    c = (s.pruned_gram if own else s.cross)[:, cols] / n
    mu_d, mu_p = (s.sum_pruned if own else s.sum_dense) / n, s.sum_pruned[cols] / n
    if method == "lstsq+bias":
        p = p - torch.outer(mu_p, mu_p)
        c = c - torch.outer(mu_d, mu_p)
    w_new = ridge_solve(p, c.T @ w.T, ridge).T
    shift = w @ mu_d - w_new @ mu_p if method == "lstsq+bias" else None
    return cols, w_new, shift


def solve_refits(dense: nn.Module, ir: ModelIR, groups: Sequence[Any], kept: dict[str, torch.Tensor],
                 stats: dict[str, CrossStats], *, method: str, ridge: float, target: str) -> dict[str, Refit]:
    """The refit of every consumer of ``groups`` from its cross moments (``dense`` holds the dense
    weights; the in-memory walk below and the block route both call this)."""
    refits = {}
    for g in groups:
        for port in g.consumers:
            info = ir.linears[port.linear]
            cols, w_new, shift = solve_cross(dense_weight(dense, info), stats[info.name], kept[g.name].to(torch.long),
                                             port.offset, g.width, method=method, ridge=ridge, target=target)
            refits[info.name] = Refit(info.name, cols, w_new, shifted_bias(dense, info, shift))
    return refits


# ---------------------------------------------------------------------- the walk


def decoder_layers(model: nn.Module) -> str:
    """Dotted path of the model's decoder-layer ModuleList (``model.layers``)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(n, int):
        raise UnsupportedModelError(f"{type(model).__name__} has no config.num_hidden_layers: the sequential refit walks "
                                    "decoder blocks; use refit_inputs 'dense'")
    try:
        return layers_path(model, n)
    except InputError as error:
        raise UnsupportedModelError(f"{error}; or use refit_inputs 'dense'") from error


def _block_calls(model: nn.Module, path: str, batches: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[tuple]]]:
    """Block 0's hidden states per batch, and (args, kwargs) of every block per batch (masks and
    rotary tables can differ between blocks, e.g. Gemma-3's local and global layers), recorded
    by stand-ins in the model's own forward, as the block-by-block route does."""
    layers = model.get_submodule(path)
    originals = list(layers)
    hidden, calls = [], []
    for ids in batches:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise InputError("the sequential refit takes token ids [N, L] as calibration data")
        check_token_ids(model, ids)
        sink: dict[int, tuple] = {}
        for i in range(len(originals)):
            layers[i] = Recorder(i, sink, last=i == len(originals) - 1)
        try:
            model(input_ids=ids, use_cache=False)
        except Stop:
            pass
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
        if len(sink) != len(originals):
            raise UnsupportedModelError(f"{type(model).__name__}'s forward called {len(sink)} of its {len(originals)} layers")
        hidden.append(sink[0][0])
        calls.append([(sink[i][1], sink[i][2]) for i in range(len(originals))])
    return hidden, calls


def _run(block: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    out = block(hidden, *call[0], **call[1])
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def _inputs(model: nn.Module, names: Sequence[str], sink: dict[str, dict[str, torch.Tensor]]) -> Iterator[None]:
    """Forward hooks writing each named Linear's input into ``sink["to"]`` (switched per run)."""
    def hook(name: str):
        def record(_m: nn.Module, args: tuple, _out: Any) -> None:
            sink["to"][name] = args[0]
        return record

    with forward_hooks(model, {n: hook(n) for n in names}):
        yield


def sequential_moments(dense: nn.Module, names: Sequence[str], block: str, hidden_dense: Sequence[torch.Tensor],
                       hidden_pruned: Sequence[torch.Tensor], calls: Sequence[tuple]) -> tuple[dict[str, CrossStats], list[torch.Tensor]]:
    """Cross moments of the consumers ``names`` inside the block at path ``block``, and the dense
    block's outputs (the next dense hidden states)."""
    # The pruned model's block differs from the dense one only by its own groups' cuts (earlier
    # blocks are other modules), so the DENSE block run on the pruned hidden states gives the
    # consumer's whole input x_p: its kept columns are what the cut block computes, and the
    # others are what the ``self`` target needs (the cut block has zeros there).
    block_d = dense.get_submodule(block)
    stats: dict[str, CrossStats] = {}
    outputs = []
    seen_d: dict[str, torch.Tensor] = {}
    seen_p: dict[str, torch.Tensor] = {}
    sink = {"to": seen_d}
    with _inputs(dense, names, sink):
        for h_d, h_p, call in zip(hidden_dense, hidden_pruned, calls):
            seen_d.clear()
            seen_p.clear()
            sink["to"] = seen_d
            outputs.append(_run(block_d, h_d, call))
            sink["to"] = seen_p
            _run(block_d, h_p, call)
            for name in names:
                if name not in seen_d or name not in seen_p:
                    raise InputError(f"{name} did not run inside {block}: the sequential refit needs each group's "
                                     "consumers inside one decoder block")
                one = CrossStats.of(seen_d[name], seen_p[name])
                if name in stats:
                    stats[name].add(one)
                else:
                    stats[name] = one
    return stats, outputs


def plan_sequential_refit(
    dense: nn.Module,
    ir: ModelIR,
    kept: dict[str, torch.Tensor],
    batches: Sequence[torch.Tensor],
    *,
    method: str = "lstsq",
    ridge: float = 1e-3,
    target: str = "dense",
    progress: bool = False,
) -> dict[str, Refit]:
    """The refit of every consumer whose group loses channels, fitted block by block on the
    pruned model's inputs against the dense model's outputs (``target="self"``: against the
    dense weights' outputs on those inputs). ``dense`` is not changed."""
    if target not in ("dense", "self"):
        raise ConfigError(f"target must be 'dense' or 'self', got {target!r}")
    if method not in SEQUENTIAL_METHODS:
        raise ConfigError(f"the sequential refit solves least squares: use compensation 'lstsq' or 'lstsq+bias', not {method!r}")
    if not batches:
        raise InputError("the sequential refit needs calibration batches")
    path = decoder_layers(dense)
    n_blocks = len(dense.get_submodule(path))
    cut = [g for g in ir.groups if kept[g.name].numel() < g.width]
    by_block: dict[int, list] = {}
    for g in cut:
        prefixes = {_block_of(port.linear, path) for port in g.consumers}
        if len(prefixes) != 1 or None in prefixes:
            raise UnsupportedModelError(f"group {g.name} has consumers outside one decoder block of {path}: the sequential refit "
                                        "walks blocks; use refit_inputs 'dense'")
        by_block.setdefault(prefixes.pop(), []).append(g)
    was_training = dense.training
    dense.eval()
    pruned = mask(dense, ir, kept).eval()
    refits: dict[str, Refit] = {}
    try:
        with torch.no_grad():
            hidden_d, per_batch = _block_calls(dense, path, batches)
            hidden_p = list(hidden_d)
            for i in tqdm(range(n_blocks), desc="sequential refit", unit="block", disable=not progress):
                block = f"{path}.{i}"
                calls = [c[i] for c in per_batch]
                groups = by_block.get(i, [])
                if groups:
                    names = sorted({port.linear for g in groups for port in g.consumers})
                    stats, hidden_next = sequential_moments(dense, names, block, hidden_d, hidden_p, calls)
                    block_refits = solve_refits(dense, ir, groups, kept, stats, method=method, ridge=ridge, target=target)
                    apply_refit(pruned, ir, block_refits, shrunk=False)
                    refits.update(block_refits)
                else:
                    hidden_next = [_run(dense.get_submodule(block), h, c) for h, c in zip(hidden_d, calls)]
                p_block = pruned.get_submodule(block)
                hidden_p = [_run(p_block, h, c) for h, c in zip(hidden_p, calls)]
                hidden_d = hidden_next
    finally:
        dense.train(was_training)
    return refits


def _block_of(linear: str, path: str) -> int | None:
    prefix = path + "."
    if not linear.startswith(prefix):
        return None
    head = linear[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None
