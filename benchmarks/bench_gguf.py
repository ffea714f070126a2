#!/usr/bin/env python
"""Dense against slim GGUF files in llama.cpp itself: file size, perplexity, prefill and decode speed.

For each model: the dense checkpoint and a slim one (``llmrank prune --sparsity S``, the default
preset, uniform widths) are converted by llama.cpp's converter to f16 and q8_0 and quantized by
llama.cpp's quantizer to q4_k_m. Each file is run by llama.cpp (llama-cpp-python):

* perplexity on the wiki evaluation articles (windows of 512, llama.cpp's logits);
* prefill: one 512-token prompt, tokens per second;
* decode: 128 greedy tokens after a 16-token prompt, tokens per second, with 1 and 2 threads.

Dense and slim runs are interleaved (dense, slim, dense, slim, ...) so drift on a shared machine
falls on both; medians over ``--repeats``. Needs ``pip install 'llmrank[gguf]'``.

    python benchmarks/bench_gguf.py                                   # SmolLM2-135M at 30 %
    python benchmarks/bench_gguf.py --multiple 256                   # widths rounded for K-quant rows

Writes benchmarks/results/gguf-<model>[-m<multiple>].json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "results" / "gguf-work"


def build(model: str, sparsity: float, multiple: int | None, types: list[str], work: Path) -> dict[str, dict[str, Path]]:
    """The dense and slim GGUF files of every type (kept in ``work``, reused on a second run)."""
    from llmrank.exporters.gguf import export_gguf
    from llmrank.models import resolve_model_dir

    slim_dir = work / "slim"
    dense_dir = WORK / model / "dense"  # one set of dense files for every --multiple
    if not (slim_dir / "hf" / "config.json").is_file():
        cmd = [sys.executable, "-m", "llmrank.cli", "prune", model, "--sparsity", str(sparsity), "--no-onnx", "--quiet",
               "--out", str(slim_dir), "--force"] + (["--multiple", str(multiple)] if multiple else [])
        subprocess.run(cmd, check=True)
    sources = {"dense": Path(resolve_model_dir(model)), "slim": slim_dir / "hf"}
    files: dict[str, dict[str, Path]] = {}
    for variant, hf_dir in sources.items():
        for outtype in types:
            path = (dense_dir if variant == "dense" else work / variant) / f"model-{outtype}.gguf"
            if not path.is_file():
                export_gguf(hf_dir, path, outtype=outtype, force=True)
            files.setdefault(variant, {})[outtype] = path
    return files


def prefill_tps(llm, ids: list[int]) -> float:
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    return len(ids) / (time.perf_counter() - start)


def decode_tps(llm, prompt: list[int], n: int) -> float:
    llm.reset()
    llm.eval(prompt)
    start = time.perf_counter()
    for _ in range(n):
        llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--multiple", type=int, default=None, help="--multiple for the prune (256: whole K-quant rows)")
    ap.add_argument("--types", default="f16,q8_0,q4_k_m")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    args = ap.parse_args()

    import torch

    from llmrank.data import bos_token_id
    from llmrank.evalcmd import ppl_stream
    from llmrank.evaluate import perplexity
    from llmrank.exporters.llamacpp import gguf_logits_fn, load_llama, llama_cpp_available
    from llmrank.models import load_tokenizer

    if not llama_cpp_available():
        sys.exit("bench_gguf runs llama.cpp: pip install 'llmrank[gguf]' (llama-cpp-python) first")
    import llama_cpp

    types, threads = args.types.split(","), [int(t) for t in args.threads.split(",")]
    label = f"{args.model}" + (f"-m{args.multiple}" if args.multiple else "")
    work = WORK / label
    files = build(args.model, args.sparsity, args.multiple, types, work)
    tokenizer = load_tokenizer(args.model)
    ids, protocol = ppl_stream(tokenizer, "wiki", args.ppl_tokens)
    prompt512 = ids[0, :512].tolist()
    prompt16 = ids[0, :16].tolist()

    rows = []
    for outtype in types:
        row: dict = {"type": outtype}
        for variant in ("dense", "slim"):
            path = files[variant][outtype]
            row[f"{variant}_bytes"] = path.stat().st_size
            result = perplexity(gguf_logits_fn(path, n_ctx=512, threads=2), ids, seq_len=512, progress=False,
                                bos_token_id=bos_token_id(tokenizer))
            row[f"{variant}_ppl"] = result.ppl
        for t in threads:
            llms = {v: load_llama(files[v][outtype], n_ctx=640, threads=t) for v in ("dense", "slim")}
            samples: dict[str, dict[str, list[float]]] = {v: {"prefill": [], "decode": []} for v in llms}
            for _ in range(args.repeats):
                for v, llm in llms.items():  # interleaved
                    samples[v]["prefill"].append(prefill_tps(llm, prompt512))
                    samples[v]["decode"].append(decode_tps(llm, prompt16, 128))
            for v in llms:
                row[f"{v}_prefill_tps_{t}t"] = statistics.median(samples[v]["prefill"])
                row[f"{v}_decode_tps_{t}t"] = statistics.median(samples[v]["decode"])
            del llms
        rows.append(row)
        print(json.dumps(row), flush=True)

    pruned = json.loads((work / "slim" / "report.json").read_text())
    params = {"dense": pruned["params_before"], "slim": pruned["params_after"]}
    # Per token, decode multiplies by every weight once (the tied embedding as the LM head too): the
    # FLOP-proportional ideal speedup is the parameter ratio (attention over a short context aside).
    ideal = params["dense"] / params["slim"]
    report = {"model": args.model, "sparsity": args.sparsity, "multiple": args.multiple, "repeats": args.repeats,
              "llama_cpp_python": llama_cpp.__version__, "ppl": protocol, "parameters": params,
              "flop_ideal_speedup": ideal, "widths": pruned.get("widths"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": rows}
    out = HERE / "results" / f"gguf-{label}.json"
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(table(report) + "\n")
    print(table(report))
    print(f"wrote {out}")


def table(report: dict) -> str:
    threads = sorted({int(k.rsplit("_", 1)[1][:-1]) for r in report["rows"] for k in r if k.startswith("dense_decode_tps_")})
    head = "| type | size dense → slim | ppl dense → slim | prefill 512 tok/s (1 thread) | " + \
        " | ".join(f"decode tok/s ({t} thr)" for t in threads) + " |"
    lines = [f"{report['model']} at {report['sparsity']:.0%} of FFN neurons"
             + (f", widths a multiple of {report['multiple']}" if report["multiple"] else "")
             + f"; FLOP-proportional ideal speedup {report['flop_ideal_speedup']:.2f}x", "",
             head, "|" + "---|" * (4 + len(threads))]
    for r in report["rows"]:
        cells = [f"{r['type']}", f"{r['dense_bytes'] / 2**20:.0f} → {r['slim_bytes'] / 2**20:.0f} MiB",
                 f"{r['dense_ppl']:.2f} → {r['slim_ppl']:.2f}",
                 f"{r['dense_prefill_tps_1t']:.0f} → {r['slim_prefill_tps_1t']:.0f} "
                 f"({r['slim_prefill_tps_1t'] / r['dense_prefill_tps_1t']:.2f}x)"]
        for t in threads:
            d, s = r[f"dense_decode_tps_{t}t"], r[f"slim_decode_tps_{t}t"]
            cells.append(f"{d:.0f} → {s:.0f} ({s / d:.2f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
