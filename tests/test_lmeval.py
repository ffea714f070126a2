"""lm-eval adapter: each request kind against a hand computation on a bigram model."""

from __future__ import annotations

import pytest
import torch

from test_evaluate import V, Bigram, CharTokenizer, _logsoftmax

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from llmrank.lmeval import lm_eval_model  # noqa: E402


class DecodingCharTokenizer(CharTokenizer):
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i - 1) for i in ids if not (skip_special_tokens and i == 0))


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _table(seed: int) -> tuple[torch.Tensor, list[list[float]]]:
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed))
    return table, table.tolist()


def test_loglikelihood_sums_and_greedy_flag():
    table, T = _table(3)
    lm = lm_eval_model(Bigram(table), CharTokenizer(), max_length=8)
    a, b, c = 1, 2, 3
    out = lm.loglikelihood([_req("loglikelihood", "ab", "c"), _req("loglikelihood", "", "ba")])
    assert out[0][0] == pytest.approx(_logsoftmax(T[b], c), rel=1e-5)
    assert out[1][0] == pytest.approx(_logsoftmax(T[0], b) + _logsoftmax(T[b], a), rel=1e-5)
    best = lambda prev: max(range(V), key=lambda k: T[prev][k])  # noqa: E731
    assert out[0][1] == (best(b) == c)
    assert out[1][1] == (best(0) == b and best(b) == a)


def test_loglikelihood_rolling_scores_every_token_once_across_windows():
    table, T = _table(4)
    lm = lm_eval_model(Bigram(table), CharTokenizer(), max_length=3)  # windows of 3 overlap by 1
    text = "abcfed"
    ids = [ord(ch) - ord("a") + 1 for ch in text]
    want = sum(_logsoftmax(T[prev], nxt) for prev, nxt in zip([0, *ids[:-1]], ids))  # a bigram sees one token back
    assert lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])[0] == pytest.approx(want, rel=1e-5)


def test_generate_until_is_greedy_and_stops():
    table = torch.full((V, V), -5.0)
    chain = {1: 2, 2: 3, 3: 4, 4: 5, 5: 6, 6: 1}  # a->b->c->d->e->f->a
    for prev, nxt in chain.items():
        table[prev, nxt] = 5.0
    lm = lm_eval_model(Bigram(table), DecodingCharTokenizer(), max_length=8)
    out = lm.generate_until([_req("generate_until", "a", {"until": ["e"], "max_gen_toks": 10}),
                             _req("generate_until", "c", {"until": [], "max_gen_toks": 3})])
    assert out == ["bcd", "def"]
