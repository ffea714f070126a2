"""Scorer x sparsity sweeps: one dense baseline, then every cell, resumable, with tables and plots.

The core (``run_sweep``) takes a model, token tensors and multiple-choice items, never a
model name, so it runs on a tiny random model in tests as well as on SmolLM2. It traces,
analyses and calibrates ONCE and reuses the activation norms (and, for compensation, the
input statistics) for every cell; each cell only scores, selects, shrinks and evaluates.

Every finished cell is written at once to ``DIR/cells/<key>.json`` together with a hash of
the settings that produced it (model, calibration tokens, evaluation tokens, tasks, pruner,
...), so a rerun skips the cells already computed with the same settings and recomputes
the ones computed with others. After every cell ``results.json``, ``results.csv``,
``results.md`` and PNG plots are (re)written from the cells done so far.

Retention is "higher is better, 1 = dense" for every metric:
- perplexity: dense_ppl / pruned_ppl;
- a task: pruned accuracy / dense accuracy, on the task's primary metric (acc_norm for
  social_iqa, acc otherwise);
- mean task accuracy: mean of the primary metric over the tasks; its retention is the mean
  of the per-task retentions (the paper's "average accuracy retention").
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llmrank.ir.errors import ConfigError
from llmrank.passes.registry import get_scorer

__all__ = [
    "Cell", "EvalSpec", "SweepResult", "expand_cells", "parse_grid", "evaluate_model", "run_sweep",
    "retention_rows", "write_outputs", "PRIMARY_METRIC", "TASK_ALIASES",
]

# The metric each task is reported with (tasks.py: social_iqa is reported as acc_norm).
PRIMARY_METRIC = {"social_iqa": "acc_norm"}
TASK_ALIASES = {"step_inference": "goal_step_wikihow/step_inference"}
# Which ScoreConfig parameters change which scorer's scores (others are fixed to defaults,
# so a grid over gamma does not recompute l1 five times).
_DEFAULTS = {"gamma": 0.0, "theta": 0.5}


def primary_metric(task: str) -> str:
    return PRIMARY_METRIC.get(task.rsplit("/", 1)[-1], "acc")


def resolve_task(name: str) -> str:
    return TASK_ALIASES.get(name, name)


def short_task(name: str) -> str:
    return name.rsplit("/", 1)[-1]


# ---------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One pruned model of the sweep."""

    scorer: str
    representation: str
    sparsity: float
    compensation: str = "none"
    gamma: float = 0.0
    theta: float = 0.5
    compensation_samples: int = 0  # sequences behind the compensation statistics (0: the calibration ones)
    allocation: str = "uniform"
    selection: str = "score"
    refit_inputs: str = "dense"

    @property
    def key(self) -> str:
        """File-safe and unique: ``wpr-chained-s0.3-none-g0.5-t0.5``, ``...-lstsq64-...``,
        ``...-t0.5-aerror-selrefit-seq`` (refit options only when not the defaults)."""
        comp = f"{self.compensation}{self.compensation_samples or ''}"
        return f"{self.scorer}-{self.representation}-s{self.sparsity:g}-{comp}-g{self.gamma:g}-t{self.theta:g}" + self._extra("-a", "-sel", "-seq")

    def _extra(self, a: str, sel: str, seq: str) -> str:
        return ((f"{a}{self.allocation}" if self.allocation != "uniform" else "")
                + (f"{sel}{self.selection}" if self.selection != "score" else "")
                + (seq + ("self" if self.refit_inputs == "pruned-self" else "") if self.refit_inputs != "dense" else ""))

    @property
    def series(self) -> str:
        """The label of the curve the cell belongs to (everything but the sparsity)."""
        label = f"{self.scorer}/{self.representation}"
        reads = get_scorer(self.scorer).reads
        if "gamma" in reads:
            label += f" g={self.gamma:g}"
        if "theta" in reads:
            label += f" t={self.theta:g}"
        if self.compensation != "none":
            label += f" +{self.compensation}" + (f"({self.compensation_samples})" if self.compensation_samples else "")
        return label + self._extra(" alloc=", " sel=", " sequential")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "key": self.key, "series": self.series}


