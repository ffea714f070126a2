"""lm-evaluation-harness adapter: score any llmrank evaluation target with lm-eval's tasks.

lm-eval's own HF wrapper can only load PyTorch checkpoints; this adapter also runs a slim
ONNX file through onnxruntime, so the deployed artefact is what gets scored. It needs the
optional `lm_eval` package (`pip install llmrank[lmeval]`) and whatever data the chosen
tasks download (a dataset hub, or a local `HF_DATASETS_CACHE`).

    from llmrank.lmeval import lm_eval_model
    import lm_eval
    lm = lm_eval_model("slim/onnx/model.onnx", tokenizer="slim/hf")
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"], limit=100)

All three request kinds reuse llmrank.evaluate, so lm-eval and `llmrank eval` agree:
`loglikelihood` is continuation_logprobs; `loglikelihood_rolling` scores a whole text in
windows of ``max_length`` tokens that overlap by one token (every token is scored exactly
once, the first one after the start token); `generate_until` is greedy decoding without a
KV cache (correct everywhere, slow for long outputs).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from llmrank.evaluate import LogitsFn, as_logits_fn, encode, special_prefix, start_token, continuation_logprobs

__all__ = ["lm_eval_model", "rolling_logprob", "greedy_until"]


def rolling_logprob(fn: LogitsFn, token_ids: Sequence[int], start: int, max_length: int) -> float:
    """Sum of log p(token_t | start, tokens_<t) over every token, in windows of ``max_length``."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    ids = [int(start), *token_ids]
    total = 0.0
    begin = 0
    while begin < len(ids) - 1:
        window = ids[begin:begin + max_length]
        logp = torch.log_softmax(fn(torch.tensor([window]))[0, :-1].float(), dim=-1)
        tgt = torch.tensor(window[1:])
        total += logp[torch.arange(len(tgt)), tgt].double().sum().item()
        begin += max_length - 1  # the last token of a window is the first context of the next
    return total


def greedy_until(fn: LogitsFn, tokenizer: Any, context: str, until: Sequence[str], max_new_tokens: int,
                 max_length: int) -> str:
    """Greedy continuation of ``context``, cut at the first stop string (not included)."""
    ids = special_prefix(tokenizer) + encode(tokenizer, context)
    new: list[int] = []
    eos = tokenizer.eos_token_id
    for _ in range(max_new_tokens):
        window = (ids + new)[-max_length:]
        nxt = int(fn(torch.tensor([window]))[0, -1].argmax())
        if nxt == eos:
            break
        new.append(nxt)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if any(stop and stop in text for stop in until):
            break
    text = tokenizer.decode(new, skip_special_tokens=True)
    cuts = [text.index(stop) for stop in until if stop and stop in text]
    return text[:min(cuts)] if cuts else text


def lm_eval_model(model: Any, tokenizer: Any = None, *, batch_size: int = 16, max_length: int = 1024,
                  max_gen_toks: int = 256, prefix_token_id: int | None = None, threads: int | None = None):
    """An `lm_eval.api.model.LM` for a built-in name, HF folder, .onnx file, nn.Module or
    logits function (the last two need ``tokenizer``)."""
    try:
        from lm_eval.api.model import LM
    except ImportError as exc:
        raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install 'llmrank[lmeval]'") from exc

    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        from llmrank.targets import load_eval_target

        fn, loaded_tok, _ = load_eval_target(str(model), tokenizer if isinstance(tokenizer, str) else None,
                                             onnx=None, threads=threads)
        tokenizer = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else loaded_tok
    else:
        fn = as_logits_fn(model)
    if tokenizer is None:
        raise ValueError("lm_eval_model needs a tokenizer for a module or logits function")

    class LLMRankLM(LM):
        """lm-eval requests answered through llmrank.evaluate."""

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            pairs = [tuple(r.args[:2]) for r in requests]
            return continuation_logprobs(fn, tokenizer, pairs, batch_size, max_length, progress=False,
                                         prefix_token_id=prefix_token_id)

        def loglikelihood_rolling(self, requests) -> list[float]:
            # The text is conditioned on the tokenizer's own prefix (Gemma: BOS), else on the
            # start token that an empty multiple-choice context gets.
            prefix = special_prefix(tokenizer)
            start = prefix[-1] if prefix else start_token(tokenizer, prefix_token_id)
            return [rolling_logprob(fn, encode(tokenizer, r.args[0]), start, max_length) for r in requests]

        def generate_until(self, requests) -> list[str]:
            out = []
            for r in requests:
                context, kwargs = r.args[0], (r.args[1] if len(r.args) > 1 else {}) or {}
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                out.append(greedy_until(fn, tokenizer, context, until, int(kwargs.get("max_gen_toks", max_gen_toks)),
                                        max_length))
            return out

    return LLMRankLM()
