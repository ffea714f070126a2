"""Evaluation checked against hand computations on tiny hand-made models."""

from __future__ import annotations

import math

import pytest
import torch

from llmrank.evaluate import (
    choice_logprobs, multiple_choice, onnx_logits_fn, perplexity, torch_logits_fn,
)
from llmrank.tasks import MCItem

V = 7


class PosBigram(torch.nn.Module):
    """logits[t] = W[ids[t]] + P[t]: depends on the previous token and on the window position,
    so a wrong windowing (which tokens, with which in-window position) changes the result."""

    def __init__(self, seed: int = 0, max_len: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(V, V, generator=g))
        self.P = torch.nn.Parameter(torch.randn(max_len, V, generator=g))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.W[input_ids] + self.P[: input_ids.shape[1]]


def _logsoftmax(row: list[float], k: int) -> float:
    m = max(row)
    return row[k] - (m + math.log(sum(math.exp(v - m) for v in row)))


def _hand_ppl(model: PosBigram, ids: list[int], windows: list[tuple[int, int, int]]) -> tuple[float, int]:
    """Per window (begin, end, first scored token): token t scored from the logits at t-1,
    whose in-window position is t-1-begin."""
    W, P = model.W.tolist(), model.P.tolist()
    nll, n = 0.0, 0
    for begin, end, first in windows:
        for t in range(first, end):
            row = [W[ids[t - 1]][v] + P[t - 1 - begin][v] for v in range(V)]
            nll -= _logsoftmax(row, ids[t])
            n += 1
    return math.exp(nll / n), n


IDS = [3, 1, 4, 1, 5, 2, 6, 5, 3, 5]  # T = 10


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_non_overlapping(batch_size):
    model = PosBigram()
    # seq_len 4: windows [0,4) [4,8) [8,10); the first token of each window is not scored
    expect, n = _hand_ppl(model, IDS, [(0, 4, 1), (4, 8, 5), (8, 10, 9)])
    res = perplexity(torch_logits_fn(model), torch.tensor([IDS]), seq_len=4, stride=4,
                     batch_size=batch_size, progress=False)
    assert res.n_tokens == n == 7
    assert res.ppl == pytest.approx(expect, rel=1e-5)
    assert res.nll == pytest.approx(math.log(expect), rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_perplexity_sliding(batch_size):
    model = PosBigram()
    # seq_len 4, stride 2: windows start at 0,2,4,6; each scores only tokens not scored before
    expect, n = _hand_ppl(model, IDS, [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)])
    res = perplexity(model, torch.tensor([IDS]), seq_len=4, stride=2, batch_size=batch_size, progress=False)
    assert res.n_tokens == n == len(IDS) - 1
    assert res.ppl == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_perplexity_with_bos(batch_size):
    model = PosBigram()
    bos = 0
    # seq_len 4 with BOS: 3 text tokens per window behind BOS, every token scored once; the
    # first token of a window is predicted from BOS at position 0.
    W, P = model.W.tolist(), model.P.tolist()
    nll, n = 0.0, 0
    for begin in range(0, len(IDS), 3):
        window = [bos] + IDS[begin:begin + 3]
        for pos in range(1, len(window)):
            nll -= _logsoftmax([W[window[pos - 1]][v] + P[pos - 1][v] for v in range(V)], window[pos])
            n += 1
    res = perplexity(model, torch.tensor([IDS]), seq_len=4, batch_size=batch_size, progress=False, bos_token_id=bos)
    assert res.n_tokens == n == len(IDS)
    assert res.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_perplexity_max_tokens_and_short_tail():
    model = PosBigram()
    # 7 tokens, seq_len 3: windows [0,3) [3,6) [6,7); the last window has nothing to score
    expect, n = _hand_ppl(model, IDS[:7], [(0, 3, 1), (3, 6, 4)])
    res = perplexity(model, torch.tensor(IDS), seq_len=3, max_tokens=7, progress=False)
    assert res.n_tokens == n == 4
    assert res.ppl == pytest.approx(expect, rel=1e-5)


class CharTokenizer:
    """One token per character 'a'..'f' (ids 1..6); id 0 is BOS. No special tokens added."""

    bos_token_id = 0
    eos_token_id = 0
    pad_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) - ord("a") + 1 for c in text]}


class Bigram(torch.nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]


