"""Calibration pass: one walk over the data gathers everything the later passes read.

Two statistics are reduced batch by batch, so memory stays O(parameters), never O(tokens):
- scoring norms: a_in[j] / a_out[j] of a Linear are the mean over batches of the L2 norm of
  feature j over all positions of that batch (a norm per batch, then the mean of the norms);
- refit moments of each group consumer's input: sum x, sum x x^T (float64) and the token
  count, which the least-squares compensation solves with.

One :class:`Accumulator` does the arithmetic; two *taps* feed it the (input, output) of each
watched Linear: forward hooks on an ``nn.Module`` (:func:`collect`), or an FX interpreter over
an ExportedProgram's module (:func:`collect_program`), which has no submodules to hook. A
:class:`Plan` says, per batch, which statistics it feeds, so the scoring sequences and the
(larger) refit sample share one forward pass when the first is a prefix of the second.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from llmrank.ir.errors import CalibrationError, InputError
from llmrank.ir.graph import ModelIR
from llmrank.ir.trace import accepts_cache, is_hf_model
from llmrank.passes.heap import trim_heap
from llmrank.passes.hooks import forward_hooks
from llmrank.passes.ops import linear_data_input

log = logging.getLogger(__name__)


@dataclass
class ActivationNorms:
    """a_in / a_out per Linear name, the mean of per-batch L2 norms, plus the batch count."""

    a_in: dict[str, torch.Tensor] = field(default_factory=dict)
    a_out: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: int = 0
    tokens: int = 0


@dataclass
class InputStats:
    """Streamed first and second moments of one consumer's input channels (float64)."""

    total: torch.Tensor
    gram: torch.Tensor | None
    count: int

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


@dataclass
class CalibrationStats:
    """What the Calibrate pass hands on: scoring norms and refit moments (either may be empty)."""

    norms: ActivationNorms | None = None
    moments: dict[str, InputStats] = field(default_factory=dict)
    refit_tokens: int = 0
    sensitivity: dict[str, torch.Tensor] = field(default_factory=dict)  # E[(dL/dy)^2] per consumer output (the Gradients pass)
    variances: dict[str, torch.Tensor] = field(default_factory=dict)
    # the sequential refit's cross moments per consumer (dense inputs against pruned-stream inputs), where the route
    # measures them itself: the block route runs each block on both streams (``sequential.CrossStats``)
    cross: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """One batch of the walk and which statistics it feeds."""

    batch: Any
    norms: bool
    moments: bool


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]

    @classmethod
    def build(cls, batches: Sequence[Any], refit_batches: Sequence[Any] | None, *, norms: bool, moments: bool) -> Plan:
        """Scoring ``batches`` feed the norms; the refit sample (default: the same batches) feeds
        the moments. When the scoring batches are the first batches of the refit sample (the
        CLI samples both with one seed), one walk over the refit sample serves both."""
        if not moments:
            return cls(tuple(Step(b, norms, False) for b in batches))
        if refit_batches is None:
            return cls(tuple(Step(b, norms, True) for b in batches))
        if not norms:
            return cls(tuple(Step(b, False, True) for b in refit_batches))
        if _is_prefix(batches, refit_batches):
            return cls(tuple(Step(b, i < len(batches), True) for i, b in enumerate(refit_batches)))
        return cls(tuple(Step(b, True, False) for b in batches) + tuple(Step(b, False, True) for b in refit_batches))


def _is_prefix(head: Sequence[Any], whole: Sequence[Any]) -> bool:
    if len(head) > len(whole):
        return False
    for a, b in zip(head, whole):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)):
            return False
    return True


