"""Human-facing results: a short text table and a PNG of kept widths and score distributions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain aligned text table (no dependency, pasteable into issues)."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def _pyplot(path: Path):
    """matplotlib.pyplot (Agg), or None with a one-line note that ``path`` is not written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from llmrank.cache import log

        log(f"plot skipped: matplotlib is not installed (pip install 'llmrank[plot]'); {Path(path).name} not written")
        return None
    return plt


def plot_prune(widths: dict[str, tuple[int, int]], scores: dict[str, torch.Tensor], path: Path, title: str) -> Path | None:
    """Kept width per group (left) and the distribution of normalised scores (right).

    matplotlib is an optional extra: without it the plot is skipped with a one-line note and
    None is returned, so a plain install can still prune (the caller records no plot).
    """
    plt = _pyplot(path)
    if plt is None:
        return None

    names = list(widths)
    before = [widths[n][0] for n in names]
    after = [widths[n][1] for n in names]
    fig, (ax_w, ax_s) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = range(len(names))
    ax_w.bar(x, before, color="#d0d7de", label="dense")
    ax_w.bar(x, after, color="#1f6feb", label="kept")
    ax_w.set_xlabel("group (graph order)")
    ax_w.set_ylabel("channels")
    ax_w.set_title("kept width per group")
    ax_w.legend(loc="lower right")
    flat = torch.cat([(s * s.numel()).float() for s in scores.values()]).clamp_min(1e-6)
    ax_s.hist(flat.log10().numpy(), bins=80, color="#8250df")
    ax_s.set_xlabel("log10(score x width)  (0 = an average channel)")
    ax_s.set_ylabel("channels")
    ax_s.set_title("score distribution")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heal(curve: Sequence[dict[str, float]], dense_ppl: float, path: Path, title: str) -> Path | None:
    """Held-out perplexity against heal tokens, with the dense model's as a line (None without matplotlib)."""
    plt = _pyplot(path)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([p["tokens"] for p in curve], [p["ppl"] for p in curve], "o-", color="#1f6feb", label="healed slim")
    ax.axhline(dense_ppl, color="#6e7781", linestyle="--", label=f"dense ({dense_ppl:.2f})")
    ax.set_xlabel("heal tokens")
    ax.set_ylabel("perplexity (held-out calibration text)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
