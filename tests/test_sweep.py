"""The sweep core on a tiny random Llama: cells, resume, summaries, retention of dense == 1."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import llmrank
from llmrank.sweep import Cell, EvalSpec, evaluate_model, expand_cells, parse_grid, run_sweep
from llmrank.tasks import MCItem

WORDS = "the cat sat on a mat while dog ran in park with red ball and blue sky over green hill".split()


def make_tokenizer():
    """A word-level tokenizer trained in memory (no hub): ids < 40, specials 0..3."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>", "<pad>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


ITEMS = [
    MCItem("the cat sat on", [" a mat", " blue sky"], 0),
    MCItem("dog ran in", [" park", " red", " hill"], 0),
    MCItem("", ["red ball", "ball red"], 0),
    MCItem("green", [" hill", " cat"], 1),
]


@pytest.fixture()
def setup(llama_factory):
    torch.manual_seed(0)
    model = llama_factory(seed=0)
    gen = torch.Generator().manual_seed(3)
    calib = torch.randint(0, 128, (6, 16), generator=gen)
    ppl = torch.randint(0, 128, (1, 97), generator=gen)
    spec = EvalSpec(ppl_tokens=ppl, seq_len=32, tasks={"toy": ITEMS}, tokenizer=make_tokenizer(), batch_size=4,
                    protocol={"split": "random tokens"})
    return model, calib, spec


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, model, spec):
        self.calls += 1
        return evaluate_model(model, spec)


def test_sweep_runs_resumes_and_writes(setup, tmp_path, monkeypatch):
    model, calib, spec = setup
    calibrations = []
    import llmrank.passes.pipeline as pipeline

    real_collect = pipeline.collect
    monkeypatch.setattr(pipeline, "collect", lambda *a, **k: calibrations.append(1) or real_collect(*a, **k))
    cells = expand_cells(["l1", "wpr"], [0.25, 0.5], gammas=[0.5])
    assert len(cells) == 4
    count = Counter()
    res = run_sweep(model, cells, tmp_path, calibration=calib, spec=spec, evaluate_fn=count, progress=False, log=lambda s: None)
    assert count.calls == 5  # dense once + 4 cells
    assert len(calibrations) == 1  # one walk over the calibration data for all cells
    assert set(res.computed) == {"dense"} | {c.key for c in cells}
    for name in ("results.json", "results.csv", "results.md", "retention_perplexity.png", "retention_accuracy.png"):
        assert (tmp_path / name).is_file(), name
    for c in cells:
        assert (tmp_path / "cells" / f"{c.key}.json").is_file()

    dense = res.rows[0]
    assert dense["key"] == "dense"
    assert dense["ppl_retention"] == 1.0 and dense["mean_acc_retention"] == 1.0 and dense["toy_retention"] == 1.0
    assert all(r["params"] < dense["params"] for r in res.rows[1:])
    half = [r for r in res.rows if r["sparsity"] == 0.5]
    assert all(r["ppl_retention"] == pytest.approx(dense["ppl"] / r["ppl"]) for r in half)

    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 5 and rows[0]["key"] == "dense" and float(rows[0]["ppl_retention"]) == 1.0
    md = (tmp_path / "results.md").read_text()
    assert "| dense |" in md and "dense ppl / pruned ppl" in md
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["cells"]) == 4 and data["dense"]["metrics"]["perplexity"]["ppl"] == pytest.approx(dense["ppl"])

    # Resume: nothing is recomputed and the cell files are not rewritten.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").glob("*.json")}
    count2 = Counter()
    res2 = run_sweep(model, cells, tmp_path, calibration=calib, spec=spec, evaluate_fn=count2, progress=False, log=lambda s: None)
    assert count2.calls == 0 and res2.computed == []
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").glob("*.json")} == mtimes
    assert [r["ppl"] for r in res2.rows] == [r["ppl"] for r in res.rows]

    # A wider sweep only computes the new cells; the summary covers all stored ones.
    more = expand_cells(["l1"], [0.25, 0.75])
    count3 = Counter()
    res3 = run_sweep(model, more, tmp_path, calibration=calib, spec=spec, evaluate_fn=count3, progress=False, log=lambda s: None)
    assert count3.calls == 1 and res3.computed == ["l1-chained-s0.75-none-g0-t0.5"]
    assert len(res3.rows) == 1 + 5


def test_changed_settings_recompute(setup, tmp_path):
    model, calib, spec = setup
    cells = [Cell("l1", "chained", 0.5)]
    run_sweep(model, cells, tmp_path, calibration=calib, spec=spec, progress=False, log=lambda s: None, plots=False)
    other = EvalSpec(ppl_tokens=spec.ppl_tokens[:, :65], seq_len=32, tasks={}, tokenizer=None)
    count = Counter()
    res = run_sweep(model, cells, tmp_path, calibration=calib, spec=other, evaluate_fn=count, progress=False, log=lambda s: None, plots=False)
    assert count.calls == 2  # dense and the cell: the stored ones were made with other eval tokens
    assert "mean_acc" not in res.rows[0]


def test_compensation_and_random_cells(setup, tmp_path):
    model, calib, spec = setup
    spec = EvalSpec(ppl_tokens=spec.ppl_tokens, seq_len=32)
    cells = expand_cells(["activation", "random"], [0.5], compensations=["none", "lstsq"])
    res = run_sweep(model, cells, tmp_path, calibration=calib, spec=spec, progress=False, log=lambda s: None, plots=False)
    ppl = {r["key"]: r["ppl"] for r in res.rows}
    assert ppl["activation-chained-s0.5-none-g0-t0.5"] != ppl["activation-chained-s0.5-lstsq-g0-t0.5"]
    assert len(res.rows) == 5


