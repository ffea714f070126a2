#!/usr/bin/env python
"""Time each pass of the pipeline on a real model: trace, analyze, calibration, score+select, shrink.

The question it answers: is LLM-Rank's graph scoring cheap next to the forward passes that
every activation-based method needs anyway? It reports (score + select + shrink) /
calibration per scorer.

    python benchmarks/bench_pipeline.py                       # SmolLM2-135M, 16x512 calibration, wpr
    python benchmarks/bench_pipeline.py --scorers wpr,mpr,activation,l1 --threads 1

Writes benchmarks/results/pipeline-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="built-in name or HF folder")
    p.add_argument("--samples", type=int, default=16, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=512, help="calibration sequence length")
    p.add_argument("--batch-size", type=int, default=4, help="calibration batch size")
    p.add_argument("--scorers", default="wpr", help="comma list; each gets its own score/select/shrink timing")
    p.add_argument("--representation", default="chained")
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=3, help="score/select/shrink repeats (median); tracing and calibration run once")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/pipeline-<model>.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import statistics

    import torch

    import llmrank
    from llmrank.api import as_batches
    from llmrank.data import calibration_tokens
    from llmrank.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t = {}
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    t["load_s"] = time.perf_counter() - start
    calib = calibration_tokens(tokenizer, "wiki", n=args.samples, seq_len=args.seq_len, seed=0)

    start = time.perf_counter()
    traced = llmrank.trace(model)
    t["trace_s"] = time.perf_counter() - start
    start = time.perf_counter()
    ir = llmrank.analyze(traced)
    t["analyze_s"] = time.perf_counter() - start

    batches = as_batches(calib, batch_size=args.batch_size)
    start = time.perf_counter()
    norms = llmrank.calibrate(model, ir, batches, linears=ir.calibration_linears(), progress=True)
    t["calibrate_s"] = time.perf_counter() - start

    per_scorer = {}
    for scorer in [s.strip() for s in args.scorers.split(",") if s.strip()]:
        cfg = llmrank.ScoreConfig(scorer=scorer, representation=args.representation, gamma=args.gamma if scorer in ("wpr", "hits") else 0.0)
        score_s, select_s, shrink_s = [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            scores = llmrank.score(model, ir, norms, cfg)
            score_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            kept = llmrank.select(ir, scores.groups, args.sparsity)
            select_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            slim = llmrank.shrink(model, ir, kept)
            shrink_s.append(time.perf_counter() - start)
            del slim
        row = {"score_s": statistics.median(score_s), "select_s": statistics.median(select_s), "shrink_s": statistics.median(shrink_s)}
        row["score_select_shrink_s"] = row["score_s"] + row["select_s"] + row["shrink_s"]
        row["ratio_to_calibration"] = row["score_select_shrink_s"] / t["calibrate_s"]
        per_scorer[scorer] = row

    report = {
        "model": args.model,
        "parameters": llmrank.count_parameters(model),
        "groups": len(ir.groups),
        "calibration": {"samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size, "tokens": norms.tokens},
        "representation": args.representation, "sparsity": args.sparsity, "repeats": args.repeats,
        "timings": t, "scorers": per_scorer,
        "ratio_definition": "(score + select + shrink) / calibration, medians of --repeats for the numerator",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_end": os.getloadavg(), "python": sys.version.split()[0], "torch": torch.__version__},
    }
    out = args.out or HERE / "results" / f"pipeline-{Path(args.model).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{args.model}: trace {t['trace_s']:.1f}s, analyze {t['analyze_s']:.2f}s, "
          f"calibration ({args.samples}x{args.seq_len}) {t['calibrate_s']:.1f}s")
    for scorer, row in per_scorer.items():
        print(f"  {scorer:10s} score {row['score_s']:.3f}s  select {row['select_s']:.4f}s  shrink {row['shrink_s']:.3f}s  "
              f"-> (score+select+shrink)/calibration = {row['ratio_to_calibration']:.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
