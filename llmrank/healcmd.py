"""``llmrank heal`` and ``prune --heal-tokens``: data, targets and outputs around ``llmrank.heal``.

Both routes heal the same way (:func:`heal_slim`): training windows from the calibration half
of the corpus, a held-out piece of it for the perplexity curve (never the evaluation
articles), the FFN Linears the pruning cut (or every Linear) trained directly or through LoRA, then a plain slim
model. ``llmrank heal`` writes hf/ (+ onnx/, gguf/), report.json and heal.png into one folder built
under a temporary name, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from llmrank.heal import SCHEDULES, TRAIN_MODES, HealResult, heal, require_peft
from llmrank.ir.errors import ConfigError, InputError

TARGETS = ("pruned", "all")


@dataclass(frozen=True)
class HealOptions:
    """What a heal trains, on what, for how long."""

    tokens: int | None = None
    minutes: float | None = None
    lr: float | None = None
    lora_rank: int = 8
    train: str = "weights"
    targets: str = "pruned"
    batch_size: int = 4
    schedule: str = "cosine"
    hidden_weight: float = 0.0
    bf16: bool = False
    seq_len: int = 512
    calib: str = "wiki"
    seed: int = 0
    held_out: int = 4096
    eval_points: int = 4

    def check(self) -> None:
        """Values first, then whether peft is there for LoRA: before any model is loaded."""
        if self.tokens is None and self.minutes is None:
            raise ConfigError("a heal needs a budget: --tokens N and/or --minutes M")
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < self.seq_len):
            raise ConfigError(f"heal tokens must be at least one sequence ({self.seq_len} tokens, --seq-len), got {self.tokens!r}")
        if self.minutes is not None and not self.minutes > 0:
            raise ConfigError(f"heal minutes must be > 0, got {self.minutes!r}")
        if self.train not in TRAIN_MODES:
            raise ConfigError(f"unknown heal training {self.train!r}; choose one of {', '.join(TRAIN_MODES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown heal schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not self.hidden_weight >= 0:
            raise ConfigError(f"heal --hidden-weight must be >= 0, got {self.hidden_weight!r}")
        if self.targets not in TARGETS:
            raise ConfigError(f"unknown heal targets {self.targets!r}; choose one of {', '.join(TARGETS)}")
        for name in ("lora_rank", "batch_size", "seq_len", "held_out", "eval_points"):
            if getattr(self, name) < 1:
                raise ConfigError(f"heal {name} must be >= 1, got {getattr(self, name)!r}")
        if self.train == "lora":
            require_peft()


def group_linears(ir: Any) -> list[str]:
    """The Linears of the IR's channel groups (FFN producers and consumers): what pruning cuts."""
    return sorted({port.linear for g in ir.groups for port in (*g.producers, *g.consumers)})


def pruned_linears(model: nn.Module) -> list[str]:
    """:func:`group_linears` of a (slim) model, read from its traced graph."""
    import llmrank

    return group_linears(llmrank.analyze(llmrank.trace(model)))


def heal_slim(slim: nn.Module, dense: nn.Module, tokenizer: Any, options: HealOptions, *, progress: bool = True,
              targets: list[str] | None = None) -> tuple[HealResult, dict[str, Any]]:
    """Heal ``slim`` from ``dense`` with ``options``; returns the result and the report's heal part
    (held-out perplexity of the dense, slim and healed models, the curve, tokens/s)."""
    from llmrank.data import bos_token_id, heal_tokens
    from llmrank.evaluate import perplexity

    o = options
    n = math.ceil(o.tokens / o.seq_len) if o.tokens is not None else 4096  # minutes only: a pool no CPU run exhausts
    train, held = heal_tokens(tokenizer, o.calib, n=n, seq_len=o.seq_len, seed=o.seed, held_out=o.held_out)
    bos = bos_token_id(tokenizer)

    def held_ppl(model: nn.Module) -> float:
        return perplexity(model, held, seq_len=o.seq_len, progress=False, bos_token_id=bos).ppl

    if o.targets == "pruned" and targets is None:
        targets = pruned_linears(slim)
    clock = time.perf_counter()
    result = heal(slim, dense, train, tokens=o.tokens, minutes=o.minutes, lr=o.lr, lora_rank=o.lora_rank, train=o.train,
                  targets=targets if o.targets == "pruned" else None, batch_size=o.batch_size, schedule=o.schedule,
                  hidden_weight=o.hidden_weight, autocast_bf16=o.bf16, seed=o.seed,
                  evaluate=held_ppl, eval_points=o.eval_points, progress=progress)
    wall = time.perf_counter() - clock
    dense_ppl = held_ppl(dense)
    before, after = result.curve[0].ppl, result.curve[-1].ppl
    part = {
        "options": asdict(o), **result.to_dict(), "wall_seconds": wall,
        "held_out": f"{held.shape[1]} tokens of the {o.calib} calibration half outside the pruning windows and the heal's",
        "held_out_ppl": {"dense": dense_ppl, "before": before, "after": after,
                         "before_ratio": before / dense_ppl, "after_ratio": after / dense_ppl},
    }
    return result, part


