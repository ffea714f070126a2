#!/usr/bin/env python
"""CPU cost of ``llmrank prune``'s default on a real model: one calibration walk against two.

The CLI scores on 16 x 512 tokens and refits on 64 x 512 tokens sampled with the same seed, so
the scoring sequences are the first 16 refit sequences and one walk over the 64 gathers both
statistics. ``--walks 2`` hands the pipeline a refit sample that is not a prefix (the same
sequences in another order: the statistics are the same sums), which forces the two walks the
earlier pipeline made; the kept sets must come out identical. Process CPU time
(``time.process_time``, all threads) is what is compared: it does not depend on other jobs the
way wall time does.

    python benchmarks/bench_default_cpu.py                       # smollm2-135m, both variants
    python benchmarks/bench_default_cpu.py --model gemma3-270m --threads 2

Writes benchmarks/results/default-cpu-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def run(model, calib: torch.Tensor, refit: torch.Tensor, config) -> dict:
    import llmrank

    cpu, wall = time.process_time(), time.perf_counter()
    result = llmrank.prune(model, calib, config=config, compensation_data=refit, progress=False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_s": cpu, "wall_s": wall, "passes_s": result.timings, "kept": {k: v.tolist() for k, v in result.kept.items()},
            "params_after": result.params_after, "relative_error": result.output_check.relative_error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--compensation-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--walks", default="1,2", help="which variants to run: 1 (shared walk), 2 (separate walks)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import llmrank
    from llmrank.data import calibration_tokens
    from llmrank.models import load_model
    from llmrank.passes.config import CLI_DEFAULTS

    model, tok = load_model(args.model)
    calib = calibration_tokens(tok, "wiki", n=args.samples, seq_len=args.seq_len, seed=0)
    refit = calibration_tokens(tok, "wiki", n=args.compensation_samples, seq_len=args.seq_len, seed=0)
    assert torch.equal(refit[: args.samples], calib), "the scoring sample must prefix the refit sample"
    config = llmrank.PruneConfig(**CLI_DEFAULTS, sparsity=0.3)
    out: dict = {"model": args.model, "config": config.to_dict(), "calibration": f"{args.samples}x{args.seq_len}",
                 "refit": f"{args.compensation_samples}x{args.seq_len}", "threads": torch.get_num_threads(),
                 "machine": f"{platform.machine()}, torch {torch.__version__}", "variants": {}}
    for walks in [int(w) for w in args.walks.split(",")]:
        # two walks: the same refit sequences, the first block moved to the end (not a prefix any more)
        data = refit if walks == 1 else torch.cat([refit[args.samples:], refit[: args.samples]])
        out["variants"][f"{walks}-walk"] = run(model, calib, data, config)
        print(f"{walks} walk(s): {out['variants'][f'{walks}-walk']['cpu_s']:.0f} s CPU, "
              f"{out['variants'][f'{walks}-walk']['wall_s']:.0f} s wall", flush=True)
    variants = list(out["variants"].values())
    if len(variants) == 2:
        out["same_kept_sets"] = variants[0]["kept"] == variants[1]["kept"]
        out["cpu_ratio_two_over_one"] = variants[1]["cpu_s"] / variants[0]["cpu_s"]
    for v in variants:
        v.pop("kept")
    path = HERE / "results" / f"default-cpu-{args.model}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)
    print(json.dumps({k: v for k, v in out.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