def expand_cells(
    scorers: Sequence[str],
    sparsities: Sequence[float],
    *,
    representations: Sequence[str] = ("chained",),
    compensations: Sequence[str] = ("none",),
    gammas: Sequence[float] = (0.0,),
    thetas: Sequence[float] = (0.5,),
    compensation_samples: int = 0,
    allocations: Sequence[str] = ("uniform",),
    selections: Sequence[str] = ("score",),
    refit_inputs: Sequence[str] = ("dense",),
) -> list[Cell]:
    """The product of all options, in that nesting order, with parameters a scorer ignores
    set to their defaults and duplicates removed (first occurrence kept). Allocation and
    selection read the least-squares refit: cells without one keep the defaults."""
    from llmrank.passes.allocate import ALLOCATIONS, SELECTIONS
    from llmrank.passes.config import COMPENSATIONS as METHODS
    from llmrank.passes.config import REFIT_INPUTS
    from llmrank.passes.score import REPRESENTATIONS
    from llmrank.passes.select import check_sparsity

    for s in scorers:
        get_scorer(s)  # an unknown name fails here, with the choices
    for r in representations:
        if r not in REPRESENTATIONS:
            raise ConfigError(f"unknown representation {r!r}; choose from {', '.join(REPRESENTATIONS)}")
    for c in compensations:
        if c not in METHODS:
            raise ConfigError(f"unknown compensation {c!r}; choose from {', '.join(METHODS)}")
    for name, values, known in (("allocation", allocations, ALLOCATIONS), ("selection", selections, SELECTIONS),
                                ("refit_inputs", refit_inputs, REFIT_INPUTS)):
        for v in values:
            if v not in known:
                raise ConfigError(f"unknown {name} {v!r}; choose from {', '.join(known)}")
    for sp in sparsities:
        check_sparsity(sp)
        if sp == 0:
            raise ConfigError("sparsity 0 is the dense baseline, which every sweep evaluates anyway; give sparsities in (0, 1)")
    for name, values in (("gamma", gammas), ("theta", thetas)):
        for v in values:
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {v}")
    if not (scorers and sparsities and representations and compensations and gammas and thetas and allocations and selections and refit_inputs):
        raise ConfigError("every sweep option needs at least one value")

    seen: dict[str, Cell] = {}
    for scorer in scorers:
        for rep in representations:
            for comp in compensations:
                for gamma in gammas:
                    for theta in thetas:
                        for alloc, sel, inputs in itertools.product(allocations, selections, refit_inputs):
                            for sp in sparsities:
                                refit = comp.startswith("lstsq")
                                cell = Cell(
                                    scorer, rep, float(sp), comp,
                                    float(gamma) if "gamma" in get_scorer(scorer).reads else _DEFAULTS["gamma"],
                                    float(theta) if "theta" in get_scorer(scorer).reads else _DEFAULTS["theta"],
                                    compensation_samples if comp != "none" else 0,
                                    alloc if refit else "uniform", sel if refit else "score", inputs if refit else "dense",
                                )
                                seen.setdefault(cell.key, cell)
    return list(seen.values())


_GRID_KEYS = {
    "gamma": "gammas", "gammas": "gammas", "theta": "thetas", "thetas": "thetas",
    "sparsity": "sparsities", "sparsities": "sparsities", "scorer": "scorers", "scorers": "scorers",
    "representation": "representations", "representations": "representations",
    "compensation": "compensations", "compensations": "compensations",
    "allocation": "allocations", "allocations": "allocations", "selection": "selections", "selections": "selections",
    "refit_inputs": "refit_inputs",
}
_NUMERIC = ("gammas", "thetas", "sparsities")


def parse_list(text: str, *, numeric: bool = False) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not numeric:
        return items
    try:
        return [float(t) for t in items]
    except ValueError as exc:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from exc