def batch_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of every feature (last dim) over all other positions, in float64."""
    flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    return flat.pow(2).sum(0).sqrt()


def symmetric_gram(x: torch.Tensor, *, block: int = 384) -> torch.Tensor:
    """x^T x from the GEMMs of its upper block triangle, mirrored: about a third fewer FLOPs
    than one full GEMM for a 1536-wide FFN (torch has no syrk), the same numbers."""
    d = x.shape[1]
    if d < 2 * block:
        return x.T @ x
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    starts = range(0, d, block)
    for i in starts:
        left = x[:, i:i + block]
        for j in starts:
            if j < i:
                continue
            piece = left.T @ x[:, j:j + block]
            out[i:i + block, j:j + block] = piece
            if j != i:
                out[j:j + block, i:i + block] = piece.T
    return out


class Accumulator:
    """Sums per-batch reductions of the watched Linears' inputs and outputs."""

    def __init__(self, norm_linears: Iterable[str], moment_linears: Iterable[str], *, second_moment: bool = True,
                 variance_linears: Iterable[str] = ()):
        self.norm_linears = set(norm_linears)
        self.moment_linears = set(moment_linears)
        self.variance_linears = set(variance_linears) & self.norm_linears
        self._spread: dict[str, list] = {}  # name -> [sum x, sum x^2, tokens] over the scoring batches
        self.second_moment = second_moment
        self.sum_in: dict[str, torch.Tensor] = {}
        self.sum_out: dict[str, torch.Tensor] = {}
        self.moments: dict[str, InputStats] = {}
        self.norm_batches = self.norm_tokens = self.refit_tokens = 0
        self._step: Step | None = None

    @property
    def watched(self) -> set[str]:
        return self.norm_linears | self.moment_linears

    def observe(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        step = self._step
        if step is None:
            return
        if step.norms and name in self.norm_linears:
            _add(self.sum_in, name, batch_norm(x))
            _add(self.sum_out, name, batch_norm(y))
            if name in self.variance_linears:
                self._add_spread(name, x)
        if step.moments and name in self.moment_linears:
            self._add_moments(name, x)

    def _add_spread(self, name: str, x: torch.Tensor) -> None:
        """Per-channel sums of x and x^2 (a variance over tokens, without a Gram matrix)."""
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        parts = (flat.sum(0), flat.pow(2).sum(0), flat.shape[0])
        old = self._spread.get(name)
        self._spread[name] = list(parts) if old is None else [old[0] + parts[0], old[1] + parts[1], old[2] + parts[2]]

    def _add_moments(self, name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        # One batch's Gram in fp32 (fast GEMMs), accumulated across batches in fp64. It is added
        # in place, each fp32 element widened as it is read: the same sums as adding its fp64
        # copy, without a second d x d fp64 matrix (254 MB for a 5632-wide FFN) beside the total.
        gram = symmetric_gram(flat) if self.second_moment else None
        total = flat.double().sum(0)
        s = self.moments.get(name)
        if s is None:
            self.moments[name] = InputStats(total, gram.double() if gram is not None else None, flat.shape[0])
            return
        s.total += total
        if gram is not None:
            s.gram.add_(gram)
        s.count += flat.shape[0]

    @contextmanager
    def batch(self, step: Step, tokens: int) -> Iterator[None]:
        self._step = step
        try:
            yield
        finally:
            self._step = None
        if step.norms:
            self.norm_batches += 1
            self.norm_tokens += tokens
        if step.moments:
            self.refit_tokens += tokens

    def result(self) -> CalibrationStats:
        norms = None
        if self.norm_linears:
            if self.norm_batches == 0:
                raise CalibrationError("calibration data is empty: give at least one batch of token ids (e.g. --samples 16)")
            norms = ActivationNorms(batches=self.norm_batches, tokens=self.norm_tokens)
            for name in self.norm_linears:
                if name in self.sum_in:  # a Linear the calibration inputs never reach has no entry
                    norms.a_in[name] = (self.sum_in[name] / self.norm_batches).to(torch.float32)
                    norms.a_out[name] = (self.sum_out[name] / self.norm_batches).to(torch.float32)
        variances = {name: (sq / n - (total / n) ** 2).clamp_min(0.0) for name, (total, sq, n) in self._spread.items()}
        return CalibrationStats(norms=norms, moments=self.moments, refit_tokens=self.refit_tokens, variances=variances)


def _add(table: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    table[name] = value if name not in table else table[name] + value


# ---------------------------------------------------------------------- tap 1: module hooks


class _AllSeen(Exception):
    """Raised by a hook once every watched layer has run in this forward."""


#: Observed Linears between two heap trims (``heap.py``): a forward's freed activations and the
#: statistics' float64 temporaries otherwise fragment glibc's heap, and SmolLM2-135M's calibration
#: climbed to 4.5-4.8 GB within one batch; trimming about once per decoder block kept it at 2.2 GB
#: for no measurable time (per Linear it cost a third of the calibration's time, per batch it
#: left the climb inside the batch).
TRIM_EVERY = 8


class _Watch:
    """Forward hooks feeding ``acc``, which can end a forward early.

    Nothing after the last watched layer feeds a statistic: for a causal LM that is the final
    norm and the LM head, 20 % of SmolLM2's forward FLOPs and over half of Gemma-3-270M's
    (a 262k vocabulary). The first batch runs whole and counts calls; when every watched layer
    ran exactly once, later batches stop as soon as all of them have run. A layer called
    twice per forward (shared weights) keeps every forward whole.
    """

    def __init__(self, acc: Accumulator):
        self.acc = acc
        self.calls: dict[str, int] = {}
        self.early = False
        self.observed = 0

    def hook(self, name: str):
        def record(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.acc.observe(name, args[0], output)
            self.calls[name] = self.calls.get(name, 0) + 1
            self.observed += 1
            if self.observed % TRIM_EVERY == 0:
                trim_heap()
            if self.early and len(self.calls) == len(self.acc.watched):
                raise _AllSeen
        return record

    def run(self, model: nn.Module, batch: Any) -> None:
        self.calls = {}
        try:
            run_batch(model, batch)
        except _AllSeen:
            return
        self.early = len(self.calls) == len(self.acc.watched) and all(n == 1 for n in self.calls.values())


def collect(model: nn.Module, plan: Plan, acc: Accumulator, *, progress: bool = False) -> CalibrationStats:
    """Run the plan's batches through ``model`` (eval mode, no_grad) with forward hooks."""
    watch = _Watch(acc)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), forward_hooks(model, {name: watch.hook(name) for name in sorted(acc.watched)}):
            for step in tqdm(plan.steps, desc="calibrating", unit="batch", disable=not progress):
                with acc.batch(step, tokens_in(step.batch)):
                    watch.run(model, step.batch)
    finally:
        model.train(was_training)
    return acc.result()


def calibrate(
    model: nn.Module,
    ir: ModelIR,
    batches: Iterable[torch.Tensor | dict],
    *,
    linears: Iterable[str] | None = None,
    progress: bool = True,
) -> ActivationNorms:
    """The scoring norms of ``linears`` (default: every Linear of ``ir``) on ``batches``."""
    names = list(linears) if linears is not None else list(ir.linears)
    plan = Plan.build(list(batches), None, norms=True, moments=False)
    return collect(model, plan, Accumulator(names, ()), progress=progress).norms


def run_batch(model: nn.Module, batch: torch.Tensor | dict) -> None:
    """One forward of a token tensor (HF models: ``input_ids``, no cache) or a kwargs dict."""
    if isinstance(batch, dict):
        model(**batch)
        return
    if not isinstance(batch, torch.Tensor) or batch.numel() == 0:
        raise CalibrationError(f"a calibration batch must be a non-empty tensor or dict of tensors, got {type(batch).__name__}")
    if is_hf_model(model):
        check_token_ids(model, batch)
    if hasattr(model, "config") and batch.dtype == torch.long:
        kwargs = {"use_cache": False} if accepts_cache(model) else {}
        model(input_ids=batch, **kwargs)
    else:
        model(batch)


def tokens_in(batch: Any) -> int:
    """Positions in a batch: batch x seq for token ids, rows for feature tensors."""
    first = batch if isinstance(batch, torch.Tensor) else next((x for x in pytree.tree_leaves(batch) if isinstance(x, torch.Tensor)), None)
    if first is None or first.dim() == 0:
        return 1
    return int(first.shape[0] * (first.shape[1] if first.dim() > 1 and not first.is_floating_point() else 1))


def check_token_ids(model: nn.Module, batch: torch.Tensor) -> None:
    """A Hugging Face model takes token ids: integers inside its embedding table."""
    if batch.is_floating_point() or batch.is_complex() or batch.dtype == torch.bool:
        raise CalibrationError(f"calibration batches for {type(model).__name__} must be integer token ids, got dtype {batch.dtype}")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    low, high = int(batch.min()), int(batch.max())
    if vocab is not None and (low < 0 or high >= vocab):
        raise CalibrationError(f"calibration token ids must be in [0, {vocab}) for {type(model).__name__}, got ids from {low} to {high}: wrong tokenizer?")


# ---------------------------------------------------------------------- tap 2: FX interpreter


class _InterpreterTap(fx.Interpreter):
    """Runs a GraphModule and hands each watched Linear node's input and output to ``acc``."""

    def __init__(self, module: fx.GraphModule, watch: dict[str, str], acc: Accumulator):
        super().__init__(module)
        self.watch, self.acc = watch, acc

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        name = self.watch.get(n.name)
        if name is not None:
            self.acc.observe(name, self.env[linear_data_input(n)], out)
        return out


def collect_program(module: fx.GraphModule, ir: ModelIR, plan: Plan, acc: Accumulator) -> CalibrationStats:
    """The same statistics from an FX interpreter over ``ep.module()`` (node names of ``ep.graph``).

    Each batch is a tuple of positional inputs (a lone tensor is accepted).
    """
    watch = {ir.linears[name].node: name for name in acc.watched}
    graph_nodes = {n.name for n in module.graph.nodes}
    missing = [node for node in watch if node not in graph_nodes]
    if missing:
        raise InputError(f"the module's graph lacks the nodes {missing[:3]} of the analysed program: pass ep.module() of the same program")
    tap = _InterpreterTap(module, watch, acc)
    with torch.no_grad():
        for step in plan.steps:
            inputs = as_inputs(step.batch)
            if not inputs:
                raise CalibrationError("a calibration input is an empty tuple")
            with acc.batch(step, tokens_in(inputs)):
                tap.run(*inputs)
    return acc.result()


def as_inputs(item: Any) -> tuple:
    """A program's positional inputs: a tuple/list as is, anything else as a 1-tuple."""
    return tuple(item) if isinstance(item, (tuple, list)) else (item,)
