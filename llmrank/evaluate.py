"""Perplexity and zero-shot multiple-choice accuracy for any "input_ids -> logits" callable.

Everything is measured through a `LogitsFn`, so a dense HF model, a pruned torch.export
module, an exported ONNX file and an onnxruntime-genai folder (llmrank.exporters.genai) are
evaluated by the same code and are comparable.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmrank.tasks import MCItem, load_task

__all__ = [
    "LogitsFn", "torch_logits_fn", "onnx_logits_fn",
    "PerplexityResult", "perplexity", "MCResult", "continuation_logprobs", "choice_logprobs", "multiple_choice",
    "evaluate",
]


class LogitsFn(Protocol):
    """input_ids LongTensor[B, T] -> logits FloatTensor[B, T, V] (causal, no padding mask)."""

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor: ...


def torch_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Wrap an HF causal LM (or any module returning logits) without grad or KV cache."""
    try:
        takes_cache = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_cache = False
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    def fn(input_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            ids = input_ids.to(device)
            out = model(input_ids=ids, use_cache=False) if takes_cache else model(ids)
            if hasattr(out, "logits"):
                out = out.logits
            elif isinstance(out, (tuple, list)):
                out = out[0]
            return out.float().cpu()

    return fn


def onnx_logits_fn(path: str | Path, providers: Sequence[str] | None = None,
                   threads: int | None = None) -> LogitsFn:
    """Wrap an ONNX causal LM: input `input_ids`, output `logits`.

    An `attention_mask` input gets ones and a `position_ids` input gets 0..T-1, which is
    what an unpadded causal batch means. A KV-cache graph (`past_key_values.*` inputs, as
    written by `export_onnx(with_past=True)`) is fed empty pasts (length 0), i.e. one
    prefill; any other input is an error.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))
    inputs = [i.name for i in sess.get_inputs()]
    pasts = [(i.name, i.shape, i.type) for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    extra = set(inputs) - {"input_ids", "attention_mask", "position_ids"} - {name for name, _, _ in pasts}
    if "input_ids" not in inputs or extra:
        raise ValueError(f"{path}: expected inputs input_ids[, attention_mask, position_ids, past_key_values.*], got {inputs}")
    outputs = [o.name for o in sess.get_outputs()]
    out_name = "logits" if "logits" in outputs else outputs[0]

    def fn(input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.cpu().numpy().astype(np.int64)
        feed = {"input_ids": ids}
        if "attention_mask" in inputs:
            feed["attention_mask"] = np.ones_like(ids)
        if "position_ids" in inputs:
            feed["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        for name, shape, typ in pasts:  # [batch, kv_heads, past=0, head_dim]
            feed[name] = np.zeros((ids.shape[0], shape[1], 0, shape[3]), dtype=np.float16 if typ == "tensor(float16)" else np.float32)
        (logits,) = sess.run([out_name], feed)
        return torch.from_numpy(logits).float()

    return fn


def as_logits_fn(model: Any) -> LogitsFn:
    if isinstance(model, (str, Path)) and (Path(model) / "genai_config.json").is_file():
        from llmrank.exporters.genai import genai_logits_fn  # optional extra: imported only for genai folders

        return genai_logits_fn(model)
    if isinstance(model, (str, Path)):
        return onnx_logits_fn(model)
    if isinstance(model, torch.nn.Module):
        return torch_logits_fn(model)
    if callable(model):
        return model
    raise TypeError(f"cannot evaluate {type(model).__name__}: need a module, an ONNX path, an onnxruntime-genai folder or a LogitsFn")


# ---------------------------------------------------------------- perplexity


@dataclass
class PerplexityResult:
    """ppl = exp(nll); nll is the mean per-token negative log-likelihood in nats."""

    ppl: float
    nll: float
    n_tokens: int
    seq_len: int
    stride: int


def _windows(n: int, seq_len: int, stride: int, bos: bool = False) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window; token t is predicted from the logits at t-1.

    bos: every window is fed behind a BOS token, which gives its first token a context,
    so that token is scored too (the windows then cover every token exactly once).

    stride == seq_len: non-overlapping windows, the first token of each window has no
    context and is not scored, so every window scores len-1 tokens.
    stride < seq_len: windows start every `stride` tokens and score only the tokens that the
    previous window did not, each seen with at least seq_len - stride tokens of context
    (the HF "perplexity of fixed-length models" guide); all tokens but the first are scored.
    """
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)
        first = max(prev_end, begin if bos else begin + 1)
        if end > first:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


