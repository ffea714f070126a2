#!/usr/bin/env python
"""The peers' criterion, run by the peer itself: Torch-Pruning on the FFNs of a real model,
beside llmrank's default and llmrank's own ``taylor`` scorer, on the same data and protocol.

Torch-Pruning (``pip install 'llmrank[bench]'``, i.e. ``torch-pruning``) runs in this process:
its DependencyGraph traces the transformers 5 model (logits as the output) and gives, for each
decoder layer, the group of gate_proj/up_proj rows and down_proj columns; its own importance
(``GroupTaylorImportance``: |w * dL/dw| summed per weight, mean over the group's layers, after
one backward per calibration sequence; ``GroupMagnitudeImportance``: L2 norms, its default)
picks the channels and ``group.prune()`` cuts them. Only the FFN intermediate channels are cut,
the same count per layer as llmrank's local pruner removes, and nothing is refitted.

Same for every row:
- calibration: ``llmrank.data.calibration_tokens(tokenizer, "wiki", n=16, seq_len=512, seed=0)``
  (llmrank's lstsq refit also reads 64 x 512 sequences whose first 16 are these);
- evaluation: the protocol of benchmarks/README.md, 4,096 tokens (8 x 512) of the wiki evaluation articles.

    python benchmarks/bench_peers.py --threads 1                       # every row, SmolLM2-135M
    python benchmarks/bench_peers.py --rows tp-taylor,llmrank-taylor   # some rows

Writes benchmarks/results/peers-<model>.json (``peers.json`` for SmolLM2-135M).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROWS = ("tp-taylor", "tp-magnitude", "llmrank-default", "llmrank-taylor", "llmrank-taylor-lstsq")


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def torch_pruning_ffn(dense, calib: torch.Tensor, sparsity: float, importance: str) -> torch.nn.Module:
    """Torch-Pruning's own importance and pruning of every FFN's intermediate channels."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise SystemExit("this benchmark runs Torch-Pruning: pip install 'llmrank[bench]' (torch-pruning)") from None
    model = copy.deepcopy(dense).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs={"input_ids": calib[:1, :16], "use_cache": False},
                                                  output_transform=lambda out: out.logits)
    if importance == "taylor":
        imp = tp.importance.GroupTaylorImportance()
        model.zero_grad()
        for row in calib.split(1):  # one backward per sequence: the gradients accumulate (as Torch-Pruning's LLM example)
            lm_loss(model, row).backward()
    else:
        imp = tp.importance.GroupMagnitudeImportance(p=2)
    for layer in model.model.layers:
        gate = layer.mlp.gate_proj
        width = gate.out_features
        group = graph.get_pruning_group(gate, tp.prune_linear_out_channels, idxs=list(range(width)))
        scores = imp(group)
        cut = torch.sort(scores, stable=True).indices[:round(sparsity * width)].tolist()
        graph.get_pruning_group(gate, tp.prune_linear_out_channels, idxs=cut).prune()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def llmrank_ffn(dense, calib: torch.Tensor, refit: torch.Tensor, sparsity: float, scorer: str, compensation: str):
    import llmrank

    return llmrank.prune(dense, calib, sparsity=sparsity, scorer=scorer, compensation=compensation,
                         compensation_data=refit if compensation != "none" else None, progress=False).model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")

    from llmrank.api import count_parameters
    from llmrank.data import bos_token_id, calibration_tokens, eval_tokens
    from llmrank.evaluate import perplexity
    from llmrank.models import load_model

    dense, tokenizer = load_model(args.model)
    dense.eval()
    calib = calibration_tokens(tokenizer, "wiki", n=16, seq_len=512, seed=0)
    refit = calibration_tokens(tokenizer, "wiki", n=64, seq_len=512, seed=0)
    stream, bos = eval_tokens(tokenizer), bos_token_id(tokenizer)

    def ppl(model) -> float:
        return perplexity(model, stream, seq_len=512, max_tokens=4096, progress=False, bos_token_id=bos).ppl

    out_path = args.out or HERE / "results" / ("peers.json" if args.model == "smollm2-135m" else f"peers-{args.model}.json")
    old = json.loads(out_path.read_text()) if out_path.is_file() else {}
    results = {r["row"]: r for r in old.get("rows", [])}
    dense_ppl = ppl(dense)
    builders = {
        "tp-taylor": lambda: torch_pruning_ffn(dense, calib, args.sparsity, "taylor"),
        "tp-magnitude": lambda: torch_pruning_ffn(dense, calib, args.sparsity, "magnitude"),
        "llmrank-default": lambda: llmrank_ffn(dense, calib, refit, args.sparsity, "wpr", "lstsq"),
        "llmrank-taylor": lambda: llmrank_ffn(dense, calib, refit, args.sparsity, "taylor", "none"),
        "llmrank-taylor-lstsq": lambda: llmrank_ffn(dense, calib, refit, args.sparsity, "taylor", "lstsq"),
    }
    for row in rows:
        clock = time.perf_counter()
        slim = builders[row]()
        prune_s = time.perf_counter() - clock
        value = ppl(slim)
        widths = sorted({layer.mlp.gate_proj.out_features for layer in slim.model.layers})
        results[row] = {"row": row, "ppl": value, "ratio_to_dense": value / dense_ppl, "params": count_parameters(slim),
                        "ffn_widths": widths, "prune_s": prune_s}
        print(f"{row:22s} ppl {value:10.2f}  {value / dense_ppl:8.2f}x dense  widths {widths}  ({prune_s:.0f} s)", flush=True)
        del slim
    report = {
        "model": args.model, "sparsity": args.sparsity, "dense_ppl": dense_ppl, "dense_params": count_parameters(dense),
        "calibration": "16 x 512 wiki calibration tokens, seed 0 (lstsq refit: 64 x 512, the first 16 the same)",
        "evaluation": "perplexity, 4,096 tokens (8 x 512) of the wiki evaluation articles",
        "threads": args.threads, "machine": platform.processor() or platform.machine(),
        "torch_pruning": _version("torch-pruning"), "transformers": _version("transformers"),
        "rows": [results[r] for r in ROWS if r in results],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
