"""llmrank before ``torch.compile``: prune first, then compile the slim model.

The recipe this benchmark documents::

    import llmrank, torch
    result = llmrank.prune(model, calibration_tokens, sparsity=0.3, representation="dataflow", gamma=0.5)
    assert result.verification.ok            # slim == dense with the dropped neurons zeroed
    fast = torch.compile(result.model)       # an ordinary nn.Module with smaller FFN weights
    logits = fast(input_ids=ids, use_cache=False).logits

(From an ExportedProgram instead: ``llmrank.passes.program.prune_program(ep, inputs,
sparsity=0.3).program.module()`` is a GraphModule that torch.compile accepts too.)

What it measures, on CPU: a random Llama-shaped model (hidden 512, FFN 1408, 4 layers,
vocab 4096 by default), pruned at 30 %, then ``torch.compile`` (inductor) of the dense and of
the slim model; the first call's time (compile) and, after warm-up, interleaved
dense/slim forward times at batch 1 x 128 tokens, reported as medians and ratios. Eager
times are measured the same way for reference. Results go to
``benchmarks/results/compile.json``.

    .venv/bin/python benchmarks/bench_compile.py [--rounds 30] [--multiple 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "compile.json"


def make_model(hidden: int, ffn: int, layers: int, vocab: int, heads: int, seed: int) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def timed(fn, *args) -> float:
    clock = time.perf_counter()
    fn(*args)
    return time.perf_counter() - clock


def interleaved(runners: dict[str, callable], ids: torch.Tensor, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Alternate the runners each round so that load changes hit them alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.no_grad():
        for _ in range(warmup):
            for run in runners.values():
                run(ids)
        for r in range(rounds):
            order = list(runners.items()) if r % 2 == 0 else list(reversed(runners.items()))
            for name, run in order:
                times[name].append(timed(run, ids))
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--multiple", type=int, default=1, help="round kept widths to a multiple (64 suits GEMMs)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core CPU, OpenMP spin-waits of 2 threads "
                         "made forwards ~10x slower and the timings meaningless; 0 = torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    import llmrank

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    dense = make_model(args.hidden, args.ffn, args.layers, args.vocab, args.heads, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    calib = torch.randint(0, args.vocab, (8, 128), generator=gen)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)

    clock = time.perf_counter()
    result = llmrank.prune(dense, calib, sparsity=args.sparsity, representation="dataflow", gamma=0.5,
                           multiple=args.multiple, progress=False)
    prune_s = time.perf_counter() - clock
    slim = result.model.eval()
    print(f"pruned in {prune_s:.1f}s: widths {sorted({a for _, a in result.widths.values()})} of {args.ffn}, "
          f"params {result.params_before:,} -> {result.params_after:,}, verification {result.verification}", flush=True)

    compiled = {"dense": torch.compile(dense), "slim": torch.compile(slim)}
    compile_s: dict[str, float] = {}
    error = None
    with torch.no_grad():
        for name, model in compiled.items():
            try:
                compile_s[name] = timed(forward, model, ids)
                print(f"torch.compile {name}: first call {compile_s[name]:.1f}s", flush=True)
            except Exception as exc:  # noqa: BLE001 - reported in the JSON
                error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
                print(f"torch.compile {name} failed: {error}", flush=True)
                break
        compile_diff = None
        if error is None:
            compile_diff = max(float((forward(compiled[n], ids) - forward(m, ids)).abs().max()) for n, m in (("dense", dense), ("slim", slim)))

    runners = {
        "dense_eager": lambda x: forward(dense, x),
        "slim_eager": lambda x: forward(slim, x),
    }
    if error is None:
        runners["dense_compiled"] = lambda x: forward(compiled["dense"], x)
        runners["slim_compiled"] = lambda x: forward(compiled["slim"], x)
    times = interleaved(runners, ids, args.rounds, args.warmup)
    med = {name: statistics.median(v) for name, v in times.items()}
    speedups = {"slim_vs_dense_eager": med["dense_eager"] / med["slim_eager"]}
    if error is None:
        speedups.update({
            "slim_vs_dense_compiled": med["dense_compiled"] / med["slim_compiled"],
            "compiled_vs_eager_dense": med["dense_eager"] / med["dense_compiled"],
            "compiled_vs_eager_slim": med["slim_eager"] / med["slim_compiled"],
            "slim_compiled_vs_dense_eager": med["dense_eager"] / med["slim_compiled"],
        })
    ffn_flops = lambda width: 3 * args.hidden * width  # noqa: E731 - gate, up, down per token and layer
    report = {
        "model": {"family": "llama", "hidden": args.hidden, "ffn": args.ffn, "layers": args.layers, "vocab": args.vocab, "heads": args.heads},
        "prune": {"sparsity": args.sparsity, "multiple": args.multiple, "scorer": "wpr", "representation": "dataflow", "gamma": 0.5,
                  "widths": {k: list(v) for k, v in result.widths.items()}, "params_before": result.params_before,
                  "params_after": result.params_after, "seconds": prune_s,
                  "verification": result.verification.to_dict() if result.verification else None,
                  "ffn_flop_ratio": sum(ffn_flops(a) for _, a in result.widths.values()) / sum(ffn_flops(b) for b, _ in result.widths.values())},
        "input": {"batch": args.batch, "seq": args.seq},
        "compile_first_call_s": compile_s,
        "compile_error": error,
        "compiled_vs_eager_max_abs_diff": compile_diff,
        "median_s": med,
        "min_s": {name: min(v) for name, v in times.items()},
        "speedup": speedups,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "env": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
                "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(),
                "machine": platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"median_ms": {k: round(v * 1e3, 2) for k, v in med.items()}, "speedup": {k: round(v, 3) for k, v in speedups.items()},
                      "compile_first_call_s": {k: round(v, 1) for k, v in compile_s.items()}}, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
