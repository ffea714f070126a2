"""What cutting heads buys in onnxruntime: dense vs FFN-only vs head-heavy cuts at one parameter budget.

Latency depends only on the slim shapes, not on which channels were kept, so the cuts here are
chosen by the weight-only scorers (l1 neurons, l2 heads, no refit, no calibration): the shapes
equal those of the calibrated cuts in the heads table of benchmarks/README.md at the same ``target_params`` and
``head_share``. Each model is exported with its KV cache (validated against PyTorch), then
prefill at --prefill lengths and KV-cache decode are timed interleaved across the models
(``llmrank.speed.compare``, medians), at --threads intra-op threads.

    .venv/bin/python benchmarks/bench_heads_speed.py --target 0.85 --head-shares 0,0.6,1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target", type=float, default=0.85, help="fraction of all parameters to keep")
    ap.add_argument("--head-shares", default="0,0.6,1", help="shares of the cut taken from heads, comma-separated")
    ap.add_argument("--prefill", default="128,2048", help="prefill lengths (batch 1), comma-separated")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/heads-speed-<model>.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import llmrank
    from llmrank.demo import dense_onnx
    from llmrank.exporters.onnx import export_onnx
    from llmrank.models import load_model
    from llmrank.speed import compare
    from llmrank.workflow import ONNX_ATOL, ONNX_RTOL

    model, _ = load_model(args.model)
    models: dict[str, Path] = {"dense": dense_onnx(model, args.model)}
    cells: dict[str, dict] = {"dense": {"params": llmrank.count_parameters(model)}}
    work = Path(tempfile.mkdtemp(prefix="heads-speed-"))
    for share in (float(s) for s in args.head_shares.split(",")):
        config = llmrank.PruneConfig(scorer="l1", head_scorer="l2", target_params=args.target, head_share=share)
        result = llmrank.prune(model, None, config=config)
        name = f"share {share:g}"
        heads = {layer: h["heads"][1] for layer, h in result.heads.items()}
        cells[name] = {"params": result.params_after, "query_heads_kept": sorted(set(heads.values())),
                       "ffn_widths": sorted({after for _, after in result.widths.values()}), "notes": list(result.notes)}
        path = work / name.replace(" ", "-") / "model.onnx"
        export_onnx(result.model, path, with_past=True, atol=ONNX_ATOL, rtol=ONNX_RTOL)
        models[name] = path
    shapes = [(1, int(n)) for n in args.prefill.split(",")]
    speed = compare(models, prefill_shapes=shapes, decode_steps=args.decode_steps, repeats=args.repeats, threads=args.threads)
    for name, res in speed.items():
        cells[name]["speed"] = res.to_dict()
    out = Path(args.out or f"benchmarks/results/heads-speed-{args.model}.json")
    out.write_text(json.dumps({"model": args.model, "target_params": args.target, "threads": args.threads,
                               "repeats": args.repeats, "date": time.strftime("%Y-%m-%d"), "cells": cells}, indent=2, default=str))
    print(json.dumps(cells, indent=2, default=str))


if __name__ == "__main__":
    main()
