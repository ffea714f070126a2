#!/usr/bin/env python
"""onnxruntime latency of dense vs FFN-pruned models, next to the FLOP-proportional ideal.

For every model and sparsity the slim model is made with the weight-only ``l1`` scorer (speed
depends on the kept widths, not on which channels are kept, so no calibration is needed),
exported with the KV cache, and timed against the dense export: prefill latency per shape
and decode tokens/s, runs of all models interleaved, medians reported (llmrank.speed.compare).

Each measured speedup is shown next to the ideal one, dense FLOPs / slim FLOPs per token,
where FLOPs = 2 x MACs of every Linear (lm_head included) + attention scores and values
(4 x heads x head_dim x context per layer; context = the sequence length for prefill, as a
masked attention computes the full score matrix, and the mean cache length while decoding),
and measured / ideal says how much of the ideal the runtime delivers.

    python benchmarks/bench_speed.py                                   # both models, sparsities 0.1..0.5
    python benchmarks/bench_speed.py --models smollm2-135m --sparsities 0.3 --repeats 3
    python benchmarks/bench_speed.py --models random-llama --shapes 1x128 --decode-steps 16

Exports are cached under ~/.cache/llmrank/bench/ (``--no-cache`` re-exports). Writes
benchmarks/results/speed-<model>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# A larger Llama-shaped model with random weights (speed does not depend on the values).
RANDOM_LLAMA = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                    num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
PROMPT_LEN = 16  # llmrank.speed.compare decodes after a 16-token prompt


def random_llama(seed: int = 0, **overrides):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(**{**RANDOM_LLAMA, **overrides})
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def load(name: str):
    if name == "random-llama":
        return random_llama()
    from llmrank.models import load_model

    return load_model(name)[0]


def flops_per_token(model, context: float) -> dict[str, float]:
    """Forward FLOPs per token: Linears (2 x in x out) and attention (4 x heads x head_dim x context per layer)."""
    from torch import nn

    linear = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * context
    return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        b, _, s = part.strip().lower().partition("x")
        shapes.append((int(b), int(s)))
    return shapes


ONNX_RTOL = 1e-4  # as `llmrank prune` (llmrank.workflow.ONNX_RTOL)


def export_cached(model, path: Path, force: bool, atol: float) -> tuple[Path, float]:
    from llmrank.exporters.onnx import export_onnx

    if path.exists() and not force:
        return path, 0.0
    start = time.perf_counter()
    res = export_onnx(model, path, with_past=True, force=True, atol=atol, rtol=ONNX_RTOL)
    print(f"  exported {path.name}: max |ORT - PyTorch| {max(res.max_abs_diff.values()):.2g}", flush=True)
    return path, time.perf_counter() - start


def config_key(model) -> str:
    text = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def bench_model(name: str, args: argparse.Namespace) -> dict:
    import llmrank
    from llmrank.cache import cache_dir
    from llmrank.speed import compare

    cache = cache_dir() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    model = load(name)
    key = f"{name}-{config_key(model)}"
    print(f"[{name}] {llmrank.count_parameters(model):,} parameters; exporting/reusing ONNX in {cache}", flush=True)
    files = {"dense": export_cached(model, cache / f"{key}-dense.onnx", args.no_cache, args.atol)}
    traced = llmrank.trace(model)
    slims = {}
    for sp in args.sparsities:
        res = llmrank.prune(model, None, sparsity=sp, scorer="l1", multiple=args.multiple, verify_outputs=False,
                            progress=False, traced=traced)
        slims[sp] = res
        files[f"s{sp:g}"] = export_cached(res.model, cache / f"{key}-l1-s{sp:g}-m{args.multiple}.onnx", args.no_cache, args.atol)
    shapes = parse_shapes(args.shapes)
    vocab = model.get_input_embeddings().num_embeddings
    print(f"[{name}] timing {', '.join(files)} interleaved: prefill {args.shapes}, decode {args.decode_steps} steps, "
          f"{args.repeats} repeats", flush=True)
    start = time.perf_counter()
    speed = compare({n: p for n, (p, _) in files.items()}, prefill_shapes=shapes, decode_steps=args.decode_steps,
                    repeats=args.repeats, vocab=vocab, threads=args.threads)
    timing_s = time.perf_counter() - start

    decode_ctx = PROMPT_LEN + (args.decode_steps + 1) / 2
    dense = speed["dense"]
    rows = []
    for sp, res in slims.items():
        slim = speed[f"s{sp:g}"]
        row = {"sparsity": sp, "params_dense": res.params_before, "params_slim": res.params_after,
               "ffn_width": sorted({w for _, w in res.widths.values()}), "prefill": {}, "decode": None}
        for b, s in shapes:
            shape = f"{b}x{s}"
            ideal = flops_per_token(model, s)["total"] / flops_per_token(res.model, s)["total"]
            measured = dense.prefill_ms[shape] / slim.prefill_ms[shape]
            row["prefill"][shape] = {"dense_ms": dense.prefill_ms[shape], "slim_ms": slim.prefill_ms[shape],
                                     "speedup": measured, "ideal": ideal, "measured_over_ideal": measured / ideal}
        if dense.decode_tokens_per_s and slim.decode_tokens_per_s:
            ideal = flops_per_token(model, decode_ctx)["total"] / flops_per_token(res.model, decode_ctx)["total"]
            measured = slim.decode_tokens_per_s / dense.decode_tokens_per_s
            row["decode"] = {"dense_tok_s": dense.decode_tokens_per_s, "slim_tok_s": slim.decode_tokens_per_s,
                             "speedup": measured, "ideal": ideal, "measured_over_ideal": measured / ideal}
        rows.append(row)
    return {
        "model": name, "config": {k: v for k, v in model.config.to_dict().items() if isinstance(v, (int, float, str, bool))},
        "scorer": "l1", "multiple": args.multiple, "ort_threads": args.threads, "repeats": args.repeats, "decode_steps": args.decode_steps,
        "decode_prompt": PROMPT_LEN, "files": {n: str(p) for n, (p, _) in files.items()},
        "export_s": {n: s for n, (_, s) in files.items()}, "timing_s": timing_s,
        "flops_per_token_dense": {f"{b}x{s}": flops_per_token(model, s) for b, s in shapes} | {"decode": flops_per_token(model, decode_ctx)},
        "rows": rows,
    }


def print_rows(result: dict) -> None:
    print(f"\n{result['model']}: speedup measured (ideal, measured/ideal)")
    for row in result["rows"]:
        parts = [f"prefill {k}: {v['speedup']:.2f}x ({v['ideal']:.2f}x, {v['measured_over_ideal']:.2f})" for k, v in row["prefill"].items()]
        if row["decode"]:
            d = row["decode"]
            parts.append(f"decode: {d['slim_tok_s']:.1f} vs {d['dense_tok_s']:.1f} tok/s = {d['speedup']:.2f}x "
                         f"({d['ideal']:.2f}x, {d['measured_over_ideal']:.2f})")
        print(f"  sparsity {row['sparsity']:g} ({row['params_slim']:,} / {row['params_dense']:,} params): " + "; ".join(parts))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,random-llama",
                   help="comma list: built-in names, HF folders, or random-llama (hidden 1024, FFN 2816, 8 layers, 16/8 heads, vocab 32000)")
    p.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5")
    p.add_argument("--shapes", default="1x128,8x512", help="prefill shapes BATCHxSEQ")
    p.add_argument("--decode-steps", type=int, default=32, help="decode steps after a 16-token prompt (0: no decode timing)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--multiple", type=int, default=1, help="round kept FFN widths to a multiple")
    p.add_argument("--no-cache", action="store_true", help="re-export even if the cached ONNX file exists")
    p.add_argument("--atol", type=float, default=1e-3,
                   help="export check: max |ORT - PyTorch| logits (1e-4 is too tight for 30 fp32 layers: SmolLM2 dense gave 1.6e-4)")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxruntime
    import torch

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        load_start = os.getloadavg()
        result = bench_model(name, args)
        result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": load_start,
                             "loadavg_end": os.getloadavg(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
        out = args.out_dir / f"speed-{Path(name).name}.json"
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out)
        print_rows(result)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
