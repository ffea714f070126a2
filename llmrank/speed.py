"""Latency of dense vs slim deployed models: prefill and KV-cache decode.

A model is an ``.onnx`` file written by llmrank (onnxruntime) or an onnxruntime-genai folder.
CPU timings are noisy, so runs of the compared models are interleaved (dense, slim, dense,
slim, ...) and medians are reported, with the ratio next to the FLOP-proportional ideal.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llmrank.exporters.onnx import empty_past, feed_from_presents, has_past, ort_session


@dataclass(frozen=True)
class SpeedResult:
    name: str
    prefill_ms: dict[str, float]
    decode_tokens_per_s: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def _feed(session, ids: np.ndarray, past_len: int = 0, past: dict | None = None) -> dict:
    batch, seq = ids.shape
    names = {i.name for i in session.get_inputs()}
    feed = {"input_ids": ids}
    if "attention_mask" in names:
        feed["attention_mask"] = np.ones((batch, past_len + seq), dtype=np.int64)
    if "position_ids" in names:
        feed["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy()
    if has_past(session):
        feed.update(past if past is not None else empty_past(session, batch))
    return feed


def _prefill_once(session, ids: np.ndarray) -> float:
    feed = _feed(session, ids)
    start = time.perf_counter()
    session.run(["logits"], feed)
    return time.perf_counter() - start


def _decode_once(session, prompt: np.ndarray, steps: int) -> float:
    """Seconds for ``steps`` single-token decode steps after a prefill (prefill not timed)."""
    outputs = session.run(None, _feed(session, prompt))
    past_len = prompt.shape[1]
    token = prompt[:, -1:]
    start = time.perf_counter()
    for _ in range(steps):
        outputs = session.run(None, _feed(session, token, past_len, feed_from_presents(session, outputs)))
        token = outputs[0][:, -1:].argmax(-1).astype(np.int64)
        past_len += 1
    return time.perf_counter() - start


class _Ort:
    """An llmrank ONNX file in onnxruntime."""

    def __init__(self, path: Path, threads: int | None):
        self.session = ort_session(path, threads)

    def prefill(self, ids: np.ndarray) -> float:
        return _prefill_once(self.session, ids)

    def decode(self, prompt: np.ndarray, steps: int) -> float | None:
        return _decode_once(self.session, prompt, steps) if has_past(self.session) else None


class _Genai:
    """An onnxruntime-genai folder through its own Generator (its KV cache, its kernels)."""

    def __init__(self, path: Path, threads: int | None):
        from llmrank.exporters.genai import load_genai

        self.model = load_genai(path, threads=threads, device="cpu")

    def _generator(self, max_length: int):
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return og.Generator(self.model, params)

    def prefill(self, ids: np.ndarray) -> float:
        generator = self._generator(int(ids.shape[1]))
        start = time.perf_counter()
        generator.append_tokens(ids.astype(np.int32))
        generator.get_output("logits")
        return time.perf_counter() - start

    def decode(self, prompt: np.ndarray, steps: int) -> float:
        generator = self._generator(int(prompt.shape[1]) + steps + 1)
        generator.append_tokens(prompt.astype(np.int32))
        start = time.perf_counter()
        for _ in range(steps):
            generator.generate_next_token()
        return time.perf_counter() - start


def _runner(path: Path, threads: int | None) -> _Ort | _Genai:
    return _Genai(path, threads) if (Path(path) / "genai_config.json").is_file() else _Ort(path, threads)


def compare(
    models: dict[str, Path],
    *,
    prefill_shapes: Sequence[tuple[int, int]] = ((1, 128),),
    decode_steps: int = 32,
    repeats: int = 5,
    vocab: int = 1000,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, SpeedResult]:
    """Median prefill latency per shape and decode tokens/s, interleaved across ``models``
    (``.onnx`` files or onnxruntime-genai folders; ``threads``: intra-op threads, default all cores)."""
    sessions = {name: _runner(path, threads) for name, path in models.items()}
    rng = np.random.default_rng(seed)
    prefill: dict[str, dict[str, list[float]]] = {n: {} for n in sessions}
    decode: dict[str, list[float]] = {n: [] for n in sessions}
    for batch, seq in prefill_shapes:
        ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
        for s in sessions.values():
            s.prefill(ids)  # warm-up
        for _ in range(repeats):
            for name, s in sessions.items():
                prefill[name].setdefault(f"{batch}x{seq}", []).append(s.prefill(ids))
    prompt = rng.integers(0, vocab, size=(1, 16), dtype=np.int64)
    if decode_steps:
        for s in sessions.values():
            s.decode(prompt, 4)  # warm-up
    for _ in range(repeats if decode_steps else 0):
        for name, s in sessions.items():
            seconds = s.decode(prompt, decode_steps)
            if seconds is not None:
                decode[name].append(decode_steps / seconds)
    return {
        name: SpeedResult(
            name,
            {shape: 1000 * statistics.median(times) for shape, times in prefill[name].items()},
            statistics.median(decode[name]) if decode[name] else None,
        )
        for name in sessions
    }
