#!/usr/bin/env python
"""CPU cost of ``llmrank prune``'s default (wpr/dataflow, 30 %, lstsq refit) on a real model.

Each variant runs in a fresh process and prunes with the same call,
``llmrank.prune(model, calib_16x512, sparsity=0.3, compensation="lstsq", compensation_data=refit_64x512)``:
- ``current``: this checkout: one calibration walk (the 16 scoring sequences are the first 16
  of the 64 refit sequences) that stops each forward after the last watched layer;
- ``current-2walk``: this checkout handed the refit sequences in another order (not a prefix
  any more: the same sums, two walks), to show what sharing the walk saves;
- ``rev:REV``: the package as it was at git revision REV (``git archive``), for a before/after.
Process CPU time (``time.process_time``, all threads) is compared; run with ``--threads 1`` on
a busy machine, where spinning OpenMP threads inflate CPU time.

    python benchmarks/bench_default_cpu.py --threads 1 --variants current,rev:b19bf04
    python benchmarks/bench_default_cpu.py --threads 2 --flops       # the work itself, machine-independent

Writes benchmarks/results/default-cpu-<model>.json (default-flops-<model>.json with --flops).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def child(spec: dict) -> dict:
    """One prune in this process; ``spec["package"]``: a folder holding an older ``llmrank``."""
    if spec.get("package"):
        # take the older package instead of this checkout's editable install
        sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path.insert(0, spec["package"])
    import time

    import torch

    torch.set_num_threads(spec["threads"])
    import llmrank
    from llmrank.data import calibration_tokens
    from llmrank.models import load_model

    model, tok = load_model(spec["model"])
    calib = calibration_tokens(tok, "wiki", n=spec["samples"], seq_len=spec["seq_len"], seed=0)
    refit = calibration_tokens(tok, "wiki", n=spec["compensation_samples"], seq_len=spec["seq_len"], seed=0)
    if spec.get("two_walks"):
        refit = torch.cat([refit[spec["samples"]:], refit[: spec["samples"]]])
    traced = llmrank.trace(model)  # outside the measurement: torch.export is the same in every variant
    counter = None
    if spec.get("flops"):
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        counter.__enter__()
    cpu, wall = time.process_time(), time.perf_counter()
    result = llmrank.prune(model, calib, sparsity=0.3, compensation="lstsq", compensation_data=refit, progress=False,
                           traced=traced)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if counter is not None:
        counter.__exit__(None, None, None)
    return {"cpu_s": cpu, "wall_s": wall, "passes_s": result.timings,
            "gflop": counter.get_total_flops() / 1e9 if counter is not None else None,
            "llmrank": llmrank.__file__, "params_after": result.params_after,
            "kept_hash": hash(tuple(tuple(v.tolist()) for v in result.kept.values()))}


def package_at(rev: str, into: Path) -> Path:
    """The import package ``llmrank`` as it was at ``rev`` (ir/, passes/, exporters/ folded in)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = into / "src.tar"
    with open(archive, "wb") as fh:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev], stdout=fh, check=True)
    src = into / "src"
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    package = into / "pkg" / "llmrank"
    package.parent.mkdir(parents=True)
    (src / "llmrank").rename(package)
    for sub in ("ir", "passes", "exporters"):
        (src / sub).rename(package / sub)
        (package / sub / "__init__.py").touch()
    return package.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--compensation-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="current,current-2walk,rev:b19bf04")
    parser.add_argument("--flops", action="store_true",
                        help="count the FLOPs of every matmul inside the prune (torch's FlopCounterMode): the same on "
                             "any machine, unlike seconds on a shared one; the timings of such a run include the counter")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    base = {"model": args.model, "samples": args.samples, "compensation_samples": args.compensation_samples,
            "seq_len": args.seq_len, "threads": args.threads, "flops": args.flops}
    out: dict = {**base, "machine": f"{platform.machine()}, python {platform.python_version()}", "variants": {}}
    with tempfile.TemporaryDirectory(prefix="llmrank-bench-") as scratch:
        for variant in args.variants.split(","):
            spec = dict(base)
            if variant == "current-2walk":
                spec["two_walks"] = True
            elif variant.startswith("rev:"):
                spec["package"] = str(package_at(variant[4:], Path(scratch) / variant[4:]))
            elif variant != "current":
                raise SystemExit(f"unknown variant {variant!r}")
            run = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=True)
            out["variants"][variant] = json.loads(run.stdout.strip().splitlines()[-1])
            got = out["variants"][variant]
            flops = f", {got['gflop']:,.0f} GFLOP" if got.get("gflop") else ""
            print(f"{variant}: {got['cpu_s']:.0f} s CPU, {got['wall_s']:.0f} s wall{flops}", flush=True)
    hashes = {v["kept_hash"] for v in out["variants"].values()}
    out["same_kept_sets"] = len(hashes) == 1
    path = HERE / "results" / f"default-{'flops' if args.flops else 'cpu'}-{args.model}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
