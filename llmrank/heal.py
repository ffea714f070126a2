"""Heal: a short distillation of the pruned model from the dense one it was cut from.

The student learns the teacher's next-token distribution: the loss is KL(teacher || student)
on the logits (temperature 1), per token, on calibration text. What trains is either LoRA
adapters (peft; merged into the weights at the end) or the chosen Linears' own weights. The
budget is a number of tokens or of minutes, whichever ends first; the run is deterministic
for a seed (batch order and LoRA initialisation). ``heal`` never changes its inputs: it trains
a copy of the student and only reads the teacher, and hands back a plain model of the
student's shapes, so it saves, exports and reloads like any pruned model.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from llmrank.ir.errors import ConfigError, InputError

TRAIN_MODES = ("lora", "weights")
SCHEDULES = ("constant", "cosine")
PEFT_HINT = "pip install 'llmrank[heal]'"
#: Default rates, chosen on held-out calibration text (benchmarks/README.md, "Heal"): with a cosine schedule
#: and 48 steps of 4 x 512 tokens on SmolLM2-135M, LoRA at 3e-3 beat its usual 1e-3, and the
#: weights at 3e-4 beat 1e-4 and 1e-3. Without an explicit lr each trained weight steps by
#: RELATIVE_LR times its own RMS (LAMB's trust-ratio idea), which is that 3e-4 on SmolLM2:
#: Adam's step is absolute, and Gemma-3's FFN weights are 5-10x smaller than SmolLM2's, so one
#: absolute rate cannot fit both (3e-4 made Gemma worse).
LORA_LR = 3e-3
RELATIVE_LR = 1.6e-3


@dataclass(frozen=True)
class CurvePoint:
    """The evaluation (perplexity on held-out text) after ``tokens`` training tokens."""

    tokens: int
    seconds: float
    ppl: float


@dataclass
class HealResult:
    """The healed model (plain: LoRA merged) and how the run went."""

    model: nn.Module
    tokens: int
    steps: int
    train_seconds: float
    curve: list[CurvePoint]
    kl: list[tuple[int, float]]  # (tokens after the step, mean KL of the step's tokens)
    config: dict[str, Any] = field(default_factory=dict)
    stopped_by: str = "tokens"

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "steps": self.steps, "train_seconds": self.train_seconds,
                "tokens_per_second": self.tokens_per_second, "stopped_by": self.stopped_by,
                "curve": [asdict(p) for p in self.curve], "kl": [list(k) for k in self.kl], "config": self.config}


def require_peft() -> None:
    """LoRA heals need peft, an optional extra."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError(f"healing with LoRA needs the peft package: {PEFT_HINT} (or heal the weights themselves: "
                          "train='weights')") from None


