#!/usr/bin/env python
"""Two series of a stored sweep, side by side at every sparsity, with the winner per metric.

Reads `results.json` written by `llmrank sweep` (nothing is recomputed) and writes
`head_to_head.{md,json}` next to it:

    python benchmarks/head_to_head.py benchmarks/results/sweep-smollm2 \\
        --a "wpr/dataflow g=0.5 t=0.5 +lstsq(64)" --b "activation/chained"

Perplexity: lower wins. Tasks: the primary metric (acc_norm for social_iqa, acc otherwise),
higher wins; a tie is a tie. With n items per task, one item is 1/n of accuracy: read small
task differences with that in mind (the JSON records n).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _metrics(row: dict, tasks: list[str]) -> dict[str, float | None]:
    out = {"ppl": row.get("ppl")}
    for task in tasks:
        out[task] = row.get(f"{task}_acc_norm" if task == "social_iqa" else f"{task}_acc")
    out["mean_acc"] = row.get("mean_acc")
    return out


def head_to_head(results: dict, a: str, b: str) -> dict:
    rows = results["rows"]
    tasks = list(results.get("primary_metric", {}))
    series = {r["series"] for r in rows[1:]}
    for name in (a, b):
        if name not in series:
            raise SystemExit(f"series {name!r} not in this sweep; it has: {', '.join(sorted(series))}")
    by = {(r["series"], r["sparsity"]): r for r in rows[1:]}
    sparsities = sorted({sp for s, sp in by if s == a} & {sp for s, sp in by if s == b})
    table = []
    for sp in sparsities:
        ma, mb = _metrics(by[(a, sp)], tasks), _metrics(by[(b, sp)], tasks)
        wins = {}
        for k in ma:
            if ma[k] is None or mb[k] is None:
                continue
            better_a = ma[k] < mb[k] if k == "ppl" else ma[k] > mb[k]
            wins[k] = "a" if better_a else ("tie" if ma[k] == mb[k] else "b")
        table.append({"sparsity": sp, "a": ma, "b": mb, "winner": wins})
    n_items = {t: (results["dense"]["metrics"].get("tasks") or {}).get(full, {}).get("n")
               for t in tasks for full in (results["dense"]["metrics"].get("tasks") or {}) if full.endswith(t)}
    return {"a": a, "b": b, "dense": _metrics(rows[0], tasks), "tasks": tasks, "items_per_task": n_items, "rows": table}


def markdown(h: dict) -> str:
    cols = ["ppl", *h["tasks"], "mean_acc"]
    head = "| sparsity | " + " | ".join(f"{c} (a / b)" for c in cols) + " | a wins |"
    lines = [f"a = `{h['a']}`, b = `{h['b']}`", "", head, "|" + "---|" * (len(cols) + 2)]
    fmt = lambda v, c: "–" if v is None else (f"{v:.1f}" if c == "ppl" else f"{v:.2f}")  # noqa: E731
    d = h["dense"]
    lines.append("| dense | " + " | ".join(fmt(d[c], c) for c in cols) + " | |")
    for r in h["rows"]:
        cells = []
        for c in cols:
            mark = "**" if r["winner"].get(c) == "a" else ""
            cells.append(f"{mark}{fmt(r['a'][c], c)}{mark} / {fmt(r['b'][c], c)}")
        won = sum(w == "a" for w in r["winner"].values())
        lines.append(f"| {r['sparsity']:g} | " + " | ".join(cells) + f" | {won} of {len(r['winner'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="a folder written by `llmrank sweep`")
    p.add_argument("--a", required=True, help="series label (as in results.md)")
    p.add_argument("--b", required=True, help="series label to compare against")
    args = p.parse_args(argv)
    h = head_to_head(json.loads((args.sweep / "results.json").read_text()), args.a, args.b)
    for name, text in (("head_to_head.json", json.dumps(h, indent=2)), ("head_to_head.md", markdown(h))):
        tmp = args.sweep / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, args.sweep / name)
    print(markdown(h))
    return 0


if __name__ == "__main__":
    sys.exit(main())
