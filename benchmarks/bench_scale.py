#!/usr/bin/env python
"""Block-by-block pruning at scale: peak memory and time on synthetic Llama-shaped bf16 checkpoints.

Each configuration (layers x hidden/intermediate, Llama-3 vocabulary by default) is written as a
random bf16 checkpoint, one shard per decoder block, never the whole model in memory. It is then
pruned at 30 % with ``prune_layerwise`` (wpr/dataflow, least-squares refit) in a fresh process,
so the process's peak RSS is that run's; where the model fits, the in-memory ``llmrank.prune``
of the same checkpoint runs beside it, also in its own process. The comparison point for time
is one calibration forward pass of the dense model (the sum of the blocks' calibration walks).

    python benchmarks/bench_scale.py                                   # the small grid below
    python benchmarks/bench_scale.py --shapes 32x4096x14336 --samples 4 --seq-len 256 \
        --in-memory-max-gb 0 --work ~/.cache/llmrank/bench --log scale-8b.log --out benchmarks/results/scale-8b.json  # Llama-3-8B
    python benchmarks/bench_scale.py --shapes 32x2048x5632 --in-memory-max-gb 0 --threads 2 \
        --work /tmp/scale-work --out benchmarks/results/scale-2048.json   # 32 x 2048, against its memory bound

Writes benchmarks/results/scale.json (one record per configuration and route).

Each block-route record carries the memory bound the route holds itself to, computed from the
shapes (``memory_bound``), and ``peak_over_bound``, its peak RSS over that bound:

    bound = one fp32 block + its refit statistics + embeddings + calibration hidden states + 1 GB

with the refit statistics the fp64 Gram and sum of each refitted consumer's input (down_proj:
d_ff x d_ff), the embeddings the input and (untied) output matrices in the checkpoint's dtype,
the hidden states every calibration token (and the verification sample's) at the block
boundary in the checkpoint's dtype, and 1 GB (1e9 bytes) for the Python/torch runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SHAPES = "4x1024x2816,8x1024x2816,16x1024x2816,2x4096x14336"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of LAYERSxHIDDENxINTERMEDIATE")
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary (Llama-3: 128256)")
    p.add_argument("--samples", type=int, default=8, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=128, help="calibration sequence length")
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--compensation", default="lstsq")
    p.add_argument("--in-memory-max-gb", type=float, default=4.0,
                   help="also run the in-memory prune when the fp32 model is at most this big")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--work", type=Path, default=None, help="where the checkpoints go (default: a temp folder, deleted)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    p.add_argument("--log", type=Path, default=None,
                   help="append the children's stderr here, with a progress bar per block (watch a long run with tail -f)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def parse_shape(text: str) -> tuple[int, int, int]:
    layers, hidden, inter = (int(x) for x in text.lower().split("x"))
    return layers, hidden, inter


def memory_bound(layers: int, hidden: int, inter: int, vocab: int, *, samples: int, seq_len: int,
                 compensation: str = "lstsq", dtype_bytes: int = 2, tied: bool = False) -> dict[str, int]:
    """The block route's memory bound for a Llama shape (see the module docstring), term by term."""
    heads = max(hidden // 128, 1)
    kv = max(heads // 4, 1) * (hidden // heads)
    block = 2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * inter + 2 * hidden
    refit = 0 if compensation == "none" else 8 * inter * (inter if compensation.startswith("lstsq") else 0) + 8 * inter
    tokens = samples * seq_len + min(2, samples) * min(64, seq_len)  # + the verification sample, [:2, :64] of the first batch
    terms = {"fp32_block": 4 * block, "refit_statistics": refit, "embeddings": (1 if tied else 2) * vocab * hidden * dtype_bytes,
             "hidden_states": tokens * hidden * dtype_bytes, "runtime": 10**9}
    return {**terms, "bound": sum(terms.values())}


def llama_config(layers: int, hidden: int, inter: int, vocab: int):
    import transformers

    heads = max(hidden // 128, 1)
    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                    num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1), vocab_size=vocab,
                                    max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                                    dtype="bfloat16")


def write_checkpoint(folder: Path, layers: int, hidden: int, inter: int, vocab: int) -> int:
    """A random bf16 Llama checkpoint, one shard per block plus one for embeddings/norm/head;
    returns its size in bytes. Only one block's tensors exist in memory at a time."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = llama_config(layers, hidden, inter, vocab)
    config.save_pretrained(folder)
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    gen = torch.Generator().manual_seed(0)
    n = layers + 1
    weight_map, total = {}, 0

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def put(i: int, tensors: dict) -> None:
        nonlocal total
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    for i in range(layers):
        p = f"model.layers.{i}."
        put(i, {p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(kv, hidden),
                p + "self_attn.v_proj.weight": rand(kv, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
                p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
                p + "mlp.down_proj.weight": rand(hidden, inter),
                p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
    put(layers, {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                 "lm_head.weight": rand(vocab, hidden)})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def child(args: argparse.Namespace) -> None:
    """One prune in this process; prints one JSON line (the parent reads peak RSS from it)."""
    import torch

    import llmrank
    from llmrank.passes.config import PruneConfig
    from llmrank.layerwise import prune_layerwise
    from llmrank.passes.blocks.driver import peak_rss_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    route, folder, vocab = args.child.split(":", 2)
    if route == "write":
        layers, hidden, inter = parse_shape(Path(folder).name.split("-", 1)[1])
        tick = time.perf_counter()
        size = write_checkpoint(Path(folder), layers, hidden, inter, int(vocab))
        print("RESULT " + json.dumps({"checkpoint_bytes": size, "checkpoint_write_s": time.perf_counter() - tick}))
        return
    ids = torch.randint(0, int(vocab), (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    config = PruneConfig(sparsity=args.sparsity, compensation=args.compensation)
    rss_start = peak_rss_bytes()
    clock = time.perf_counter()
    if route == "layerwise":
        out = Path(folder).parent / (Path(folder).name + "-slim")
        result = prune_layerwise(folder, ids, config=config, out_dir=out, force=2, progress=args.log is not None)
        total = time.perf_counter() - clock
        blocks = [sum(b.seconds.values()) for b in result.blocks]
        record = {"route": "layerwise", "total_s": total, "timings_s": result.timings, "peak_rss_bytes": peak_rss_bytes(),
                  "rss_at_start_bytes": rss_start, "hidden_bytes": result.hidden_bytes,
                  "block_s_mean": sum(blocks) / len(blocks), "block_s_max": max(blocks), "block_s": blocks,
                  "block_rss_bytes": [b.rss_bytes for b in result.blocks],
                  "forward_s": result.timings.get("calibrate", 0.0), "params_before": result.params_before,
                  "params_after": result.params_after, "relative_error": result.output_check.relative_error,
                  "kept": {k: v.tolist() for k, v in result.kept.items()}}
        shutil.rmtree(out, ignore_errors=True)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        load_s = time.perf_counter() - clock
        tick = time.perf_counter()
        with torch.no_grad():
            for batch in ids.split(config.batch_size):
                model(input_ids=batch, use_cache=False)
        forward_s = time.perf_counter() - tick
        tick = time.perf_counter()
        result = llmrank.prune(model, ids, config=config, progress=False)
        prune_s = time.perf_counter() - tick
        record = {"route": "in-memory", "total_s": load_s + prune_s, "load_s": load_s, "prune_s": prune_s, "timings_s": result.timings,
                  "peak_rss_bytes": peak_rss_bytes(), "rss_at_start_bytes": rss_start, "forward_s": forward_s,
                  "params_before": result.params_before, "params_after": result.params_after,
                  "relative_error": result.output_check.relative_error,
                  "kept": {k: v.tolist() for k, v in result.kept.items()}}
    print("RESULT " + json.dumps(record))


def run_child(route: str, folder: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{route}:{folder}:{args.vocab}", "--samples", str(args.samples),
           "--seq-len", str(args.seq_len), "--sparsity", str(args.sparsity), "--compensation", args.compensation]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.log is None:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        err = proc.stderr
    else:
        cmd += ["--log", str(args.log)]
        with args.log.open("a") as log:
            log.write(f"--- {route} {folder} {time.strftime('%H:%M:%S')}\n")
            log.flush()
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        err = args.log.read_text()[-2000:]
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        if route == "write":
            raise RuntimeError(f"writing {folder} failed: {err.strip().splitlines()[-1:]}")
        return {"route": route, "error": (err or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="llmrank-scale-"))
    records = []
    try:
        for shape in args.shapes.split(","):
            layers, hidden, inter = parse_shape(shape)
            folder = work / f"llama-{layers}x{hidden}x{inter}"
            # every step in its own process, so each peak RSS is that step's alone (Linux keeps
            # ru_maxrss across fork and exec: a parent that had held tensors would leak its peak)
            written = run_child("write", folder, args)
            size = written["checkpoint_bytes"]
            base = {"shape": shape, "layers": layers, "hidden": hidden, "intermediate": inter, "vocab": args.vocab,
                    "checkpoint_bytes": size, "checkpoint_write_s": written["checkpoint_write_s"],
                    "samples": args.samples, "seq_len": args.seq_len,
                    "sparsity": args.sparsity, "compensation": args.compensation}
            lw = run_child("layerwise", folder, args)
            if "peak_rss_bytes" in lw:
                bound = memory_bound(layers, hidden, inter, args.vocab, samples=args.samples, seq_len=args.seq_len,
                                     compensation=args.compensation)
                lw["bound_terms"] = {k: v for k, v in bound.items() if k != "bound"}
                lw["bound_bytes"] = bound["bound"]
                lw["peak_over_bound"] = lw["peak_rss_bytes"] / bound["bound"]
            print(shape, "layerwise", {k: v for k, v in lw.items() if k != "kept"}, flush=True)
            mem = None
            if 2 * size <= args.in_memory_max_gb * 1e9:  # bf16 on disk -> fp32-free bf16 load; 2x for the slim copy
                mem = run_child("in-memory", folder, args)
                print(shape, "in-memory", {k: v for k, v in mem.items() if k != "kept"}, flush=True)
                if "kept" in lw and "kept" in mem:
                    base["same_kept_sets"] = lw["kept"] == mem["kept"]
            for rec in (lw, mem):
                if rec is not None:
                    rec.pop("kept", None)
                    records.append({**base, **rec})
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    from importlib.metadata import version

    meta = {"torch": version("torch"), "transformers": version("transformers"), "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
