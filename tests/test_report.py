"""The prune plot is optional: a plain install without matplotlib still prunes (issue 14, item 6)."""

from __future__ import annotations

import sys

import torch

from llmrank.report import plot_prune

WIDTHS = {"layers.0.mlp": (8, 6), "layers.1.mlp": (8, 6)}
SCORES = {name: torch.full((8,), 1 / 8) for name in WIDTHS}


def test_plot_is_written_with_matplotlib(tmp_path):
    path = plot_prune(WIDTHS, SCORES, tmp_path / "plot.png", "tiny")
    assert path == tmp_path / "plot.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_plot_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert plot_prune(WIDTHS, SCORES, tmp_path / "plot.png", "tiny") is None
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "matplotlib" in err and "llmrank[plot]" in err
