#!/usr/bin/env python
"""The presets (fast, balanced, best) on real models: quality on two texts, prune time, peak memory.

For each model, the presets that share a number of refit sequences run as one ``llmrank sweep``
(the data passes once, then each preset x sparsity), in a child process whose peak resident set
is read from ``os.wait4``. Every pruned model is scored on the wiki eval articles and on the eval
half of a second text the calibration never saw (``botchan``, a novel). Prune time of a cell =
the data passes it needs (trace, analyze, calibrate, and gradients for fisher) + its own passes.

    python benchmarks/bench_presets.py                                    # the README table (hours on 2 cores)
    python benchmarks/bench_presets.py --models smollm2-135m --sparsities 0.3 --presets balanced,best

Writes benchmarks/results/presets/<model>/cs<N>/ (the sweeps, resumable) and
benchmarks/results/presets.json + presets.md (one row per model x preset x sparsity).
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
ROOT = HERE.parent
OUT = HERE / "results" / "presets"


def _label(model: str) -> str:
    return Path(model).name if os.sep in model else model


def run_group(model: str, presets: list[str], sparsities: list[float], out: Path, args: argparse.Namespace) -> None:
    """One sweep over the presets that share their refit sequences (runs in the child process)."""
    import torch

    from llmrank.data import bos_token_id, calibration_tokens
    from llmrank.evalcmd import ppl_stream
    from llmrank.presets import preset
    from llmrank.sweep import Cell, EvalSpec, run_sweep
    from llmrank.targets import load_torch_model

    torch.set_num_threads(args.threads)
    chosen = [preset(p) for p in presets]
    samples = {p.compensation_samples for p in chosen}
    assert len(samples) == 1, "one sweep per number of refit sequences"
    comp_samples = samples.pop()
    cells = [Cell(sparsity=sp, **{**p.cell_fields(), "compensation_samples": comp_samples if comp_samples != 16 else 0})
             for p in chosen for sp in sparsities]
    model_obj, tokenizer, _ = load_torch_model(model)
    calib = calibration_tokens(tokenizer, "wiki", n=16, seq_len=512, seed=0)
    refit = calibration_tokens(tokenizer, "wiki", n=comp_samples, seq_len=512, seed=0) if comp_samples != 16 else None
    ids, protocol = ppl_stream(tokenizer, "wiki", args.ppl_tokens)
    more, _ = ppl_stream(tokenizer, "botchan", args.ppl_tokens)
    spec = EvalSpec(bos_token_id=bos_token_id(tokenizer), ppl_tokens=ids, more_ppl={"botchan": more}, seq_len=512,
                    protocol={"model": model, "ppl": f"{args.ppl_tokens} tokens of wiki eval and of botchan eval, windows of 512",
                              "calibration": "16x512 wiki calib tokens", "refit_sequences": comp_samples})
    run_sweep(model_obj, cells, out, calibration=calib, spec=spec, compensation_calibration=refit,
              settings={"model": model, "calib": "wiki", "samples": 16, "calib_seq_len": 512}, progress=not args.quiet)


def cell_time(cell: dict) -> float:
    """Seconds the cell's prune took: the data passes it needs, then its own."""
    shared = cell.get("shared_timings", {})
    data = sum(shared.get(k, 0.0) for k in ("trace_s", "analyze_s", "calibrate_s"))
    if cell["config"]["allocation"] == "fisher":
        data += shared.get("gradients_s", 0.0)
    return data + cell["prune_s"]


