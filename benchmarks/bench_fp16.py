#!/usr/bin/env python
"""fp16 ONNX of a real model in onnxruntime (CPU) against PyTorch fp32, on real text.

Exports the model in fp32 and in fp16 (``export_onnx(..., dtype=torch.float16)``, KV-cache
form), then feeds both files wiki calibration text (not random ids, whose flat next-token
distributions make top-1 ties common) and reports the relative L2 logit error and top-1
agreement against the fp32 PyTorch model, the file sizes, and which operators of the fp16 graph
onnxruntime's CPU provider runs in fp32 because it has no fp16 kernel for them (it inserts
Cast nodes around those; the optimized graph is saved and read back to find them). Because the
runtime moves casts across shape ops and merges neighbouring fp32 regions, that graph count is
an outline; ``--probe`` asks the CPU provider op by op (a one-node fp16 model per operator).

    python benchmarks/bench_fp16.py --model smollm2-135m --samples 4 --seq-len 128
    python benchmarks/bench_fp16.py --probe     # only the op-by-op kernel probe (seconds)

Writes benchmarks/results/onnx-fp16-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def cpu_fp32_ops(path: Path) -> dict[str, int]:
    """Operator types onnxruntime's CPU provider feeds through its own inserted fp32 Casts."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "placed.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
    inserted = {out for n in graph.node if n.op_type == "Cast" and "InsertedPrecisionFreeCast" in n.name for out in n.output}
    return dict(Counter(n.op_type for n in graph.node if n.op_type != "Cast" and any(i in inserted for i in n.input)))


#: One-node probes: operator -> number of fp16 inputs (Where gets a bool condition first; Reduce* axes).
PROBES = {"Add": 2, "Sub": 2, "Mul": 2, "Div": 2, "Pow": 2, "Max": 2, "MatMul": 2, "Where": 2, "Neg": 1, "Sqrt": 1,
          "Reciprocal": 1, "Exp": 1, "Sigmoid": 1, "Tanh": 1, "Cos": 1, "Sin": 1, "IsNaN": 1, "Softmax": 1,
          "ReduceMean": 1, "ReduceMax": 1, "ReduceSum": 1}


def probe_fp16_kernels() -> dict[str, bool]:
    """Operator -> does onnxruntime's CPU provider run it in fp16 (False: it inserts Casts to fp32)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    found = {}
    for op, n_in in PROBES.items():
        inputs = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT16, [3, 3]) for i in range(n_in)]
        names = [f"x{i}" for i in range(n_in)]
        inits = []
        if op == "Where":
            inputs.insert(0, helper.make_tensor_value_info("c", TensorProto.BOOL, [3, 3]))
            names.insert(0, "c")
        if op.startswith("Reduce"):
            inits.append(helper.make_tensor("axes", TensorProto.INT64, [1], [1]))
            names.append("axes")
        out_type = TensorProto.BOOL if op == "IsNaN" else TensorProto.FLOAT16
        graph = helper.make_graph([helper.make_node(op, names, ["y"])], "probe", inputs,
                                  [helper.make_tensor_value_info("y", out_type, None)], initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        with tempfile.TemporaryDirectory() as tmp:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            opts.optimized_model_filepath = str(Path(tmp) / "placed.onnx")
            ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            found[op] = not any(n.op_type == "Cast" for n in onnx.load(opts.optimized_model_filepath).graph.node)
    return found


def on_text(model, path: Path, ids: torch.Tensor) -> dict[str, float]:
    from llmrank.exporters.onnx import empty_past, ort_session

    session = ort_session(path)
    batch, seq = ids.shape
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "position_ids": np.tile(np.arange(seq), (batch, 1)), **empty_past(session, batch)}
    got = torch.from_numpy(session.run(["logits"], feed)[0].astype(np.float64))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.double()
    return {"relative_error": float((got - ref).norm() / ref.norm()),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).double().mean()),
            "max_abs_diff": float((got - ref).abs().max())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--probe", action="store_true", help="only probe the CPU provider's fp16 kernels; merge into --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or HERE / "results" / f"onnx-fp16-{args.model}.json"
    kernels = probe_fp16_kernels()
    probe = {"fp16_kernel": sorted(k for k, v in kernels.items() if v), "no_fp16_kernel": sorted(k for k, v in kernels.items() if not v)}
    print("onnxruntime CPU", json.dumps(probe), flush=True)
    if args.probe:
        record = json.loads(out.read_text()) if out.is_file() else {}
        record["cpu_kernel_probe"] = probe
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
        return
    from llmrank.data import calibration_tokens
    from llmrank.exporters.onnx import export_onnx
    from llmrank.models import load_model

    model, tokenizer = load_model(args.model)
    model = model.float().eval()
    ids = calibration_tokens(tokenizer, "wiki", n=args.samples, seq_len=args.seq_len, seed=0)
    record = {"model": args.model, "text": f"wiki calibration text, {args.samples} x {args.seq_len} tokens",
              "cpu_kernel_probe": probe}
    with tempfile.TemporaryDirectory(prefix="llmrank-fp16-") as tmp:
        for name, dtype in (("fp32", None), ("fp16", torch.float16)):
            res = export_onnx(model, Path(tmp) / f"{name}.onnx", with_past=True, dtype=dtype, atol=1e-3, rtol=1e-4)
            record[name] = {"bytes": res.total_bytes, "random_ids": {"relative_error": res.relative_error,
                                                                     "top1_agreement": res.top1_agreement},
                            "text": on_text(model, res.path, ids)}
            if dtype is not None:
                record[name]["cpu_ops_run_in_fp32"] = cpu_fp32_ops(res.path)
            print(name, json.dumps(record[name]), flush=True)
    import onnxruntime

    record["onnxruntime"] = onnxruntime.__version__
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
