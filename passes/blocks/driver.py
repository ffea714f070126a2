"""Block-by-block pruning of a Hugging Face decoder checkpoint that need not fit in memory.

``run_blocks(folder, batches, refit, config=...)`` (public: ``llmrank.prune_layerwise``) gives the
in-memory prune's result (the same kept sets and heads, the same refits, logits within the
verification bound) while holding one decoder block's weights at a time:

1. the model is built on the meta device (no weights); only the embeddings are read;
2. the inputs of every decoder block (hidden states and the keyword arguments the model's
   forward hands its layers: masks, rotary embeddings) are captured for each calibration
   batch by running the model's own forward with recording stand-ins for its layers;
3. per block, in depth order: its weights are read from the safetensors shards, it is traced
   and analysed (the same ``analyze`` as a whole model, with the same names, because the block
   is traced inside a holder that reproduces its path ``model.layers.{i}``), and the pipeline's
   own passes run on it (``PruneState.block`` set, the block as the model): the route's
   calibration tap (the calibration hidden states through the block under the Calibrate pass's
   :class:`Accumulator`: norms, refit moments and head variances in one walk), ``Score`` (with
   ``state.upstream``, what earlier blocks passed on), ``Select`` (under the budget set once for
   the whole model), ``Compensate`` (the refit; it drops the Grams), then ``Shrink`` (in place:
   the block is the route's own copy, so it takes the masked reference's output first) and
   ``Verify``; its slim tensors are written, and it goes back to meta;
4. the hidden states handed to the next block are the DENSE block's outputs, because the
   in-memory prune computes every statistic on the dense model; the sequential refit
   (``refit_inputs`` pruned) also carries the pruned model's hidden states;
5. a choice that spans blocks (global pruner, ``target_params``, error allocation) needs every
   block first: a first walk scores (and records removal curves), ``choose`` decides on all
   blocks at once (the Select pass's functions), and a second walk refits, shrinks and writes.

Every option is checked against ``routes.BLOCKS`` before anything is read (``check_config``).

The output is an HF checkpoint: sharded safetensors with ``model.safetensors.index.json``, a
config that describes the slim widths (``exporters/hf.py`` conventions, so ``llmrank.load``
and, for uniform widths, stock ``from_pretrained`` reload it) and the tokenizer files.

This module is the run loop; the parts live beside it: ``checkpoint.py`` (reading and writing
safetensors shards), ``onload.py`` (the meta skeleton, a block's weights on and off the device),
``capture.py`` (recording and replaying what the model hands its layers), ``hidden.py`` (the
calibration hidden states, spilled to disk past a budget).
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmrank.ir.errors import InputError, VerificationError
from llmrank.ir.graph import ModelIR
from llmrank.ir.trace import example_tokens, trace
from llmrank.passes import routes
from llmrank.passes.allocate import Curve, removal_curves
from llmrank.passes.analyze import analyze, residual_writers
from llmrank.passes.blocks.capture import Holder, Recorder, Replay, Stop, layers_path, split_call
from llmrank.passes.blocks.checkpoint import Checkpoint, ShardWriter, finish_checkpoint
from llmrank.passes.blocks.hidden import HiddenStates, SpillBudget
from llmrank.passes.blocks.onload import buffers_to_own, materialise, materialise_own, release, skeleton, to_meta
from llmrank.passes.calibrate import Accumulator, CalibrationStats, Plan, Step, check_token_ids
from llmrank.passes.choose import Budget, budget, choose, is_local, needs_curves
from llmrank.passes.compensate import consumer_linears
from llmrank.passes.config import PruneConfig
from llmrank.passes.headcut import head_notes, heads_kept
from llmrank.passes.headscore import variance_linears
from llmrank.passes.heap import release_memory, trim_heap
from llmrank.passes.hooks import forward_hooks
from llmrank.passes.result import PruneResult
from llmrank.passes.score import Scores, Upstream
from llmrank.passes.select import clamp_notes, effective_sparsity
from llmrank.passes.pipeline import Compensate, FunctionPass, Pass, Pipeline, PruneState, Score, Select, Shrink, Verify
from llmrank.passes.sequential import CrossStats, sequential_moments
from llmrank.passes.verify import OutputCheck, Verification

log = logging.getLogger(__name__)

#: The rewrite, run on each block once its refit is planned and the Grams are gone.
REWRITE = Pipeline([Shrink(), Verify()])
#: Each pass's phase in a block's timings (``BlockRecord.seconds``).
PHASES = {"Calibrate": "calibrate", "Score": "score", "Curves": "curves", "Select": "select+refit",
          "Compensate": "select+refit", "Shrink": "shrink+verify", "Verify": "shrink+verify"}


# ---------------------------------------------------------------------- results


@dataclass
class BlockRecord:
    """One block's work: seconds per phase (over both walks for the global pruner) and the RSS after it."""

    index: int
    seconds: dict[str, float] = field(default_factory=dict)
    rss_bytes: int = 0
    verification: Verification | None = None

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "seconds": self.seconds, "total_s": sum(self.seconds.values()),
                "rss_bytes": self.rss_bytes, "verification": self.verification.to_dict() if self.verification else None}


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _rss_now() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is optional
        return peak_rss_bytes()


