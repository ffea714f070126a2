"""Running a GGUF file in llama.cpp itself (through llama-cpp-python), so that what is measured
is what ships: its kernels, its KV cache, its tokenizer.

llama-cpp-python compiles llama.cpp when it is installed (``pip install 'llmrank[gguf]'``), so
it stays optional: every entry point here names the extra when it is missing. One model load
serves many calls; each logits call starts from an empty KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch

from llmrank.ir.errors import ConfigError, InputError

__all__ = ["INSTALL_HINT", "llama_cpp_available", "load_llama", "llama_logits", "gguf_logits_fn", "generate_gguf",
           "tokenize"]

INSTALL_HINT = "pip install 'llmrank[gguf]'  (llama-cpp-python; it compiles llama.cpp, which takes a while)"


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def load_llama(path: str | Path, *, n_ctx: int = 2048, threads: int | None = None) -> Any:
    """A ``llama_cpp.Llama`` on ``path`` that keeps every position's logits (for perplexity)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"GGUF file {path} does not exist")
    if not llama_cpp_available():
        error = ConfigError(f"running {path.name} in llama.cpp needs llama-cpp-python: {INSTALL_HINT}")
        error.hint = INSTALL_HINT
        raise error
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True,
                           n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)


def llama_logits(llm: Any, ids: Sequence[int]) -> torch.Tensor:
    """float32 logits [T, V] of one sequence, from an empty cache (teacher forcing)."""
    ids = [int(t) for t in ids]
    if len(ids) > llm.n_ctx():
        raise ValueError(f"{len(ids)} tokens do not fit llama.cpp's context of {llm.n_ctx()}")
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(llm.scores[: len(ids)].copy()).float()


def gguf_logits_fn(path: str | Path, *, n_ctx: int = 2048, threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """An llmrank.evaluate LogitsFn (ids [B, T] -> logits [B, T, V]) run by llama.cpp, one row at a time."""
    llm = load_llama(path, n_ctx=n_ctx, threads=threads)

    def fn(input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"expected token ids [batch, seq>0], got shape {tuple(input_ids.shape)}")
        return torch.stack([llama_logits(llm, row.tolist()) for row in input_ids])

    return fn


def generate_gguf(path: str | Path, prompt_ids: Sequence[int], max_new_tokens: int = 32, *,
                  threads: int | None = None, llm: Any | None = None) -> list[int]:
    """Greedy decoding in llama.cpp with its KV cache; the new token ids (prompt excluded).

    The argmax is taken here, not by llama.cpp's sampler chain, so the result does not depend on
    its sampling defaults; generation stops at the model's end-of-sequence token."""
    llm = llm or load_llama(path, n_ctx=len(prompt_ids) + max_new_tokens + 1, threads=threads)
    llm.reset()
    llm.eval([int(t) for t in prompt_ids])
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        new.append(token)
        if token == llm.token_eos():
            break
        llm.eval([token])
    return new


def tokenize(llm: Any, text: str) -> list[int]:
    """llama.cpp's own token ids for ``text`` (no BOS added): for the tokenizer round trip."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
