"""Heads, neurons or both, at one parameter budget: wiki perplexity of SmolLM2-135M.

The model is traced, analysed and calibrated once (scoring norms on --samples sequences, the
least-squares moments of down_proj and o_proj on --compensation-samples, the o_proj input
variances for the fluctuation head scorer); each cell then runs Score -> Select -> Compensate ->
Shrink -> CheckOutputs -> Verify with ``target_params`` and its ``head_share`` (0: FFN neurons
only, 1: heads first, neurons fill the rest of the budget), and is scored on the wiki eval
articles (the protocol of benchmarks/README.md: 512-token windows, no overlap).

    .venv/bin/python benchmarks/bench_heads.py --targets 0.85 --head-shares 0,0.5,1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--targets", default="0.85", help="fractions of all parameters to keep, comma-separated")
    ap.add_argument("--head-shares", default="0,0.5,1", help="shares of the cut taken from heads, comma-separated")
    ap.add_argument("--head-scorers", default="auto", help="head scorers, comma-separated (auto: wpr on the dataflow graph)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--compensation-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/heads-<model>.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llmrank.data import calibration_tokens
    from llmrank.evalcmd import ppl_stream
    from llmrank.evaluate import perplexity
    from llmrank.passes.config import PruneConfig
    from llmrank.passes.headcut import heads_kept
    from llmrank.passes.pipeline import Analyze, Calibrate, CheckOutputs, Compensate, Pipeline, Score, Select, Shrink, Trace, Verify
    from llmrank.targets import load_torch_model

    model, tokenizer, _ = load_torch_model(args.model)
    model.eval()
    calib = calibration_tokens(tokenizer, "wiki", n=args.samples, seq_len=args.seq_len, seed=0)
    refit = calibration_tokens(tokenizer, "wiki", n=args.compensation_samples, seq_len=args.seq_len, seed=0)
    ppl_ids, protocol = ppl_stream(tokenizer, "wiki", args.ppl_tokens)
    batches = tuple(calib.split(4))
    # one calibration that feeds every cell: heads on, lstsq moments, o_proj variances
    base = PruneConfig(compensation="lstsq", target_params=0.85, head_share=0.5, head_scorer="fluctuation")
    clock = time.perf_counter()
    state = Pipeline([Trace(), Analyze(), Calibrate()]).run(model, base, batches=batches, refit_batches=tuple(refit.split(4)))
    calib_s = time.perf_counter() - clock
    dense_params = sum(p.numel() for p in model.parameters())
    dense_ppl = perplexity(model, ppl_ids, seq_len=args.seq_len, progress=False).ppl
    rows: list[dict] = []
    out = Path(args.out or f"benchmarks/results/heads-{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": args.model, "dense_params": dense_params, "dense_ppl": dense_ppl, "calibration_s": calib_s,
        "protocol": {"ppl_seq_len": args.seq_len, **{f"ppl_{k}": v for k, v in protocol.items()},
                     "calibration": f"{args.samples}x{args.seq_len} wiki calib tokens (scores), {args.compensation_samples}x{args.seq_len} (lstsq refit)",
                     "scorer": "wpr/dataflow", "compensation": "lstsq (down_proj and o_proj)", "threads": args.threads,
                     "machine": "shared 2-core CPU (timings are not comparable across runs)"},
        "rows": rows,
    }
    for target in [float(t) for t in args.targets.split(",")]:
        for share in [float(s) for s in args.head_shares.split(",")]:
            for head_scorer in args.head_scorers.split(","):
                if share == 0 and head_scorer != args.head_scorers.split(",")[0]:
                    continue  # FFN only: the head scorer plays no part
                config = base.with_(target_params=target, head_share=share, head_scorer=head_scorer)
                clock = time.perf_counter()
                cell = Pipeline([Score(), Select(), Compensate(), Shrink(), CheckOutputs(), Verify()]).run(state.update(config=config))
                prune_s = time.perf_counter() - clock
                slim = cell.slim
                ppl = perplexity(slim, ppl_ids, seq_len=args.seq_len, progress=False).ppl
                heads = heads_kept(cell.ir, cell.kept)
                widths = [len(cell.kept[g.name]) for g in cell.ir.groups]
                row = {
                    "target_params": target, "head_share": share, "head_scorer": config.head_scoring if config.heads else None,
                    "params_after": sum(p.numel() for p in slim.parameters()), "notes": list(cell.notes),
                    "query_heads_kept": sorted({h["heads"][1] for h in heads.values()}) if config.heads else None,
                    "kv_heads_kept": sorted({h["kv_heads"][1] for h in heads.values()}) if config.heads else None,
                    "ffn_width": [min(widths), max(widths)], "ppl": ppl, "prune_s": prune_s,
                    "verified": cell.verification.ok if cell.verification else None,
                    "relative_error": cell.output_check.relative_error,
                }
                row["param_reduction"] = 1 - row["params_after"] / dense_params
                rows.append(row)
                print(json.dumps(row), flush=True)
                _write(out, result)  # after every cell: a stopped run keeps what it measured
    _write(out, result)
    print(f"wrote {out}")


def _write(out: Path, result: dict) -> None:
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    main()
