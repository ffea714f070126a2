#!/usr/bin/env python
"""Cost of pruning vs model size: wall time per pass and peak memory, one subprocess per size.

Each size is a random Llama-shaped model (FFN = 2.75 x hidden rounded to 64, head_dim 64,
kv heads = heads / 2, vocab 32000) pruned by ``llmrank.prune`` with calibration on random
tokens. Every size runs in a fresh Python process so that ``ru_maxrss`` (the peak resident
set) belongs to that size alone; it is reported next to the RSS right after building the
model, whose difference is what pruning itself needed on top of holding the model
(tracemalloc cannot see torch's C++ allocations, so it is not used).

    python benchmarks/bench_cost.py                                  # 4 sizes, ~40M..200M parameters
    python benchmarks/bench_cost.py --sizes 256x4,512x8,1024x12,2048x16 --scorer wpr

Writes benchmarks/results/cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def config_for(hidden: int, layers: int) -> dict:
    heads = max(1, hidden // 64)
    return dict(hidden_size=hidden, intermediate_size=max(64, round(2.75 * hidden / 64) * 64), num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), vocab_size=32000,
                max_position_embeddings=2048, tie_word_embeddings=False)


def _rss_mb() -> float:
    """Current resident set of this process (Linux /proc), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def child(spec: dict) -> dict:
    import resource

    import torch
    import transformers

    import llmrank

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    rss_start = _rss_mb()
    cfg = transformers.LlamaConfig(**spec["config"])
    torch.manual_seed(0)
    start = time.perf_counter()
    model = transformers.LlamaForCausalLM(cfg).eval()
    build_s = time.perf_counter() - start
    rss_model = _rss_mb()
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, cfg.vocab_size, (spec["samples"], spec["seq_len"]), generator=gen)
    start = time.perf_counter()
    res = llmrank.prune(model, calib, sparsity=spec["sparsity"], scorer=spec["scorer"], representation=spec["representation"],
                        gamma=spec["gamma"], compensation=spec["compensation"], verify_outputs=spec["verify"], progress=False)
    total_s = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {
        "config": spec["config"], "params": res.params_before, "params_after": res.params_after,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "build_s": build_s, "prune_total_s": total_s, "timings_s": res.timings,
        "rss_start_mb": rss_start, "rss_after_build_mb": rss_model, "peak_rss_mb": peak_mb,
        "prune_overhead_mb": peak_mb - rss_model,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256x4,512x6,768x8,1024x12", help="comma list of HIDDENxLAYERS")
    p.add_argument("--scorer", default="wpr")
    p.add_argument("--representation", default="dataflow")
    p.add_argument("--compensation", default="lstsq", help="none, bias, lstsq, lstsq+bias (llmrank prune's default: lstsq)")
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--samples", type=int, default=8, help="calibration sequences (random tokens)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--verify", action="store_true", help="include the shrunk == masked verification in the time")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per size")
    p.add_argument("--out", type=Path, default=HERE / "results" / "cost.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    rows = []
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        hidden, _, layers = size.lower().partition("x")
        spec = {"config": config_for(int(hidden), int(layers)), "scorer": args.scorer, "representation": args.representation,
                "compensation": args.compensation, "gamma": args.gamma, "sparsity": args.sparsity, "samples": args.samples, "seq_len": args.seq_len,
                "verify": args.verify, "threads": args.threads}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                              timeout=args.timeout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{size}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            rows.append({"size": size, "error": proc.stderr[-2000:]})
            continue
        row = {"size": size, **json.loads(lines[-1][len("RESULT "):]), "process_s": time.perf_counter() - start}
        rows.append(row)
        t = row["timings_s"]
        print(f"{size:>10s}: {row['params'] / 1e6:7.1f}M params  prune {row['prune_total_s']:7.1f}s "
              f"(trace {t.get('Trace', 0):.1f}, calib {t.get('Calibrate', 0):.1f}, score {t.get('Score', 0):.2f}, "
              f"refit {t.get('Compensate', 0):.1f}, shrink {t.get('Shrink', 0):.2f}, checks {t.get('CheckOutputs', 0) + t.get('Verify', 0):.1f})  peak RSS {row['peak_rss_mb']:8.0f} MiB "
              f"(model {row['rss_after_build_mb']:.0f}, +{row['prune_overhead_mb']:.0f} for pruning)", flush=True)
    report = {"scorer": args.scorer, "representation": args.representation, "compensation": args.compensation,
              "sparsity": args.sparsity,
              "calibration": f"{args.samples}x{args.seq_len} random tokens", "rows": rows,
              "memory": "peak_rss_mb = ru_maxrss of a fresh process per size; prune_overhead_mb = peak - RSS after building the model",
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_end": os.getloadavg()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