def trainable_linears(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """``names`` checked against the model, or every nn.Linear but the output layer and any Linear
    whose weight is shared (a tied LM head would change the embeddings too)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if names is not None:
        missing = [n for n in names if n not in linears]
        if missing:
            raise InputError(f"heal targets {missing[:3]} are not nn.Linear modules of the model")
        return list(names)
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in linears.items() if m is not head and counts.get(id(m.weight), 0) == 1]


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions (fp32)."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v), dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def logits_and_hidden(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The logits and every block's output (the residual stream after each block)."""
    out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    hidden = getattr(out, "hidden_states", None)
    if hidden is None:
        raise InputError(f"{type(model).__name__} does not return hidden states (output_hidden_states=True): "
                         "heal it with hidden_weight=0")
    return out.logits, tuple(hidden[1:])


def hidden_mismatch(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of ||h_s - h_t||² / ||h_t||²: each block's residual stream matched to the
    teacher's, relative to its size, so blocks with a large stream do not dominate."""
    if len(student) != len(teacher):
        raise InputError(f"the student has {len(student)} blocks and the teacher {len(teacher)}: hidden-state "
                         "matching needs the same depth")
    terms = [((s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12)) for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


def lr_factor(schedule: str, done: float) -> float:
    """The learning rate's multiplier when a fraction ``done`` of the budget is spent: constant,
    or a cosine from 1 down to 0.1 (a short heal cannot afford a warm-up)."""
    if schedule == "constant":
        return 1.0
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(max(done, 0.0), 1.0)))


def _check(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, tokens: int | None, minutes: float | None,
           train: str, lora_rank: int, batch_size: int, lr: float, schedule: str, hidden_weight: float) -> None:
    if train not in TRAIN_MODES:
        raise ConfigError(f"unknown heal training {train!r}; choose one of {', '.join(TRAIN_MODES)}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown heal schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not (isinstance(hidden_weight, (int, float)) and hidden_weight >= 0 and math.isfinite(hidden_weight)):
        raise ConfigError(f"heal hidden_weight must be a finite number >= 0, got {hidden_weight!r}")
    if tokens is None and minutes is None:
        raise ConfigError("a heal needs a budget: tokens=N and/or minutes=M")
    if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < ids.shape[1]):
        raise ConfigError(f"heal tokens must be an integer >= one sequence ({ids.shape[1]} tokens), got {tokens!r}")
    if minutes is not None and not (isinstance(minutes, (int, float)) and minutes > 0):
        raise ConfigError(f"heal minutes must be > 0, got {minutes!r}")
    for name, value in (("lora_rank", lora_rank), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"heal {name} must be an integer >= 1, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"heal learning rate must be > 0, got {lr!r}")
    if ids.dim() != 2 or ids.dtype != torch.long or ids.numel() == 0:
        raise InputError(f"heal data must be token ids LongTensor[N, L], got {ids.dtype} {tuple(ids.shape)}")
    vs, vt = (m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None for m in (student, teacher))
    if vs is not None and vt is not None and vs.weight.shape[0] != vt.weight.shape[0]:
        raise InputError(f"the teacher's vocabulary ({vt.weight.shape[0]}) is not the student's ({vs.weight.shape[0]}): "
                         "heal a pruned model with the dense model it was pruned from")


def _prepare(student: nn.Module, targets: list[str], train: str, lora_rank: int, seed: int) -> tuple[nn.Module, list[nn.Parameter]]:
    """(model to train, its trainable parameters): a LoRA wrapper or the copy with the targets' weights free."""
    for p in student.parameters():
        p.requires_grad_(False)
    if train == "weights":
        params = []
        for name in targets:
            for p in student.get_submodule(name).parameters():
                p.requires_grad_(True)
                params.append(p)
        return student, params
    require_peft()
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA's A matrices are random; B starts at zero (the student unchanged)
    config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.0, bias="none", target_modules=list(targets))
    wrapped = get_peft_model(student, config)
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad]


def _merge(model: nn.Module, train: str) -> nn.Module:
    if train == "weights":
        return model
    merged = model.merge_and_unload()
    left = [n for n, m in merged.named_modules() if "lora" in type(m).__module__.lower() or "lora_" in n]
    if left:
        raise RuntimeError(f"LoRA modules left after merging: {left[:3]}; please report this")
    return merged


def _param_groups(params: Sequence[nn.Parameter], lr: float, relative: bool) -> list[dict[str, Any]]:
    """One AdamW group per parameter: base rate ``lr`` or (``relative``) ``lr`` x the parameter's RMS."""
    groups = []
    for p in params:
        rate = lr * float(p.detach().float().pow(2).mean().sqrt().clamp_min(1e-8)) if relative else lr
        groups.append({"params": [p], "lr": rate, "base_lr": rate})
    return groups


def _distillation_loss(model: nn.Module, teacher: nn.Module, row: torch.Tensor, hidden_weight: float) -> torch.Tensor:
    """KL on the logits, plus the weighted hidden-state mismatch when asked (the step's loss; also what is logged)."""
    if not hidden_weight:
        with torch.no_grad():
            target = logits_of(teacher, row)
        return kl_divergence(logits_of(model, row), target)
    with torch.no_grad():
        target, target_hidden = logits_and_hidden(teacher, row)
    logits, hidden = logits_and_hidden(model, row)
    return kl_divergence(logits, target) + hidden_weight * hidden_mismatch(hidden, target_hidden)