@dataclass(frozen=True)
class Walk:
    """What one walk over the blocks does: score them (norms, scores, the upstream carry), record
    each group's removal curve at ``curves_at``, and/or rewrite them (refit, shrink, verify, write)
    with the whole-model choice ``kept`` or, when None, a choice made per block under ``plan``."""

    score: bool = False
    curves_at: float | None = None
    rewrite: bool = False
    plan: Budget | None = None
    kept: dict[str, torch.Tensor] | None = None


# ---------------------------------------------------------------------- the job


def check_config(config: PruneConfig, *, why: str = "") -> None:
    """What the block route cannot honour, refused before anything is read (``routes.BLOCKS``)."""
    routes.check(config, routes.BLOCKS, why=why)


def run_blocks(
    folder: Path | str,
    batches: Sequence[torch.Tensor],
    refit: Sequence[torch.Tensor] | None,
    *,
    config: PruneConfig,
    write_to: Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = False,
    hidden_budget_bytes: float = math.inf,
    max_shard_size: int = 2 * 1024**3,
    metadata: dict[str, Any] | None = None,
) -> PruneResult:
    """Prune the checkpoint in ``folder`` one decoder block at a time (see the module docstring).

    ``batches`` (token id batches) feed the scores, ``refit`` (default: the same) the refit
    moments. ``dtype``: the working precision (default: the dtype most of the checkpoint is in);
    statistics accumulate in fp32/fp64 and every written tensor keeps its stored dtype.
    ``hidden_budget_bytes``: past this, the calibration hidden states are spilled to a temporary
    folder. ``write_to``: an existing empty folder for the slim checkpoint (the caller makes the
    write atomic); None writes nothing.
    """
    config = config or PruneConfig()
    check_config(config)
    clock = time.perf_counter()
    folder = Path(folder)
    ckpt = Checkpoint(folder)
    device = torch.device(device)
    ckpt_dtype = ckpt.dtype()
    dtype = dtype or ckpt_dtype
    stored = sorted(str(d).replace("torch.", "") for d in ckpt.dtypes())
    dtype_notes = (f"the checkpoint mixes {' and '.join(stored)} tensors: the blocks are computed in "
                   f"{str(dtype).replace('torch.', '')} (most of its weights) and every tensor is written back in the "
                   "dtype it was stored in",) if len(stored) > 1 else ()
    batches = tuple(batches)
    refit = tuple(refit) if refit is not None else None
    if config.needs_calibration and not batches and not refit:
        raise InputError(f"scorer {config.scorer!r} with compensation {config.compensation!r} needs calibration data: "
                         "give token ids [N, L] (e.g. llmrank.data.calibration_tokens)")
    wants_norms = bool(batches) or not config.scorer_spec.weight_only
    # the refit batches ride in the plan as 'moments' steps: the dense refit's moments, or the pruned stream's batches
    plan = Plan.build(batches, refit, norms=wants_norms and bool(batches),
                      moments=config.needs_moments or config.refit_inputs != "dense")

    model = skeleton(folder, dtype)
    params_before = sum(p.numel() for p in model.parameters())
    token_batches = [step.batch for step in plan.steps] + [_sample_ids(model, batches)]
    run = _Run(config, ckpt, model, plan, token_batches, device, dtype, hidden_budget_bytes, progress)
    run.dtype_notes = dtype_notes
    if write_to is not None:
        run.writer, run.out_dtype = ShardWriter(write_to, max_shard_size), ckpt_dtype
    try:
        run.capture()
        if is_local(config):  # each block's kept sets depend on that block alone: one walk
            run.walk(Walk(score=True, rewrite=True, plan=Budget(config.sparsity, config.head_sparsity)))
        else:  # the choice spans blocks: score them all, choose as the in-memory Select does, then rewrite
            early = needs_curves(config) and config.allocation != "uniform" and config.target_params is None
            run.walk(Walk(score=True, curves_at=config.sparsity if early else None))
            cut = budget(config, run.all_ir(), run.scores.heads, params_before)
            whole = config.pruner == "global" or config.allocation != "uniform"
            if whole and needs_curves(config) and not early:
                run.capture()
                run.walk(Walk(curves_at=cut.sparsity))
            kept = choose(config, run.all_ir(), run.scores.groups, run.scores.heads, cut, curves=run.curves,
                          notes=False).kept if whole else None
            run.capture()  # the next walk starts again from the embeddings
            run.walk(Walk(rewrite=True, plan=cut, kept=kept))
        output_check = run.check_outputs()
    finally:
        run.close()
    release(model)  # the embeddings (and a tied head) are done with: the final write must not hold them twice
    release_memory()
    ir = run.all_ir()
    kept = {g.name: run.kept[g.name] for g in ir.groups} | {hg.name: run.kept[hg.name] for hg in ir.head_groups
                                                             if hg.name in run.kept}  # the in-memory order
    widths = {g.name: (g.width, len(kept[g.name])) for g in ir.groups}
    if write_to is not None:
        tick = time.perf_counter()
        assert run.writer is not None
        finish_checkpoint(write_to, run.writer, ckpt, model, f"{run.path}.", run.out_dtype,
                          _checkpoint_metadata(ckpt, config, widths, metadata or {}))
        run.timings["write"] = run.timings.get("write", 0.0) + time.perf_counter() - tick
    cut = run.cut
    groups = {g.name: kept[g.name] for g in ir.groups}
    notes = cut.notes + run.dtype_notes + tuple(clamp_notes(ir, groups, cut.sparsity, multiple=config.multiple,
                                                            min_width=config.min_width))
    if cut.heads is None and cut.head_sparsity > 0:
        notes += tuple(head_notes(ir, {hg.name: kept[hg.name] for hg in ir.head_groups}, cut.head_sparsity))
    for note in notes:
        log.warning(note)
    params_after = sum(p.numel() for p in model.parameters())
    timings = {**run.timings, "total": time.perf_counter() - clock}
    checks = [b.verification for b in run.records if b.verification is not None]
    worst = max(checks, key=lambda v: v.max_abs_diff / max(v.atol + v.rtol * v.reference_scale, 1e-30), default=None)
    return PruneResult(
        route="block by block", ir=ir, heads=heads_kept(ir, kept) if config.heads else {}, kept=kept, scores=run.scores, widths=widths, params_before=params_before, params_after=params_after,
        blocks=run.records, timings=timings, peak_rss_bytes=peak_rss_bytes(), hidden_bytes=run.hidden_peak,
        spilled=run.spilled, verification=worst, output_check=output_check, notes=notes,
        config={**config.to_dict(), "effective_sparsity": effective_sparsity(ir, kept),
                "compensation_tokens": run.refit_tokens if config.compensation != "none" else 0,
                "calibration_batches": sum(1 for s in plan.steps if s.norms), "calibration_tokens": run.norm_tokens,
                "applied": cut.to_dict()},
        out_dir=write_to, dtype=str(dtype).replace("torch.", ""), device=str(device),
        peak_device_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        sample_ids=run.token_batches[run.sample], sample_logits=run.sample_logits,
    )


