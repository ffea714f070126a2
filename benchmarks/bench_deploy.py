#!/usr/bin/env python
"""The deployed artefact: dense vs slim as onnxruntime-genai folders (int4 and fp32).

For a model (default: SmolLM2-135M) and each sparsity, the slim checkpoint is made exactly as
``llmrank prune MODEL --sparsity S --no-onnx`` does (llmrank.workflow.run_prune with the CLI's
defaults: wpr/dataflow, gamma 0.5, lstsq refit on 64 x 512 tokens). Dense and slim are then built
into onnxruntime-genai folders by its own model builder (llmrank.exporters.genai.export_genai,
which checks each build against PyTorch before writing it), and measured through
onnxruntime-genai itself:

* prefill latency for 1 x 128 and 1 x 1024 random tokens (one ``append_tokens`` on a fresh
  Generator), and decode tokens/s (``generate_next_token`` steps after a 16-token prompt);
  runs of dense and slim interleaved, medians of ``--repeats``, onnxruntime threads ``--threads``;
* file size of the folder (model.onnx + model.onnx.data + tokenizer + config);
* perplexity of the deployed folder on the wiki eval split (``--ppl-tokens`` tokens, windows of
  512; llmrank.exporters.genai.genai_logits_fn + llmrank.evaluate.perplexity), next to the
  PyTorch fp32 perplexity of the same checkpoint.

    python benchmarks/bench_deploy.py --sparsities 0.3 --threads 1 --ppl-tokens 4096
    python benchmarks/bench_deploy.py --model path/to/hf-folder --precisions int4 --repeats 3

Pruned checkpoints and builds are cached under ~/.cache/llmrank/bench/deploy/ (``--no-cache``
rebuilds). Writes benchmarks/results/deploy.json (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROMPT_LEN = 16


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def slim_checkpoint(model: str, sparsity: float, work: Path, loaded: Any, no_cache: bool) -> tuple[Path, dict]:
    """<work>/slim-s<S>/hf made by llmrank.workflow.run_prune with the CLI defaults and no ONNX."""
    from llmrank.passes.config import CLI_DEFAULTS, PruneConfig
    from llmrank.workflow import PruneJob, run_prune

    out = work / f"slim-s{sparsity:g}"
    report_path = out / "report.json"
    if report_path.is_file() and not no_cache:
        return out / "hf", json.loads(report_path.read_text())
    start = time.perf_counter()
    config = PruneConfig(**CLI_DEFAULTS, sparsity=sparsity)
    report = run_prune(PruneJob(model=model, out=out, config=config, onnx=False, force=True, progress=False), loaded=loaded)
    print(f"  pruned {model} at {sparsity:g} in {time.perf_counter() - start:.0f} s", flush=True)
    return out / "hf", report


def build(src: Path, out: Path, precision: str, no_cache: bool) -> dict:
    """An onnxruntime-genai folder (checked against PyTorch by export_genai), cached with its result."""
    from llmrank.exporters.genai import export_genai

    record = out.with_name(out.name + ".json")
    if out.is_dir() and record.is_file() and not no_cache:
        return json.loads(record.read_text())
    res = export_genai(src, out, precision=precision, force=True)
    info = res.to_dict()
    record.write_text(json.dumps(info, indent=2, default=str))
    c = res.check
    print(f"  built {out.name} in {res.build_seconds:.0f} s: top-1 agreement {c.top1_agreement:.3f}, "
          f"mean KL {c.mean_kl:.3g}, max |logit diff| {c.max_abs_diff:.3g}, greedy equal {c.greedy_equal}", flush=True)
    return info


def time_interleaved(folders: dict[str, Path], args: argparse.Namespace, vocab: int) -> dict[str, dict]:
    """Median prefill ms per shape and decode tok/s per folder, runs of all folders interleaved."""
    from llmrank.speed import compare

    shapes = [(1, int(s)) for s in args.prefill.split(",")]
    results = compare(folders, prefill_shapes=shapes, decode_steps=args.decode_steps, repeats=args.repeats, vocab=vocab,
                      threads=args.threads)
    return {name: {"prefill_ms": r.prefill_ms, "decode_tok_s": r.decode_tokens_per_s} for name, r in results.items()}


def bench(args: argparse.Namespace) -> dict:
    import torch

    from llmrank.cache import cache_dir
    from llmrank.data import bos_token_id, eval_tokens
    from llmrank.evaluate import perplexity
    from llmrank.exporters.genai import genai_logits_fn
    from llmrank.exporters.hf import load_hf
    from llmrank.models import load_tokenizer, resolve_model_dir
    from llmrank.workflow import load

    if args.threads:
        torch.set_num_threads(args.threads)
    dense_src = resolve_model_dir(args.model)
    work = args.work or cache_dir() / "bench" / "deploy" / Path(str(args.model)).name
    work.mkdir(parents=True, exist_ok=True)
    print(f"[{args.model}] work folder {work}", flush=True)
    loaded = None
    sources: dict[str, tuple[Path, float, dict | None]] = {"dense": (dense_src, 0.0, None)}
    for sp in args.sparsities:
        if loaded is None and (args.no_cache or not (work / f"slim-s{sp:g}" / "report.json").is_file()):
            loaded = load(args.model, progress=False)
        src, report = slim_checkpoint(args.model, sp, work, loaded, args.no_cache)
        sources[f"s{sp:g}"] = (src, sp, report)
    del loaded

    reports = [r for _, _, r in sources.values() if r]
    dense_params = reports[0]["params_before"] if reports else None
    tokenizer = load_tokenizer(args.model)
    stream, bos = eval_tokens(tokenizer), bos_token_id(tokenizer)
    rows: list[dict] = []
    torch_ppl: dict[str, float] = {}
    if not args.no_torch_ppl:
        for variant, (src, _, _) in sources.items():
            start = time.perf_counter()
            torch_ppl[variant] = perplexity(load_hf(src), stream, seq_len=args.seq_len, max_tokens=args.ppl_tokens,
                                            progress=False, bos_token_id=bos).ppl
            print(f"  PyTorch fp32 perplexity {variant}: {torch_ppl[variant]:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)

    for precision in args.precisions:
        folders: dict[str, Path] = {}
        builds: dict[str, dict] = {}
        for variant, (src, _, _) in sources.items():
            folders[variant] = work / f"{variant}-{precision}"
            builds[variant] = build(src, folders[variant], precision, args.no_cache)
        print(f"[{precision}] timing {', '.join(folders)} interleaved ({args.repeats} repeats, {args.threads or 'default'} threads)", flush=True)
        vocab = json.loads((folders["dense"] / "genai_config.json").read_text())["model"]["vocab_size"]
        speed = time_interleaved(folders, args, vocab)
        for variant, folder in folders.items():
            start = time.perf_counter()
            ppl = perplexity(genai_logits_fn(folder, threads=args.threads), stream, seq_len=args.seq_len,
                             max_tokens=args.ppl_tokens, progress=False, bos_token_id=bos)
            src, sp, report = sources[variant]
            rows.append({
                "variant": variant, "sparsity": sp, "precision": precision, "folder": str(folder),
                "bytes": folder_bytes(folder), "build_s": builds[variant]["build_seconds"],
                "check": builds[variant]["check"], "per_layer": builds[variant]["per_layer"],
                "ffn_widths": sorted(set(builds[variant]["layer_widths"].values())),
                "params": report["params_after"] if report else dense_params,
                "perplexity": ppl.ppl, "ppl_tokens": ppl.n_tokens, "ppl_s": time.perf_counter() - start,
                "torch_fp32_perplexity": torch_ppl.get(variant),
                **speed[variant],
            })
            print(f"  {variant}-{precision}: perplexity {ppl.ppl:.3f}", flush=True)
        dense = next(r for r in rows if r["variant"] == "dense" and r["precision"] == precision)
        for row in rows:
            if row["precision"] == precision and row["variant"] != "dense":
                row["speedup_vs_dense"] = {
                    **{k: dense["prefill_ms"][k] / v for k, v in row["prefill_ms"].items()},
                    "decode": row["decode_tok_s"] / dense["decode_tok_s"],
                }
                row["size_vs_dense"] = row["bytes"] / dense["bytes"]
    return {
        "model": args.model, "source": str(dense_src), "sparsities": args.sparsities, "precisions": args.precisions,
        "prune": "llmrank.workflow.run_prune defaults (llmrank prune --no-onnx): wpr/dataflow gamma 0.5, lstsq refit 64x512",
        "threads": args.threads, "repeats": args.repeats, "decode_steps": args.decode_steps, "decode_prompt": PROMPT_LEN,
        "ppl": {"split": "wiki eval", "tokens": args.ppl_tokens, "seq_len": args.seq_len}, "rows": rows,
    }


def print_table(result: dict) -> None:
    shapes = list(result["rows"][0]["prefill_ms"])
    head = ["model", "MB", "ppl", "torch ppl"] + [f"prefill {s} ms" for s in shapes] + ["decode tok/s", "speedup (prefill; decode)"]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in result["rows"]:
        sp = r.get("speedup_vs_dense")
        speed = "; ".join(f"{v:.2f}x" for v in sp.values()) if sp else "-"
        torch_ppl = f"{r['torch_fp32_perplexity']:.2f}" if r["torch_fp32_perplexity"] else "-"
        cells = [f"{r['variant']} {r['precision']}", f"{r['bytes'] / 1e6:.0f}", f"{r['perplexity']:.2f}", torch_ppl]
        cells += [f"{r['prefill_ms'][s]:.0f}" for s in shapes] + [f"{r['decode_tok_s']:.1f}", speed]
        print("| " + " | ".join(cells) + " |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="built-in name or HF folder")
    p.add_argument("--sparsities", default="0.3")
    p.add_argument("--precisions", default="int4,fp32", help="comma list of int4, fp32 (fp16 is CUDA-only)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime (and torch) intra-op threads")
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--prefill", default="128,1024", help="prefill lengths (batch 1)")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-torch-ppl", action="store_true", help="skip the PyTorch fp32 reference perplexity")
    p.add_argument("--no-cache", action="store_true", help="prune and build again even if cached")
    p.add_argument("--work", type=Path, default=None, help="cache folder (default ~/.cache/llmrank/bench/deploy/<model>)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "deploy.json")
    args = p.parse_args(argv)
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    bad = set(args.precisions) - {"int4", "fp32"}
    if bad:
        p.error(f"--precisions: {', '.join(sorted(bad))} not measurable here (CPU); use int4 and/or fp32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import onnxruntime
    import onnxruntime_genai
    import torch

    load_start = os.getloadavg()
    start = time.perf_counter()
    result = bench(args)
    result["seconds"] = time.perf_counter() - start
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": load_start,
                         "loadavg_end": os.getloadavg(), "onnxruntime": onnxruntime.__version__,
                         "onnxruntime_genai": onnxruntime_genai.__version__, "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, args.out)
    print_table(result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