def test_compensation_on_more_sequences_than_calibration(setup, tmp_path):
    model, calib, spec = setup
    spec = EvalSpec(ppl_tokens=spec.ppl_tokens, seq_len=32)
    more = torch.cat([calib, calib.flip(0)])
    cells = expand_cells(["activation"], [0.5], compensations=["lstsq"], compensation_samples=more.shape[0])
    assert cells[0].key == f"activation-chained-s0.5-lstsq{more.shape[0]}-g0-t0.5"
    with pytest.raises(ValueError, match="compensation sequences"):
        run_sweep(model, cells, tmp_path, calibration=calib, spec=spec, progress=False, log=lambda s: None, plots=False)
    res = run_sweep(model, cells, tmp_path, calibration=calib, compensation_calibration=more, spec=spec,
                    progress=False, log=lambda s: None, plots=False)
    # the same refit done by hand from statistics of the larger token set
    from llmrank.passes.compensate import collect_input_stats, compensate

    ir = llmrank.analyze(llmrank.trace(model))
    norms = llmrank.calibrate(model, ir, list(calib.split(4)), progress=False)
    kept = llmrank.select(ir, llmrank.score(model, ir, norms, llmrank.ScoreConfig("activation", "chained")).groups, 0.5)
    slim = compensate(llmrank.shrink(model, ir, kept), model, ir, kept,
                      collect_input_stats(model, ir, list(more.split(4)), progress=False))
    assert res.rows[-1]["ppl"] == pytest.approx(evaluate_model(slim, spec)["perplexity"]["ppl"], rel=1e-6)


def test_expand_cells_dedupes_and_validates():
    cells = expand_cells(["l1", "wpr", "hits"], [0.1, 0.2], gammas=[0.0, 0.5], thetas=[0.3, 0.5], representations=["dataflow"])
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys))
    assert sum(c.scorer == "l1" for c in cells) == 2  # gamma/theta do not touch l1
    assert sum(c.scorer == "hits" for c in cells) == 4  # gamma does, theta does not
    assert sum(c.scorer == "wpr" for c in cells) == 8
    with pytest.raises(ValueError):
        expand_cells(["nope"], [0.1])
    with pytest.raises(ValueError):
        expand_cells(["l1"], [1.0])
    with pytest.raises(ValueError):
        expand_cells(["wpr"], [0.1], gammas=[2.0])


def test_parse_grid():
    assert parse_grid(["gamma=0,0.25,1", "theta=0.5"]) == {"gammas": [0.0, 0.25, 1.0], "thetas": [0.5]}
    assert parse_grid(["scorers=wpr,l1"]) == {"scorers": ["wpr", "l1"]}
    for bad in (["gamma"], ["nope=1"], ["gamma=a"], ["gamma="]):
        with pytest.raises(ValueError):
            parse_grid(bad)


def test_pivot_puts_each_series_on_one_row():
    from llmrank.sweep import pivot

    rows = [{"series": "dense", "sparsity": 0.0, "ppl": 10.0},
            {"series": "a", "sparsity": 0.5, "ppl": 30.0}, {"series": "a", "sparsity": 0.1, "ppl": 12.5},
            {"series": "b", "sparsity": 0.1, "ppl": 11.0}]
    lines = pivot(rows, "ppl").splitlines()
    assert lines[0] == "| series | dense | 0.1 | 0.5 |"
    assert lines[2:] == ["| a | 10 | 12.5 | 30 |", "| b | 10 | 11 |  |"]
    assert pivot(rows, "mean_acc") == ""


def test_refit_options_in_the_grid():
    cells = expand_cells(["wpr"], [0.3], compensations=["none", "lstsq"], gammas=[0.5], allocations=["uniform", "error"],
                         selections=["score", "refit"], refit_inputs=["dense", "pruned"])
    keys = [c.key for c in cells]
    assert len(keys) == 1 + 8  # the cell without a refit keeps the defaults, so it appears once
    assert "wpr-chained-s0.3-none-g0.5-t0.5" in keys and "wpr-chained-s0.3-lstsq-g0.5-t0.5" in keys
    assert "wpr-chained-s0.3-lstsq-g0.5-t0.5-aerror-selrefit-seq" in keys
    assert parse_grid(["allocation=uniform,error", "refit_inputs=pruned"]) == {"allocations": ["uniform", "error"],
                                                                               "refit_inputs": ["pruned"]}
    with pytest.raises(ValueError):
        expand_cells(["wpr"], [0.3], compensations=["lstsq"], allocations=["nope"])


@pytest.mark.slow
def test_refit_aware_cells_equal_the_direct_prune(setup, tmp_path):
    model, calib, spec = setup
    spec = EvalSpec(ppl_tokens=spec.ppl_tokens, seq_len=32)
    cells = expand_cells(["activation"], [0.5], compensations=["lstsq"], allocations=["fisher"], selections=["refit"])
    res = run_sweep(model, cells, tmp_path, calibration=calib, spec=spec, progress=False, log=lambda s: None, plots=False)
    direct = llmrank.prune(model, calib, sparsity=0.5, scorer="activation", representation="chained", compensation="lstsq",
                           allocation="fisher", selection="refit", progress=False)
    assert res.cells[0]["widths"] == [len(direct.kept[g.name]) for g in direct.ir.groups]
    assert res.rows[-1]["ppl"] == pytest.approx(evaluate_model(direct.model, spec)["perplexity"]["ppl"], rel=1e-6)