def _sample_ids(model: nn.Module, batches: Sequence[Any]) -> torch.Tensor:
    """The verification sample the in-memory pipeline uses: the first batch's [:2, :64], else example tokens."""
    for batch in batches:
        if isinstance(batch, torch.Tensor) and batch.dim() == 2 and batch.dtype == torch.long:
            return batch[:2, :64]
    return example_tokens(model)


class _Run:
    """The walks over the blocks and what they accumulate (IRs, scores, kept sets, the carry)."""

    def __init__(self, config: PruneConfig, ckpt: Checkpoint, model: nn.Module, plan: Plan, token_batches: list[torch.Tensor],
                 device: torch.device, dtype: torch.dtype, budget: float, progress: bool):
        self.config, self.ckpt, self.model, self.plan = config, ckpt, model, plan
        self.token_batches, self.device, self.dtype, self.budget, self.progress = token_batches, device, dtype, budget, progress
        self.n_layers = int(getattr(model.config.get_text_config(decoder=True), "num_hidden_layers"))
        self.path = layers_path(model, self.n_layers)
        self.sample = len(token_batches) - 1  # the verification sample rides along as the last batch
        self.irs: list[ModelIR] = []
        self.writers: list[list[str]] = []
        self.scores = Scores()
        self.kept: dict[str, torch.Tensor] = {}
        self.records = [BlockRecord(i) for i in range(self.n_layers)]
        self.timings: dict[str, float] = {}
        self.refit_tokens = self.norm_tokens = 0
        self.hidden: HiddenStates | None = None
        self.pruned: HiddenStates | None = None  # the sequential refit's pruned stream
        self.calls: list[list[tuple[tuple, dict]]] = []
        self.dense_sample: torch.Tensor | None = None
        self.slim_sample: torch.Tensor | None = None
        self.hidden_peak, self.spilled = 0, False
        self.writer: ShardWriter | None = None
        self.out_dtype = dtype
        self.sample_logits: torch.Tensor | None = None
        self.curves: dict[str, Curve] = {}
        self.dtype_notes: tuple[str, ...] = ()
        self.cut = Budget(config.sparsity, config.head_sparsity)

    # -- the frame -------------------------------------------------------------------------

    def _frame_modules(self) -> list[tuple[str, nn.Module]]:
        """Modules outside the decoder layers and the head (embeddings, final norm, rotary)."""
        layers = self.model.get_submodule(self.path)
        inside = {id(m) for layer in layers for m in layer.modules()} | {id(layers)}
        head = self.model.get_output_embeddings()
        return [(n, m) for n, m in self.model.named_modules() if id(m) not in inside and m is not head]

    def capture(self) -> None:
        """Run the model's own forward for every batch with recording stand-ins for its layers:
        block 0's hidden states and every layer's arguments, per batch."""
        tick = time.perf_counter()
        for name, module in self._frame_modules():
            if any(p.is_meta for p in module.parameters(recurse=False)):
                materialise_own(module, name, self.ckpt, self.device, self.dtype, root=self.model)
            buffers_to_own(module, self.device)
        self.close()
        self.spill_budget = SpillBudget(self.budget)  # the dense and the pruned stream share it
        self.hidden = HiddenStates(shared=self.spill_budget)
        self.calls = []
        layers = self.model.get_submodule(self.path)
        originals = list(layers)
        for k, ids in enumerate(self.token_batches):
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
                raise InputError("block-by-block pruning takes token ids [N, L] as calibration data, "
                                 f"got a batch of type {type(ids).__name__}")
            check_token_ids(self.model, ids)
            sink: dict[int, tuple] = {}
            for i in range(self.n_layers):
                layers[i] = Recorder(i, sink, last=i == self.n_layers - 1)
            try:
                with torch.no_grad():
                    self.model(input_ids=ids.to(self.device), use_cache=False)
            except Stop:
                pass
            finally:
                for i, layer in enumerate(originals):
                    layers[i] = layer
            if len(sink) != self.n_layers:
                raise InputError(f"{type(self.model).__name__}'s forward called {len(sink)} of its {self.n_layers} layers: "
                                 "it cannot be pruned block by block")
            self.hidden.put(k, sink[0][0])
            self.calls.append([(sink[i][1], sink[i][2]) for i in range(self.n_layers)])
        self.dense_sample = self.slim_sample = self.hidden.get(self.sample)
        self.timings["capture"] = self.timings.get("capture", 0.0) + time.perf_counter() - tick

    def close(self) -> None:
        if self.pruned is not None:
            self.spilled = self.spilled or self.pruned.spill is not None
            self.pruned.close()
            self.pruned = None
        if self.hidden is not None:
            self.hidden_peak = max(self.hidden_peak, self.hidden.pool.peak)  # both streams' hidden states in memory
            self.spilled = self.spilled or self.hidden.spill is not None
            self.hidden.close()
            self.hidden = None

    def all_ir(self) -> ModelIR:
        """One IR holding every block's groups (what select and clamp_notes read)."""
        linears, feeds, blocked = {}, {}, {}
        for ir in self.irs:
            linears.update(ir.linears)
            feeds.update(ir.feeds)
            blocked.update(ir.blocked)
        return ModelIR(type(self.model).__name__, linears, [g for ir in self.irs for g in ir.groups], feeds, blocked,
                       [hg for ir in self.irs for hg in ir.head_groups])

    def _time(self, record: BlockRecord, phase: str, since: float) -> float:
        now = time.perf_counter()
        self._add(record, phase, now - since)
        return now

    def _add(self, record: BlockRecord, phase: str, seconds: float) -> None:
        record.add(phase, seconds)
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    def _args(self, k: int, i: int) -> list[torch.Tensor]:
        return split_call(*self.calls[k][i])[0]

    # -- the walk --------------------------------------------------------------------------

    def walk(self, walk: Walk) -> None:
        """One pass over the blocks in depth order, doing what ``walk`` asks of each block."""
        from tqdm.auto import tqdm

        c = self.config
        upstream = Upstream()
        moments = walk.curves_at is not None or (walk.rewrite and c.needs_moments)
        # the sequential refit: the refit batches also run through the pruned blocks (a second stream)
        stream = [k for k, s in enumerate(self.plan.steps) if s.moments] if walk.rewrite and c.refit_inputs != "dense" else []
        steps = [(k, Step(s.batch, s.norms and walk.score, s.moments and moments)) for k, s in enumerate(self.plan.steps)]
        steps = [(k, s) for k, s in steps if s.norms or s.moments or k in stream]  # a batch nothing needs is not propagated
        if stream:
            self.pruned = HiddenStates(shared=self.spill_budget)
            for k in stream:
                self.pruned.put(k, self.hidden.get(k))
        if walk.plan is not None:
            self.cut = walk.plan
        for i in tqdm(range(self.n_layers), desc="blocks", unit="block", disable=not self.progress):
            record = self.records[i]
            tick = time.perf_counter()
            block = self.model.get_submodule(self.path)[i]
            materialise(block, f"{self.path}.{i}.", self.ckpt, self.device, self.dtype)
            check_block_weights(block, f"{self.path}.{i}.")
            block.eval()
            tick = self._time(record, "load", tick)
            tensors, spec, constants = split_call(*self.calls[0][i])
            holder = Holder(self.path, i, block, spec, constants)
            if len(self.irs) <= i:
                traced = trace(holder, (self.hidden.get(0), *tensors), dynamic=False)
                self.irs.append(analyze(traced, prune_tied=c.prune_tied))
                self.writers.append(residual_writers(traced, self.irs[i]))
                del traced
                self._time(record, "trace", tick)
            ir = self.irs[i]
            kept = None if walk.kept is None else {n: walk.kept[n] for n in self._names(ir) if n in walk.kept}
            # the pipeline's passes on this block, its statistics from the route's tap; they live only in the state,
            # so their Grams go when Compensate, their last reader, drops them
            state = Pipeline(self._passes(walk, holder, ir, i, steps, stream)).run(
                PruneState(config=c, model=holder, ir=ir, block=i, upstream=upstream, budget=self.cut, kept=kept,
                           scores=self.scores))  # the scores so far (Score replaces them with this block's)
            for name, seconds in ((r.name, r.seconds) for r in state.history):
                self._add(record, PHASES.get(name, name), seconds)
            if walk.score:
                upstream = upstream.after(ir, state.norms, state.scores, self.writers[i])
                self._keep_scores(ir, state.scores)
            if walk.rewrite:
                self.kept.update({name: idx.cpu() for name, idx in state.kept.items()})
                state = self._rewrite(state, record)
                for k in stream:  # the next block's pruned inputs: this block cut and refitted
                    with torch.no_grad():
                        self.pruned.put(k, holder(self.pruned.get(k), *self._args(k, i)))
            del state
            to_meta(block)
            release_memory()
            record.rss_bytes = _rss_now()

    def _passes(self, walk: Walk, holder: Holder, ir: ModelIR, i: int, steps: list[tuple[int, Step]],
                stream: list[int]) -> list[Pass]:
        """What ``walk`` runs on block ``i``: the calibration tap (the route's Calibrate), then the
        pipeline's own Score, Select and Compensate as the walk asks."""
        def calibrate(state: PruneState) -> PruneState:
            cross = self._cross_moments(holder, ir, i, stream) if stream else {}  # reads the dense inputs: first
            return state.update(stats=self._statistics(holder, ir, i, steps, cross))

        def curves(state: PruneState) -> None:
            self.curves.update(self._curves(holder, ir, state.scores, state.stats, walk.curves_at))

        passes: list[Pass] = [FunctionPass(calibrate, "Calibrate")]
        if walk.score:
            passes.append(Score())
        if walk.curves_at is not None:
            passes.append(FunctionPass(curves, "Curves"))
        if walk.rewrite:
            passes += ([Select()] if walk.kept is None else []) + [Compensate()]
        return passes

    def _keep_scores(self, ir: ModelIR, scores: Scores) -> None:
        """A block's scores, kept on the CPU for the whole-model choice and the result."""
        for g in ir.groups:
            self.scores.groups[g.name] = scores.groups[g.name].cpu()
            if g.name in scores.outputs:  # a user scorer may give channel scores only
                self.scores.outputs[g.name] = scores.outputs[g.name].cpu()
        for hg in ir.head_groups:
            if hg.name in scores.heads:
                self.scores.heads[hg.name] = scores.heads[hg.name].cpu()

    @staticmethod
    def _names(ir: ModelIR) -> list[str]:
        return [g.name for g in ir.groups] + [hg.name for hg in ir.head_groups]

    def _cross_moments(self, holder: Holder, ir: ModelIR, i: int, stream: list[int]) -> dict[str, CrossStats]:
        """Each consumer's dense inputs against its pruned-stream inputs, the dense block run on both
        (the sequential refit's moments, ``sequential.sequential_moments``)."""
        names = consumer_linears(ir)
        calls = [self.calls[k][i] for k in stream]
        with torch.no_grad():
            stats, _ = sequential_moments(holder, names, f"{self.path}.{i}", [self.hidden.get(k) for k in stream],
                                          [self.pruned.get(k) for k in stream], calls)
        return stats

    def _curves(self, holder: Holder, ir: ModelIR, scores: Scores, stats: CalibrationStats, sparsity: float) -> dict[str, Curve]:
        c = self.config
        return removal_curves(holder, ir, scores.groups, stats.moments, sparsity, allocation=c.allocation,
                              selection=c.selection, multiple=c.multiple, min_width=c.min_width, ridge=c.ridge,
                              centred=c.compensation == "lstsq+bias")

    def _statistics(self, holder: Holder, ir: ModelIR, i: int, steps: list[tuple[int, Step]],
                    cross: dict[str, CrossStats]) -> CalibrationStats:
        """This block's norms, moments and head variances on the calibration hidden states (the
        Calibrate pass's Accumulator), replacing each batch's hidden states by the DENSE block's outputs.
        ``cross``: the sequential refit's moments, measured before (they read the dense inputs)."""
        c = self.config
        wants_norms = any(s.norms for _, s in steps)
        wants_moments = any(s.moments for _, s in steps)
        acc = Accumulator(ir.calibration_linears() if wants_norms else (),
                          consumer_linears(ir, heads=c.heads) if wants_moments else (),
                          second_moment=c.second_moment,
                          variance_linears=variance_linears(ir) if wants_norms and c.needs_variances else ())
        with forward_hooks(holder, {name: _hook(acc, name) for name in sorted(acc.watched)}), torch.no_grad():
            for k, step in steps:
                x = self.hidden.get(k)
                with acc.batch(step, int(math.prod(x.shape[:-1]))):
                    y = holder(x, *self._args(k, i))
                check_finite_activations(y, i, k, self.dtype)
                self.hidden.put(k, y)
                trim_heap()
        stats = acc.result() if (wants_norms or wants_moments) else CalibrationStats()
        stats.cross = cross
        if wants_moments:
            self.refit_tokens = acc.refit_tokens
        if wants_norms:
            self.norm_tokens = acc.norm_tokens
        return stats

    def _rewrite(self, state: PruneState, record: BlockRecord) -> PruneState:
        """Shrink the refitted block in place and check it against the masked dense block (the
        pipeline's Shrink and Verify), carrying the verification sample's two streams; write it."""
        i, holder = state.block, state.model
        args = self._args(self.sample, i)
        dense_in, slim_in = self.dense_sample, self.slim_sample
        with torch.no_grad():
            self.dense_sample = holder(dense_in, *args)
        done = len(state.history)
        state = REWRITE.run(state.update(example_inputs=(dense_in, *args)))
        for r in state.history[done:]:
            self._add(record, PHASES[r.name], r.seconds)
        record.verification = state.verification
        tick = time.perf_counter()
        with torch.no_grad():
            self.slim_sample = holder(slim_in, *args)
        tick = self._time(record, "shrink+verify", tick)
        if self.writer is not None:
            prefix = f"{self.path}.{i}."
            for name, t in holder.block.state_dict().items():
                self.writer.add(prefix + name, t.to(self.ckpt.dtype_of(prefix + name, self.out_dtype)))
            self._time(record, "write", tick)
        return state.update(refits=None, reference_output=None)

    # -- the final check -------------------------------------------------------------------

    def _logits(self, final: torch.Tensor) -> torch.Tensor:
        """The model's own forward (final norm, head, soft-capping) on the sample, with the layers
        replaced by stand-ins whose last one returns ``final``."""
        layers = self.model.get_submodule(self.path)
        originals = list(layers)
        for i in range(self.n_layers):
            layers[i] = Replay(final if i == self.n_layers - 1 else None)
        try:
            with torch.no_grad():
                out = self.model(input_ids=self.token_batches[self.sample].to(self.device), use_cache=False)
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
        return out.logits if getattr(out, "logits", None) is not None else out[0]

    def check_outputs(self) -> OutputCheck | None:
        """The CheckOutputs pass's numbers: slim vs dense logits on the verification sample."""
        if self.slim_sample is None or not self.records or not self.kept:
            return None
        tick = time.perf_counter()
        head = self.model.get_output_embeddings()
        if head is None:
            return None
        meta = head.weight.is_meta  # an untied head (a tied one came with the embeddings)
        if meta:
            name = next(n for n, m in self.model.named_modules() if m is head)
            materialise_own(head, name, self.ckpt, self.device, self.dtype)
            if head.weight.is_meta:
                raise InputError(f"{self.ckpt.folder} has no {name}.weight and the head is not tied to the embeddings")
        try:
            dense = self._logits(self.dense_sample).double()
            final = self._logits(self.slim_sample).double()
        finally:
            if meta:
                head.weight = nn.Parameter(torch.empty(head.weight.shape, dtype=head.weight.dtype, device="meta"), requires_grad=False)
        finite = bool(torch.isfinite(final).all())
        if not finite:
            raise VerificationError("the pruned model produces NaN/Inf outputs: the weights or calibration activations overflow; "
                                    "check the checkpoint, or use compensation 'none'")
        relative = float((final - dense).norm() / dense.norm().clamp_min(1e-30))
        self.sample_logits = final.to(self.dtype).cpu()
        self.timings["check_outputs"] = time.perf_counter() - tick
        return OutputCheck(True, relative, None, int(self.token_batches[self.sample].numel()))