def collect(models: list[str], presets: list[str], sparsities: list[float], peaks: dict) -> list[dict]:
    from llmrank.presets import preset

    rows = []
    for model in models:
        for name in presets:
            p = preset(name)
            folder = OUT / _label(model) / f"cs{p.compensation_samples}"
            dense = json.loads((folder / "cells" / "dense.json").read_text()) if (folder / "cells" / "dense.json").is_file() else None
            for sp in sorted(sparsities):
                hits = [json.loads(f.read_text()) for f in sorted((folder / "cells").glob("*.json")) if f.name != "dense.json"]
                hits = [c for c in hits if abs(c["sparsity"] - sp) < 1e-9
                        and all(c["config"][k] == v for k, v in p.options.items())]
                if not hits or dense is None:
                    continue
                cell = hits[0]
                m, d = cell["metrics"], dense["metrics"]
                rows.append({
                    "model": _label(model), "preset": name, "sparsity": sp, "params": cell["params"],
                    "param_reduction": cell["param_reduction"],
                    "ppl_wiki": m["perplexity"]["ppl"], "ppl_wiki_dense": d["perplexity"]["ppl"],
                    "ppl_wiki_ratio": m["perplexity"]["ppl"] / d["perplexity"]["ppl"],
                    "ppl_botchan": m["perplexity_on"]["botchan"]["ppl"], "ppl_botchan_dense": d["perplexity_on"]["botchan"]["ppl"],
                    "ppl_botchan_ratio": m["perplexity_on"]["botchan"]["ppl"] / d["perplexity_on"]["botchan"]["ppl"],
                    "prune_s": cell_time(cell), "sweep_peak_rss_bytes": peaks.get(f"{_label(model)}/cs{p.compensation_samples}"),
                })
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | preset | FFN sparsity | params removed | ppl wiki (x dense) | ppl botchan (x dense) | prune time | sweep peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['sweep_peak_rss_bytes'] / 1e9:.1f} GB" if r.get("sweep_peak_rss_bytes") else ""
        lines.append(f"| {r['model']} | {r['preset']} | {r['sparsity']:.0%} | {r['param_reduction']:.1%} | "
                     f"{r['ppl_wiki']:.2f} ({r['ppl_wiki_ratio']:.2f}x) | {r['ppl_botchan']:.2f} ({r['ppl_botchan_ratio']:.2f}x) | "
                     f"{r['prune_s'] / 60:.1f} min | {peak} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b")
    ap.add_argument("--presets", default="fast,balanced,best")
    ap.add_argument("--sparsities", default="0.3,0.2,0.5")
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--collect", action="store_true", help="only gather the stored cells into presets.json / presets.md")
    ap.add_argument("--group", default=None, help=argparse.SUPPRESS)  # child: model|presets|out
    args = ap.parse_args()
    sparsities = [float(s) for s in args.sparsities.split(",")]
    if args.group:
        model, presets, out = args.group.split("|")
        run_group(model, presets.split(","), sparsities, Path(out), args)
        return

    from llmrank.presets import preset

    models, presets = args.models.split(","), args.presets.split(",")
    peaks_path = HERE / "results" / "presets-peaks.json"
    read_peaks = lambda: json.loads(peaks_path.read_text()) if peaks_path.is_file() else {}  # noqa: E731
    for model in models if not args.collect else []:
        groups: dict[int, list[str]] = {}
        for name in presets:
            groups.setdefault(preset(name).compensation_samples, []).append(name)
        for samples, names in sorted(groups.items(), key=lambda kv: -kv[0]):
            out = OUT / _label(model) / f"cs{samples}"
            cmd = [sys.executable, __file__, "--group", f"{model}|{','.join(names)}|{out}", "--sparsities", args.sparsities,
                   "--ppl-tokens", str(args.ppl_tokens), "--threads", str(args.threads)] + (["--quiet"] if args.quiet else [])
            print(f"[bench_presets] {_label(model)}: {','.join(names)} on {samples} refit sequences", flush=True)
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT)
            _, status, usage = os.wait4(proc.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                sys.exit(f"sweep failed for {model} ({names})")
            key, peaks = f"{_label(model)}/cs{samples}", read_peaks()  # another bench may have written meanwhile
            peaks[key] = max(peaks.get(key, 0), usage.ru_maxrss * 1024)
            peaks_path.write_text(json.dumps(peaks, indent=2))
            print(f"[bench_presets] done in {time.perf_counter() - start:.0f} s, peak {usage.ru_maxrss / 1e6:.2f} GB", flush=True)
    rows = collect(models, presets, sparsities, read_peaks())
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": args.threads},
              "ppl_tokens": args.ppl_tokens, "rows": rows}
    (HERE / "results" / "presets.json").write_text(json.dumps(report, indent=2))
    (HERE / "results" / "presets.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