def perplexity(logits_fn: LogitsFn | torch.nn.Module, token_ids: torch.Tensor, seq_len: int = 512,
               stride: int | None = None, max_tokens: int | None = None, batch_size: int = 1,
               progress: bool = True, bos_token_id: int | None = None) -> PerplexityResult:
    """Perplexity of a token stream (LongTensor[1, T] or [T]) under the windowing above.

    bos_token_id: put this token in front of every window (seq_len - 1 text tokens + BOS =
    seq_len), for models trained that way (Gemma: see data.bos_token_id); without it a
    Gemma-3 window scores more than twice the perplexity.

    Windows of equal length are batched (`batch_size` windows per call; one window of 512
    tokens already makes large matmuls, and its logits are T x V floats); a short last
    window runs on its own.
    """
    fn = as_logits_fn(logits_fn)
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise ValueError(f"need 0 < stride <= seq_len, got stride={stride}, seq_len={seq_len}")
    ids = token_ids.reshape(-1).long()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    bos = bos_token_id is not None
    text_len = seq_len - 1 if bos else seq_len
    if text_len < 1:
        raise ValueError(f"seq_len must be >= 2 when a BOS token is added, got {seq_len}")
    wins = _windows(len(ids), text_len, min(stride, text_len), bos=bos)
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in wins:
        groups.setdefault(w[1] - w[0], []).append(w)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]

    total, count = 0.0, 0
    for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        rows = torch.stack([ids[b:e] for b, e, _ in batch])
        if bos:
            rows = torch.cat([torch.full((len(batch), 1), int(bos_token_id), dtype=torch.long), rows], dim=1)
        logits = fn(rows)
        shift = 0 if bos else 1  # logits row of the token before `first` (BOS sits at 0)
        for row, (b, e, first) in enumerate(batch):
            tgt = ids[first:e]
            logp = torch.log_softmax(logits[row, first - b - shift:e - b - shift].float(), dim=-1)
            total -= logp[torch.arange(len(tgt)), tgt].double().sum().item()
            count += len(tgt)
    nll = total / max(count, 1)
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=count, seq_len=seq_len, stride=stride)


# ---------------------------------------------------------------- multiple choice


@dataclass
class MCResult:
    """acc: argmax of summed logprob; acc_norm: argmax of logprob per character of choice."""

    acc: float
    acc_norm: float
    n: int


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts before text (e.g. Gemma's BOS), found by encoding a probe."""
    full = list(tokenizer("a")["input_ids"])
    bare = encode(tokenizer, "a")
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i]
    return []