def test_choice_logprobs_match_hand_sums():
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(1))
    T = table.tolist()
    lp = lambda prev, nxt: _logsoftmax(T[prev], nxt)  # noqa: E731
    a, b, c, d = 1, 2, 3, 4
    items = [
        MCItem("ab", ["ba", "c"], 0),        # continuation scored after the context's last token
        MCItem("", ["cd", "d"], 1),          # empty context: first token scored after BOS
        MCItem("abcabc", ["d"], 0),          # truncated from the left to max_length
    ]
    got = choice_logprobs(Bigram(table), CharTokenizer(), items, batch_size=2, max_length=4, progress=False)
    want = [
        [lp(b, b) + lp(b, a), lp(b, c)],
        [lp(0, c) + lp(c, d), lp(0, d)],
        [lp(c, d)],
    ]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-5)


def test_empty_context_prefix_token_override():
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(2))
    T = table.tolist()
    got = choice_logprobs(Bigram(table), CharTokenizer(), [MCItem("", ["cd"], 0)],
                          prefix_token_id=6, progress=False)
    assert got[0][0] == pytest.approx(_logsoftmax(T[6], 3) + _logsoftmax(T[3], 4), rel=1e-5)


def test_acc_and_acc_norm_disagree():
    # Context-free model: p(a) = 0.3, p(b) = 0.6, rest share 0.1.
    probs = torch.tensor([0.02, 0.3, 0.6, 0.02, 0.02, 0.02, 0.02])
    table = probs.log().expand(V, V).clone()
    # "a": log 0.3 = -1.20 beats "bbb": 3 log 0.6 = -1.53 on the sum,
    # but per character "bbb" (-0.51) beats "a" (-1.20).
    items = [MCItem("c", ["a", "bbb"], 0), MCItem("c", ["bbb", "a"], 1), MCItem("c", ["a", "bbb"], 1)]
    res = multiple_choice(Bigram(table), CharTokenizer(), items, progress=False)
    assert res.n == 3
    assert res.acc == pytest.approx(2 / 3)      # items 0 and 1 right by the sum
    assert res.acc_norm == pytest.approx(1 / 3)  # only item 2 right per character


def test_torch_logits_fn_on_hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(torch_logits_fn(model)(ids), ref)


class EmbedLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(V, 8)
        self.out = torch.nn.Linear(8, V)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(input_ids)))


@pytest.mark.onnx
def test_onnx_adapter_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = EmbedLinear().eval()
    path = tmp_path / "tiny.onnx"
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    torch.onnx.export(model, (torch.tensor([IDS[:4], IDS[4:8]]),), str(path), dynamo=True,
                      input_names=["input_ids"], output_names=["logits"],
                      dynamic_shapes={"input_ids": {0: batch, 1: seq}})
    ids = torch.tensor([IDS * 3])
    for stride in (4, 2):
        want = perplexity(model, ids, seq_len=4, stride=stride, batch_size=3, progress=False)
        got = perplexity(onnx_logits_fn(path), ids, seq_len=4, stride=stride, batch_size=3, progress=False)
        assert got.n_tokens == want.n_tokens
        assert got.ppl == pytest.approx(want.ppl, rel=1e-5)


@pytest.mark.slow
def test_bigbench_tasks_load():
    from llmrank.tasks import TASKS, TaskDataUnavailable, load_task

    try:
        load_task(TASKS[0] if isinstance(TASKS, (list, tuple)) else next(iter(TASKS)), limit=1)
    except TaskDataUnavailable as gone:  # PyPI dropped bigbench 1.0.0 (2026-12): nothing this project can fetch
        pytest.skip(str(gone))
    for name in TASKS:
        items = load_task(name)
        assert len(items) > 0, name
        for it in items:
            assert len(it.choices) >= 2 and 0 <= it.label < len(it.choices)
            assert all(c.strip() for c in it.choices)
        sub = load_task(name, limit=50, seed=3)
        assert len(sub) == 50
        assert sub == load_task(name, limit=50, seed=3)
        assert sub != load_task(name, limit=50, seed=4)
        assert all(it in items for it in sub[:5])
    hyp = load_task("hyperbaton", limit=1000)
    assert all(len(it.choices) == 2 and sorted(it.choices[0].split()) == sorted(it.choices[1].split())
               for it in hyp)