def parse_grid(specs: Iterable[str]) -> dict[str, list]:
    """``["gamma=0,0.5,1", "theta=0.5"]`` -> ``{"gammas": [0, 0.5, 1], "thetas": [0.5]}``."""
    out: dict[str, list] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or name.strip() not in _GRID_KEYS:
            raise ValueError(f"bad --grid entry {spec!r}: use NAME=v1,v2,... with NAME one of gamma, theta, sparsity, "
                             f"scorer, representation, compensation, allocation, selection, refit_inputs")
        key = _GRID_KEYS[name.strip()]
        out[key] = parse_list(values, numeric=key in _NUMERIC)
        if not out[key]:
            raise ValueError(f"bad --grid entry {spec!r}: no values")
    return out


# ---------------------------------------------------------------- evaluation


@dataclass
class EvalSpec:
    """What every model of the sweep is evaluated on (identical for dense and pruned)."""

    ppl_tokens: torch.Tensor | None = None  # LongTensor[1, T] (or [T]) of held-out text
    seq_len: int = 512
    stride: int | None = None
    tasks: Mapping[str, Sequence[Any]] = field(default_factory=dict)  # task name -> list[MCItem]
    tokenizer: Any = None
    batch_size: int = 16
    ppl_batch_size: int = 1
    protocol: dict[str, Any] = field(default_factory=dict)  # free-form description (split, source, ...)
    bos_token_id: int | None = None  # put in front of every perplexity window (data.bos_token_id)
    more_ppl: Mapping[str, torch.Tensor] = field(default_factory=dict)  # second texts: name -> LongTensor[1, T]

    def __post_init__(self) -> None:
        if self.tasks and self.tokenizer is None:
            raise ValueError("multiple-choice tasks need a tokenizer")

    def fingerprint(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seq_len": self.seq_len, "stride": self.stride, "protocol": self.protocol}
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.ppl_tokens is not None:
            out["ppl_tokens"] = _tensor_hash(self.ppl_tokens)
        if self.more_ppl:
            out["more_ppl"] = {name: _tensor_hash(ids) for name, ids in self.more_ppl.items()}
        out["tasks"] = {name: _items_hash(items) for name, items in self.tasks.items()}
        return out


def _tensor_hash(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return f"{tuple(t.shape)}:{hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]}"


def _items_hash(items: Sequence[Any]) -> str:
    text = json.dumps([asdict(i) if hasattr(i, "__dataclass_fields__") else repr(i) for i in items], sort_keys=True)
    return f"{len(items)}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def evaluate_model(model: nn.Module, spec: EvalSpec, *, progress: bool = False) -> dict[str, Any]:
    """Perplexity on ``spec.ppl_tokens`` and (acc, acc_norm) per task, as a JSON-able dict."""
    from llmrank.evaluate import multiple_choice, perplexity, torch_logits_fn

    fn = torch_logits_fn(model)
    out: dict[str, Any] = {}
    if spec.ppl_tokens is not None:
        res = perplexity(fn, spec.ppl_tokens, seq_len=spec.seq_len, stride=spec.stride,
                         batch_size=spec.ppl_batch_size, progress=progress, bos_token_id=spec.bos_token_id)
        out["perplexity"] = asdict(res)
    for name, ids in spec.more_ppl.items():
        res = perplexity(fn, ids, seq_len=spec.seq_len, stride=spec.stride,
                         batch_size=spec.ppl_batch_size, progress=progress, bos_token_id=spec.bos_token_id)
        out.setdefault("perplexity_on", {})[name] = asdict(res)
    if spec.tasks:
        out["tasks"] = {}
        for name, items in spec.tasks.items():
            res = multiple_choice(fn, spec.tokenizer, items, batch_size=spec.batch_size, progress=progress)
            out["tasks"][name] = asdict(res)
    return out


# ---------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    dense: dict[str, Any]
    cells: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    computed: list[str]  # keys evaluated in this run (the rest were read back)
    files: dict[str, str]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_cell(path: Path, settings_hash: str) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("settings_hash") == settings_hash else None


def cell_config(base: Any, cell: Cell) -> Any:
    """The PruneConfig of one cell: the sweep's shared options with the cell's own."""
    return base.with_(scorer=cell.scorer, representation=cell.representation, sparsity=cell.sparsity,
                      compensation=cell.compensation, gamma=cell.gamma, theta=cell.theta, allocation=cell.allocation,
                      selection=cell.selection, refit_inputs=cell.refit_inputs)


def _shared_config(base: Any, configs: Sequence[Any]) -> Any:
    """Options for the passes run once: calibrate for every cell's scorer and refit."""
    scorer = next((c.scorer for c in configs if not c.scorer_spec.weight_only), configs[0].scorer)
    refits = [c.compensation for c in configs if c.compensation != "none"]
    compensation = next((c for c in refits if c.startswith("lstsq")), refits[0] if refits else "none")
    fisher = any(c.allocation == "fisher" for c in configs)  # the loss sensitivities are gathered once too (Gradients)
    return base.with_(scorer=scorer, compensation=compensation, allocation="fisher" if fisher else "uniform")


def code_fingerprint() -> str:
    """Hash of the source that decides a cell's numbers (ir, passes, evaluation): a stored cell
    computed by other code is recomputed."""
    import llmrank.evaluate
    import llmrank.ir.graph
    import llmrank.passes.pipeline

    digest = hashlib.sha256()
    for package_file in (llmrank.ir.graph.__file__, llmrank.passes.pipeline.__file__, llmrank.evaluate.__file__):
        folder = Path(package_file).parent
        for path in sorted(folder.glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_sweep(
    model: nn.Module,
    cells: Sequence[Cell],
    out_dir: Path | str,
    *,
    calibration: torch.Tensor | None,
    spec: EvalSpec,
    compensation_calibration: torch.Tensor | None = None,
    pruner: str = "local",
    multiple: int = 1,
    min_width: int = 1,
    ridge: float = 1e-3,
    batch_size: int = 4,
    seed: int = 0,
    settings: Mapping[str, Any] | None = None,
    progress: bool = True,
    evaluate_fn: Callable[[nn.Module, EvalSpec], dict[str, Any]] | None = None,
    log: Callable[[str], None] = print,
    plots: bool = True,
    include_stored: bool = True,
) -> SweepResult:
    """Evaluate the dense ``model`` and every cell; write per-cell JSON and the summaries.

    ``calibration``: LongTensor[N, L] token ids (None only if every scorer is weight-only and
    no compensation is asked). ``compensation_calibration`` (default ``calibration``): the
    tokens behind the compensation statistics; its row count must equal each compensated
    cell's ``compensation_samples`` (0 for cells that reuse ``calibration``). ``settings``: anything else that identifies the run (model
    name, ...); it enters the hash that decides whether a stored cell can be reused.
    ``evaluate_fn(model, spec)`` replaces ``evaluate_model`` (tests count calls with it).
    ``include_stored``: the summaries also hold cells that earlier runs (e.g. with other
    scorers or sparsities) stored in ``out_dir`` with the same settings.
    """
    from llmrank.api import as_batches, count_parameters
    from llmrank.passes.config import PruneConfig
    from llmrank.passes.pipeline import Pipeline, PruneState

    base = PruneConfig(pruner=pruner, multiple=multiple, min_width=min_width, ridge=ridge, seed=seed, batch_size=batch_size)
    cell_configs = {c.key: cell_config(base, c) for c in cells}  # every cell's options, checked before any work
    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    evaluate_fn = evaluate_fn or (lambda m, s: evaluate_model(m, s, progress=False))
    fingerprint = {
        "settings": dict(settings or {}), "eval": spec.fingerprint(), "config": base.to_dict(),
        "calibration": _tensor_hash(calibration) if calibration is not None else None,
        "compensation_calibration": _tensor_hash(compensation_calibration) if compensation_calibration is not None else None,
        "params": count_parameters(model), "code": code_fingerprint(),
    }
    settings_hash = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    _atomic_write(out / "sweep.json", json.dumps({"settings_hash": settings_hash, **fingerprint,
                                                 "cells": [c.to_dict() for c in cells]}, indent=2, default=str))
    computed: list[str] = []
    params_before = count_parameters(model)

    dense_path = out / "cells" / "dense.json"
    dense = _read_cell(dense_path, settings_hash)
    if dense is None:
        log("evaluating the dense model ...")
        start = time.perf_counter()
        metrics = evaluate_fn(model, spec)
        dense = {"key": "dense", "scorer": "dense", "sparsity": 0.0, "settings_hash": settings_hash,
                 "params": params_before, "metrics": metrics, "eval_s": time.perf_counter() - start}
        _atomic_write(dense_path, json.dumps(dense, indent=2, default=str))
        computed.append("dense")

    done: dict[str, dict[str, Any]] = {}
    pending: list[Cell] = []
    for cell in cells:
        stored = _read_cell(out / "cells" / f"{cell.key}.json", settings_hash)
        if stored is None:
            pending.append(cell)
        else:
            done[cell.key] = stored
    if done:
        log(f"resuming: {len(done)} of {len(cells)} cells already computed in {out / 'cells'}")

    if pending:
        wanted = {c.compensation_samples for c in pending if c.compensation != "none"}
        have = 0 if compensation_calibration is None else int(compensation_calibration.shape[0])
        if wanted and wanted != {have}:
            raise ConfigError(f"compensated cells want {sorted(wanted)} compensation sequences (0: the calibration "
                              f"ones), this run has {have}; run them separately")
        # The data-dependent passes run once, with what the most demanding cell needs ...
        shared = PruneState(
            config=_shared_config(base, [cell_configs[c.key] for c in pending]), model=model,
            batches=tuple(as_batches(calibration, batch_size=batch_size)) if calibration is not None else (),
            refit_batches=tuple(as_batches(compensation_calibration, batch_size=batch_size)) if compensation_calibration is not None else None,
            progress=progress,
        )
        data, per_cell = Pipeline.stages()
        shared = data.run(shared)  # a cell reuses the gradients it shares
        shared_timings = {f"{name.lower()}_s": seconds for name, seconds in shared.timings.items()}

        bar = tqdm(pending, desc="sweep", unit="cell", disable=not progress)
        for cell in bar:
            bar.set_postfix_str(cell.key)
            # ... and each cell runs the rest of the same pipeline on its own options.
            state = per_cell.run(shared.update(config=cell_configs[cell.key], history=()))
            prune_s = sum(state.timings.values())
            start = time.perf_counter()
            metrics = evaluate_fn(state.slim, spec)
            eval_s = time.perf_counter() - start
            widths = [len(state.kept[g.name]) for g in state.ir.groups]
            record = {
                **cell.to_dict(), "settings_hash": settings_hash, "config": cell_configs[cell.key].to_dict(),
                "params": count_parameters(state.slim), "param_reduction": 1 - count_parameters(state.slim) / params_before,
                "kept_width": {"min": min(widths), "max": max(widths), "mean": sum(widths) / len(widths),
                               "dense": state.ir.groups[0].width},
                "widths": widths,
                "metrics": metrics, "prune_s": prune_s, "eval_s": eval_s, "shared_timings": shared_timings,
            }
            _atomic_write(out / "cells" / f"{cell.key}.json", json.dumps(record, indent=2, default=str))
            done[cell.key] = record
            computed.append(cell.key)
            del state
            gc.collect()
            if len(pending) > 1 and cell is not pending[-1]:  # partial summaries while a long sweep runs
                _summarise(out, dense, cells, done, settings_hash, spec, plots=plots, include_stored=include_stored)

    ordered, rows, files = _summarise(out, dense, cells, done, settings_hash, spec, plots=plots, include_stored=include_stored)
    return SweepResult(dense=dense, cells=ordered, rows=rows, computed=computed, files=files)


def _summarise(out: Path, dense: Mapping[str, Any], cells: Sequence[Cell], done: Mapping[str, dict[str, Any]], settings_hash: str,
               spec: EvalSpec, *, plots: bool, include_stored: bool):
    """(Re)write results.* from the cells done so far (in sweep order), plus stored ones."""
    ordered = [done[c.key] for c in cells if c.key in done]
    if include_stored:  # cells of earlier runs into the same folder, with the same settings
        wanted = {c.key for c in cells}
        for path in sorted((out / "cells").glob("*.json")):
            if path.stem != "dense" and path.stem not in wanted and (rec := _read_cell(path, settings_hash)) is not None:
                ordered.append(rec)
    rows = retention_rows(dense, ordered)
    return ordered, rows, write_outputs(out, dense, ordered, rows, spec=spec, plots=plots)


# ---------------------------------------------------------------- summaries


def _metric(metrics: Mapping[str, Any], task: str, which: str) -> float | None:
    t = (metrics.get("tasks") or {}).get(task)
    return None if t is None else float(t[which])


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    if b == 0:
        return None if a != 0 else 1.0
    return a / b


def retention_rows(dense: Mapping[str, Any], cells: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per model (dense first) with metrics and retention (higher is better)."""
    tasks = list((dense["metrics"].get("tasks") or {}).keys())
    dense_ppl = (dense["metrics"].get("perplexity") or {}).get("ppl")
    rows = []
    for rec in [dense, *cells]:
        m = rec["metrics"]
        ppl = (m.get("perplexity") or {}).get("ppl")
        row: dict[str, Any] = {
            "key": rec["key"], "series": rec.get("series", "dense"), "scorer": rec.get("scorer", "dense"),
            "representation": rec.get("representation", ""), "compensation": rec.get("compensation", ""),
            "gamma": rec.get("gamma"), "theta": rec.get("theta"), "sparsity": float(rec.get("sparsity", 0.0)),
            "params": rec["params"], "param_reduction": rec.get("param_reduction", 0.0),
        }
        if dense_ppl is not None:
            row["ppl"] = ppl
            # dense/pruned: higher is better, like the accuracy retentions.
            row["ppl_retention"] = _ratio(dense_ppl, ppl)
        for name, res in (dense["metrics"].get("perplexity_on") or {}).items():
            other = ((m.get("perplexity_on") or {}).get(name) or {}).get("ppl")
            row[f"ppl_{name}"] = other
            row[f"ppl_{name}_retention"] = _ratio(res["ppl"], other)
        primaries, rets = [], []
        for task in tasks:
            name = short_task(task)
            metric = primary_metric(task)
            for which in ("acc", "acc_norm"):
                row[f"{name}_{which}"] = _metric(m, task, which)
            value = _metric(m, task, metric)
            ret = _ratio(value, _metric(dense["metrics"], task, metric))
            row[f"{name}_retention"] = ret
            primaries.append(value)
            rets.append(ret)
        if tasks:
            row["mean_acc"] = sum(primaries) / len(primaries) if None not in primaries else None
            row["mean_acc_retention"] = sum(rets) / len(rets) if None not in rets else None
        row["prune_s"] = rec.get("prune_s")
        row["eval_s"] = rec.get("eval_s")
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def markdown(rows: Sequence[Mapping[str, Any]], spec: EvalSpec | None = None) -> str:
    """The results as a markdown table, with the protocol and the meaning of retention."""
    from llmrank.report import markdown_table

    if not rows:
        return ""
    cols = ["series", "sparsity", "params"]
    names = [c for c in rows[0] if c not in ("key", "series", "scorer", "representation", "compensation", "gamma",
                                            "theta", "sparsity", "params", "param_reduction", "prune_s", "eval_s")]
    cols += names
    header = [c.replace("_retention", " ret.") for c in cols]
    body = [[_fmt(r.get(c)) if c != "params" else f"{r[c]:,}" for c in cols] for r in rows]
    lines = [markdown_table(body, header), ""]
    lines.append("Retention is higher-is-better with 1 = dense: perplexity retention = dense ppl / pruned ppl; "
                 "task retention = pruned / dense accuracy (primary metric: acc_norm for social_iqa, acc otherwise); "
                 "mean_acc ret. = mean of the task retentions.")
    if spec is not None and spec.protocol:
        lines.append("Protocol: " + ", ".join(f"{k}={v}" for k, v in spec.protocol.items()))
    return "\n".join(lines)


def pivot(rows: Sequence[Mapping[str, Any]], metric: str, digits: int = 4) -> str:
    """One metric as a markdown table: a row per series, a column per sparsity (dense in
    the first column), so a curve reads left to right."""
    from llmrank.report import markdown_table

    if not rows or metric not in rows[0]:
        return ""
    dense = rows[0].get(metric)
    sparsities = sorted({r["sparsity"] for r in rows[1:]})
    table: dict[str, dict[float, Any]] = {}
    for r in rows[1:]:
        table.setdefault(r["series"], {})[r["sparsity"]] = r.get(metric)
    fmt = lambda v: "" if v is None else f"{v:.{digits}g}"  # noqa: E731
    body = [[name, fmt(dense), *(fmt(cells.get(sp)) for sp in sparsities)] for name, cells in table.items()]
    return markdown_table(body, ["series", "dense", *(f"{sp:g}" for sp in sparsities)])


def write_outputs(out: Path, dense: Mapping[str, Any], cells: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                  *, spec: EvalSpec | None = None, plots: bool = True) -> dict[str, str]:
    files: dict[str, str] = {}
    payload = {
        "retention": "higher is better, 1 = dense; perplexity: dense/pruned; tasks: pruned/dense on the primary metric",
        "primary_metric": {short_task(t): primary_metric(t) for t in (dense["metrics"].get("tasks") or {})},
        "protocol": spec.protocol if spec is not None else {},
        "dense": dense, "cells": list(cells), "rows": list(rows),
    }
    _atomic_write(out / "results.json", json.dumps(payload, indent=2, default=str))
    files["json"] = str(out / "results.json")
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    _atomic_write(out / "results.csv", buf.getvalue())
    files["csv"] = str(out / "results.csv")
    _atomic_write(out / "results.md", markdown(rows, spec) + "\n")
    files["md"] = str(out / "results.md")
    more = [(f"perplexity on {name} (lower is better)", pivot(rows, f"ppl_{name}"))
            for name in (dense["metrics"].get("perplexity_on") or {})]
    parts = [f"### {title}\n\n{table}\n" for title, table in (
        ("perplexity (lower is better)", pivot(rows, "ppl")), *more,
        ("mean task accuracy (primary metric per task)", pivot(rows, "mean_acc", 3)),
        ("mean task accuracy retention (pruned / dense)", pivot(rows, "mean_acc_retention", 3))) if table]
    _atomic_write(out / "pivot.md", "\n".join(parts))
    files["pivot"] = str(out / "pivot.md")
    if plots:
        files.update(plot_retention(out, rows))
    return files


def plot_retention(out: Path, rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """retention vs sparsity, one line per series: perplexity and mean task accuracy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional (pip install llmrank[plot])
        return {}
    files = {}
    for metric, fname, title in (("ppl_retention", "retention_perplexity.png", "perplexity retention (dense ppl / pruned ppl)"),
                                 ("mean_acc_retention", "retention_accuracy.png", "mean task accuracy retention (pruned / dense)")):
        if not rows or metric not in rows[0]:
            continue
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows[1:]:
            if r.get(metric) is not None:
                series.setdefault(r["series"], []).append((r["sparsity"], r[metric]))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for name, points in series.items():
            points = [(0.0, 1.0)] + sorted(points)
            style = "--" if name.startswith("random") else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=name)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("FFN sparsity (fraction of channels removed)")
        ax.set_ylabel("retention (1 = dense)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files[metric] = str(out / fname)
    return files