def start_token(tokenizer: Any, prefix_token_id: int | None) -> int:
    """Token put before an empty context: the override, else BOS, else EOS (lm-eval's rule)."""
    for tok_id in (prefix_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    raise ValueError("tokenizer has neither BOS nor EOS: pass prefix_token_id")


def _request(tokenizer: Any, prefix: list[int], start: int, context: str, choice: str,
             max_length: int) -> tuple[list[int], int]:
    """(token ids, number of continuation tokens at the tail) for one context + choice.

    The continuation is what `context + choice` adds beyond its common prefix with
    `context` alone, so a merge across the boundary is scored as part of the choice. An
    empty prefix gets the `start` token so the first choice token is scored too.
    """
    ctx = prefix + encode(tokenizer, context)
    whole = prefix + encode(tokenizer, context + choice)
    common = 0
    while common < min(len(ctx), len(whole)) and ctx[common] == whole[common]:
        common += 1
    common = min(common, len(whole) - 1)  # at least one continuation token
    if common == 0:
        whole, common = [start] + whole, 1
    n_cont = len(whole) - common
    if n_cont >= max_length:
        raise ValueError(f"choice of {n_cont} tokens does not fit max_length={max_length}")
    return whole[-max_length:], n_cont  # truncate the context from the left


def continuation_logprobs(logits_fn: LogitsFn | torch.nn.Module, tokenizer: Any,
                          pairs: Sequence[tuple[str, str]], batch_size: int = 16, max_length: int = 1024,
                          progress: bool = True, prefix_token_id: int | None = None) -> list[tuple[float, bool]]:
    """(log p(continuation | context) summed over its tokens, whether greedy decoding would
    produce exactly it) for every (context, continuation) pair: lm-eval's `loglikelihood`.

    When the tokenizer adds no special prefix and the context is empty (hyperbaton), the
    text starts after `prefix_token_id` (default BOS, else EOS). This choice matters: for
    SmolLM2-Instruct, whose BOS is the chat token <|im_start|>, the pretraining document
    separator <|endoftext|> (id 0) scores hyperbaton far higher.

    Requests are sorted by length and right-padded; padding sits after the scored tokens of
    a causal model, so it never changes their logits and no attention mask is needed.
    """
    fn = as_logits_fn(logits_fn)
    prefix = special_prefix(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    start = start_token(tokenizer, prefix_token_id)
    reqs = [_request(tokenizer, prefix, start, context, cont, max_length) for context, cont in pairs]
    order = sorted(range(len(reqs)), key=lambda r: -len(reqs[r][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(reqs)

    for s in tqdm(range(0, len(order), batch_size), desc="loglikelihood", disable=not progress, leave=False):
        rows = order[s:s + batch_size]
        width = max(len(reqs[r][0]) for r in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        for row, r in enumerate(rows):
            x[row, :len(reqs[r][0])] = torch.tensor(reqs[r][0])
        logits = fn(x)
        for row, r in enumerate(rows):
            ids, n_cont = reqs[r]
            t = len(ids)
            logp = torch.log_softmax(logits[row, t - n_cont - 1:t - 1].float(), dim=-1)
            tgt = torch.tensor(ids[t - n_cont:])
            greedy = bool((logp.argmax(-1) == tgt).all())
            out[r] = (logp[torch.arange(n_cont), tgt].double().sum().item(), greedy)
    return out


def choice_logprobs(logits_fn: LogitsFn | torch.nn.Module, tokenizer: Any, items: Sequence[MCItem],
                    batch_size: int = 16, max_length: int = 1024, progress: bool = True,
                    prefix_token_id: int | None = None) -> list[list[float]]:
    """log p(choice | context), summed over the choice's tokens, for every choice of every item
    (see continuation_logprobs for the start token and batching)."""
    pairs = [(it.context, ch) for it in items for ch in it.choices]
    flat = iter(continuation_logprobs(logits_fn, tokenizer, pairs, batch_size, max_length, progress, prefix_token_id))
    return [[next(flat)[0] for _ in it.choices] for it in items]


def multiple_choice(logits_fn: LogitsFn | torch.nn.Module, tokenizer: Any, items: Sequence[MCItem],
                    batch_size: int = 16, max_length: int = 1024, progress: bool = True,
                    prefix_token_id: int | None = None) -> MCResult:
    """Zero-shot accuracy (acc and per-character acc_norm, as in lm-eval-harness)."""
    scores = choice_logprobs(logits_fn, tokenizer, items, batch_size, max_length, progress, prefix_token_id)
    hits = hits_norm = 0
    for it, sc in zip(items, scores):
        hits += int(np.argmax(sc)) == it.label
        norm = [v / max(len(c), 1) for v, c in zip(sc, it.choices)]
        hits_norm += int(np.argmax(norm)) == it.label
    n = len(items)
    return MCResult(acc=hits / max(n, 1), acc_norm=hits_norm / max(n, 1), n=n)


# ---------------------------------------------------------------- convenience


def evaluate(model_or_logits_fn: Any, tokenizer: Any, *, ppl_tokens: torch.Tensor | None = None,
             tasks: Sequence[str] = (), limit: int | None = None, seed: int = 0, seq_len: int = 512,
             stride: int | None = None, batch_size: int = 16, ppl_batch_size: int = 1,
             prefix_token_id: int | None = None, progress: bool = True,
             bos_token_id: int | None = None) -> dict[str, Any]:
    """Perplexity (if tokens are given) and each task's accuracy, as a JSON-able dict."""
    fn = as_logits_fn(model_or_logits_fn)
    out: dict[str, Any] = {}
    if ppl_tokens is not None:
        t0 = time.perf_counter()
        res = perplexity(fn, ppl_tokens, seq_len=seq_len, stride=stride,
                         batch_size=ppl_batch_size, progress=progress, bos_token_id=bos_token_id)
        out["perplexity"] = {**asdict(res), "seconds": round(time.perf_counter() - t0, 2)}
    if tasks:
        out["tasks"] = {}
    for name in tasks:
        t0 = time.perf_counter()
        res = multiple_choice(fn, tokenizer, load_task(name, limit=limit, seed=seed),
                              batch_size=batch_size, progress=progress, prefix_token_id=prefix_token_id)
        out["tasks"][name] = {**asdict(res), "seconds": round(time.perf_counter() - t0, 2)}
    return out