@dataclass
class HealJob:
    """``llmrank heal SLIM --teacher DENSE --out DIR``."""

    slim: Path
    teacher: str
    out: Path
    options: HealOptions
    onnx: bool = True
    kv_cache: bool = True
    optimize: bool = False
    gguf: str | None = None  # also gguf/model-<type>.gguf of the healed model, by llama.cpp's converter
    force: bool | int = False
    progress: bool = True

    def check(self) -> None:
        from llmrank.exporters.atomic import check_writable, refuse_input_overlap
        from llmrank.models import resolve_model_dir

        self.options.check()
        if not (Path(self.slim) / "config.json").is_file():
            raise FileNotFoundError(f"{self.slim} is not a HF checkpoint folder (no config.json): give the hf/ folder of a prune")
        if self.gguf is not None:  # the slim checkpoint's widths and family decide whether llama.cpp can take it
            from llmrank.exporters.gguf import check_outtype, gguf_layout

            check_outtype(self.gguf)
            gguf_layout(Path(self.slim))
        refuse_input_overlap(self.out, self.slim)
        try:
            refuse_input_overlap(self.out, resolve_model_dir(self.teacher))
        except (FileNotFoundError, OSError, ConfigError):
            pass  # a hub id: no local folder to protect
        check_writable(Path(self.out), self.force)


#: Text both tokenizers encode: words, digits, punctuation, case and non-ASCII, so tokenizers
#: that agree on a vocabulary's size but not its ids differ here.
TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog 1234567890, naïve café; Zürich! <b>x</b> \n\tend."


def check_same_tokenizer(student: Any, teacher: Any, slim: Path | str, teacher_name: str) -> None:
    """Distillation matches logits token id by token id: refuse a teacher whose tokenizer gives
    the ids other meanings, even when its vocabulary has the same size."""
    def vocab(tok: Any) -> dict[str, int] | None:
        try:
            return dict(tok.get_vocab())
        except (AttributeError, NotImplementedError):
            return None

    vs, vt = vocab(student), vocab(teacher)
    if vs is not None and vt is not None and vs != vt:
        differ = sorted(k for k in vs.keys() | vt.keys() if vs.get(k) != vt.get(k))
        raise InputError(f"the teacher {teacher_name}'s tokenizer is not the one of {slim}: {len(differ)} of their "
                         f"{max(len(vs), len(vt))} tokens differ (e.g. {differ[0]!r}: id {vs.get(differ[0])} vs "
                         f"{vt.get(differ[0])}); heal a pruned model with the dense model it was pruned from")
    ids_s, ids_t = student(TOKENIZER_PROBE)["input_ids"], teacher(TOKENIZER_PROBE)["input_ids"]
    if list(ids_s) != list(ids_t):
        raise InputError(f"the teacher {teacher_name}'s tokenizer encodes text differently from the one of {slim} "
                         f"({list(ids_t)[:8]} vs {list(ids_s)[:8]} on the same words); heal a pruned model with the "
                         "dense model it was pruned from")


def run_heal(job: HealJob) -> dict[str, Any]:
    """Load, heal, write hf/ (+ onnx/), heal.png and report.json atomically; returns the report."""
    from llmrank import __version__
    from llmrank.exporters.atomic import atomic_path
    from llmrank.exporters.hf import check_reload, load_hf, save_hf
    from llmrank.models import load_tokenizer
    from llmrank.jobparts import export_onnx_artifact, load

    job.check()
    clock = time.perf_counter()
    tokenizer = load_tokenizer(str(job.slim))
    check_same_tokenizer(tokenizer, load_tokenizer(job.teacher), job.slim, job.teacher)  # before any weights are read
    slim = load_hf(job.slim)
    dense, _, _ = load(job.teacher, progress=job.progress)
    load_s = time.perf_counter() - clock
    result, part = heal_slim(slim, dense, tokenizer, job.options, progress=job.progress)
    source = json.loads((Path(job.slim) / "config.json").read_text()).get("llmrank") or {}
    metadata = {**(source.get("metadata") or {}), "healed_from": str(job.slim), "teacher": job.teacher,
                "heal": json.dumps({k: part[k] for k in ("tokens", "stopped_by")} | {"train": job.options.train})}
    report: dict[str, Any] = {"llmrank_version": __version__, "command": "heal", "slim": str(job.slim), "teacher": job.teacher,
                              "heal": part, "timings_s": {"load": load_s, "heal": part["wall_seconds"]}, "artifacts": {}}
    with atomic_path(job.out, force=job.force) as tmp:
        tmp.mkdir(parents=True)
        saved = save_hf(result.model, tokenizer, tmp / "hf", metadata=metadata)
        diff = check_reload(tmp / "hf", result.model, stock=saved.stock_loadable)
        report["artifacts"]["hf"] = {"path": "hf", "stock_loadable": saved.stock_loadable, "reload_max_abs_diff": diff,
                                     "loader": "transformers" if saved.stock_loadable else "llmrank.load"}
        if job.onnx:
            report["artifacts"]["onnx"] = export_onnx_artifact(result.model, tmp / "onnx" / "model.onnx", job, metadata)
        if job.gguf:
            from llmrank.exporters.gguf import export_gguf

            path = Path("gguf") / f"model-{job.gguf}.gguf"
            built = export_gguf(tmp / "hf", tmp / path, outtype=job.gguf)
            report["artifacts"]["gguf"] = {**built.to_dict(), "path": str(path)}
        write_heal_plot(tmp, part, f"heal of {job.slim} from {job.teacher}", report)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    return json.loads((Path(job.out) / "report.json").read_text())


def write_heal_plot(folder: Path, part: dict[str, Any], title: str, report: dict[str, Any]) -> None:
    from llmrank.report import plot_heal

    if plot_heal(part["curve"], part["held_out_ppl"]["dense"], folder / "heal.png", title) is not None:
        report["artifacts"]["heal_plot"] = "heal.png"