def check_block_weights(block: nn.Module, prefix: str) -> None:
    """NaN/Inf weights are named as the in-memory route names them (``pipeline.check_weights``)."""
    bad = [prefix + name for name, p in block.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise InputError(f"the model has NaN/Inf weights in {bad[:3]}{' ...' if len(bad) > 3 else ''}; fix or reload the "
                         "checkpoint before pruning")


def check_finite_activations(y: torch.Tensor, block: int, batch: int, dtype: torch.dtype) -> None:
    """A block whose output overflows would poison every statistic after it: stop there, and say why."""
    if torch.isfinite(y).all():
        return
    hint = (f" {str(dtype).replace('torch.', '')} overflows on this model's activations: compute in float32 or bfloat16 "
            "(prune_layerwise(..., dtype=torch.float32))" if dtype == torch.float16 else
            " check the checkpoint's weights and the calibration text")
    raise InputError(f"block {block} produces NaN/Inf hidden states on calibration batch {batch}:{hint}")


def _checkpoint_metadata(ckpt: Checkpoint, config: PruneConfig, widths: dict[str, tuple[int, int]],
                         metadata: dict[str, Any]) -> dict[str, Any]:
    """What the slim checkpoint's config records about the prune (the in-memory route's keys)."""
    return {"source_model": str(ckpt.folder), "scorer": config.scorer, "representation": config.representation,
            "sparsity": config.sparsity, "pruner": config.pruner, "compensation": config.compensation,
            "layer_widths": {k: a for k, (_, a) in widths.items()}, "layerwise": True, **metadata}


def _hook(acc: Accumulator, name: str):
    def record(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        acc.observe(name, args[0], output)
    return record