def heal(
    student: nn.Module,
    teacher: nn.Module,
    token_batches: torch.Tensor,
    *,
    tokens: int | None = None,
    minutes: float | None = None,
    lr: float | None = None,
    lora_rank: int = 8,
    train: str = "weights",
    targets: Sequence[str] | None = None,
    batch_size: int = 4,
    schedule: str = "cosine",
    hidden_weight: float = 0.0,
    autocast_bf16: bool = False,
    seed: int = 0,
    evaluate: Callable[[nn.Module], float] | None = None,
    eval_points: int = 4,
    progress: bool = True,
) -> HealResult:
    """Distil ``student`` from ``teacher`` on ``token_batches`` (LongTensor[N, L], cycled in a
    seeded order) and return a healed copy.

    Budget: ``tokens`` (whole sequences only, never more than asked) and/or ``minutes`` of
    training (evaluations not counted); both: whichever ends first. ``batch_size`` sequences
    make one optimizer step (AdamW, gradient norm clipped at 1), one sequence per backward.
    ``targets``: the Linears to adapt (default: every Linear but the output layer and tied
    ones). ``lr``: one rate for every trained tensor; None: :data:`LORA_LR` for LoRA, and for
    the weights :data:`RELATIVE_LR` times each weight's RMS. ``schedule``: the learning rate
    over the budget (:func:`lr_factor`). ``hidden_weight``: adds that many times
    :func:`hidden_mismatch` to the KL (Minitron-style intermediate matching). ``autocast_bf16``: forward and backward in bfloat16 autocast (the weights and
    the optimizer stay fp32): faster where the CPU or GPU has bf16 matmuls, slightly noisier.
    ``evaluate(model) -> perplexity`` is called before training, at ``eval_points``
    evenly spaced points of the budget and on the merged result: the curve of the report.
    """
    ids = token_batches
    relative = lr is None and train == "weights"
    lr = (RELATIVE_LR if relative else LORA_LR) if lr is None else lr
    _check(student, teacher, ids, tokens, minutes, train, lora_rank, batch_size, lr, schedule, hidden_weight)
    names = trainable_linears(student, targets)
    if not names:
        raise InputError("the student has no Linear to heal")
    model, params = _prepare(copy.deepcopy(student), names, train, lora_rank, seed)
    optimizer = torch.optim.AdamW(_param_groups(params, lr, relative), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    seq_len = ids.shape[1]
    budget_seqs = tokens // seq_len if tokens is not None else math.inf
    budget_s = minutes * 60 if minutes is not None else math.inf
    teacher_mode = teacher.training
    teacher.eval()
    model.eval()  # no dropout: the student must match the teacher's deterministic outputs

    curve: list[CurvePoint] = []
    kls: list[tuple[int, float]] = []

    def point(seen: int, seconds: float) -> None:
        if evaluate is not None:
            curve.append(CurvePoint(seen, seconds, float(evaluate(model))))

    point(0, 0.0)
    marks = [(k / eval_points) for k in range(1, eval_points)] if eval_points > 1 else []
    order: list[int] = []
    seen_seqs, steps, train_s, stopped = 0, 0, 0.0, "tokens"
    bar = tqdm(total=int(budget_seqs * seq_len) if tokens is not None else None, desc="heal", unit="tok",
               unit_scale=True, disable=not progress)
    try:
        while seen_seqs < budget_seqs:
            step_seqs = int(min(batch_size, budget_seqs - seen_seqs))
            if train_s > 0 and train_s + train_s / steps > budget_s:  # the next step would overrun the minutes
                stopped = "minutes"
                break
            clock = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(schedule, max(seen_seqs / budget_seqs, train_s / budget_s))
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(step_seqs):
                if not order:
                    order = torch.randperm(ids.shape[0], generator=gen).tolist()
                row = ids[order.pop(0)].unsqueeze(0)
                with torch.autocast(row.device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                    loss = _distillation_loss(model, teacher, row, hidden_weight)
                (loss / step_seqs).backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            train_s += time.perf_counter() - clock
            seen_seqs += step_seqs
            steps += 1
            kls.append((seen_seqs * seq_len, total / step_seqs))
            bar.update(step_seqs * seq_len)
            bar.set_postfix(kl=f"{total / step_seqs:.3f}")
            done = max(seen_seqs / budget_seqs, train_s / budget_s)
            while marks and done >= marks[0] and done < 1:
                marks.pop(0)
                point(seen_seqs * seq_len, train_s)
        else:
            stopped = "tokens"
    finally:
        bar.close()
        teacher.train(teacher_mode)
    healed = _merge(model, train)
    for p in healed.parameters():
        p.requires_grad_(False)
    healed.eval()
    point(seen_seqs * seq_len, train_s)
    config = {"train": train, "lr": lr, "lr_rule": "relative to each weight's RMS" if relative else "absolute", "lora_rank": lora_rank if train == "lora" else None, "batch_size": batch_size,
              "seq_len": seq_len, "seed": seed, "token_budget": tokens, "minute_budget": minutes, "targets": len(names),
              "schedule": schedule, "hidden_weight": hidden_weight, "autocast_bf16": autocast_bf16,
              "loss": "KL(teacher || student), temperature 1" + (f" + {hidden_weight} x hidden-state mismatch" if hidden_weight else "")}
    return HealResult(healed, seen_seqs * seq_len, steps, train_s, curve, kls, config, stopped)
