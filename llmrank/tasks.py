"""Offline zero-shot multiple-choice tasks taken from BIG-bench.

No dataset hub is reachable, but PyPI holds the `bigbench==1.0.0` sdist (342 MB) with every
BIG-bench task as a JSON file. We fetch that sdist once (never install it: it pulls
tensorflow) and extract only the task.json files we use into `<cache>/bigbench/<task>/`.

Every task becomes a list of `MCItem(context, choices, label)`, scored by
`llmrank.evaluate.multiple_choice` as log p(choice | context). The prompt formats are
documented on the per-task builders below; choices carry their own leading space so that
the context never ends with whitespace (the lm-eval-harness convention, which keeps the
word boundary inside the scored continuation).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmrank.cache import atomic_file, cache_dir, log

__all__ = ["MCItem", "TASKS", "load_task", "task_path"]

_SDIST = "bigbench-1.0.0.tar.gz"
_SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
_SIMPLE_INDEX = "https://pypi.org/simple/bigbench/"
_MEMBER_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"


@dataclass
class MCItem:
    """One multiple-choice question: the model scores each `context + choice`."""

    context: str
    choices: list[str]
    label: int


# ---------------------------------------------------------------- fetching and extraction


class TaskDataUnavailable(RuntimeError):
    """The registry no longer serves the file the tasks are read from."""


def _download_sdist(target: Path) -> None:
    """Fetch the sdist through PyPI's JSON simple API and check its pinned sha256.

    `pip download` cannot be used: pip rejects the sdist after building its metadata because
    bigbench declares a `file://` URL dependency (bleurt), and then keeps nothing.
    """
    req = urllib.request.Request(_SIMPLE_INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        files = json.load(resp)["files"]
    entry = next((f for f in files if f["filename"] == _SDIST), None)
    if entry is None:
        listed = ", ".join(f["filename"] for f in files) or "nothing"
        raise TaskDataUnavailable(f"{_SDIST} is not listed on {_SIMPLE_INDEX} any more (it lists {listed}): the BIG-bench "
                                  f"tasks need that sdist; put a copy of it (sha256 {_SDIST_SHA256}) at {target}")
    log(f"downloading {_SDIST} (342 MB, once) ...")
    digest = hashlib.sha256()
    with urllib.request.urlopen(entry["url"], timeout=180) as resp, atomic_file(target, "wb") as out:
        while chunk := resp.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
        if digest.hexdigest() != _SDIST_SHA256:
            raise RuntimeError(f"sha256 mismatch for {_SDIST}: {digest.hexdigest()}")


def _sdist_path() -> Path:
    """The cached sdist, downloaded on first use."""
    path = cache_dir() / "wheels" / _SDIST
    if not path.exists():
        _download_sdist(path)
    return path


def task_path(name: str) -> Path:
    """`<cache>/bigbench/<name>/task.json`, extracted from the sdist on first use.

    All known tasks missing from the cache are extracted in one pass over the archive,
    since each pass decompresses the whole 342 MB.
    """
    path = cache_dir() / "bigbench" / name / "task.json"
    if path.exists():
        return path
    wanted = {f"{_MEMBER_ROOT}{t}/task.json": t for t in set(TASKS) | {name}
              if not (cache_dir() / "bigbench" / t / "task.json").exists()}
    log(f"extracting {sorted(wanted.values())} from {_SDIST} ...")
    with tarfile.open(_sdist_path(), "r:gz") as tar:
        for member in tar:
            task = wanted.pop(member.name, None)
            if task is None:
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            with atomic_file(cache_dir() / "bigbench" / task / "task.json", "wb") as out:
                out.write(data)
            if not wanted:
                break
    if not path.exists():
        raise KeyError(f"no BIG-bench task {name!r} in {_SDIST}")
    return path


def _examples(name: str) -> list[dict]:
    return json.loads(task_path(name).read_text(encoding="utf-8"))["examples"]


def _label(target_scores: dict[str, float]) -> int:
    """Index of the single best-scored choice (BIG-bench marks it with 1)."""
    scores = list(target_scores.values())
    return scores.index(max(scores))


# ---------------------------------------------------------------- per-task prompt formats

_HYPERBATON = re.compile(r'^Which sentence has the correct adjective order: a " (.+) " b " (.+) " \?$')


def _hyperbaton(examples: list[dict]) -> list[MCItem]:
    """Minimal pair: context "" and the two noun phrases, each with a leading space.

    The BIG-bench prompt ("Which sentence has the correct adjective order: a "..." b "..." ?")
    is too hard for a small model to answer by letter; comparing the full log-likelihood of
    the two phrases (each scored after a start token, see `evaluate.choice_logprobs`)
    measures the same knowledge. Both phrases hold the same words, so acc and acc_norm agree
    up to tokenisation. The leading space keeps word tokens in their mid-text form, like
    the other tasks' choices (SmolLM2-135M, 200 items: 65 % with it, 58 % without).
    Chance: 50 %. Example: choices [" obnoxious normal-size brand-new purple glass
    motorcycle", " glass normal-size brand-new obnoxious purple motorcycle"], label 0.
    """
    items = []
    for ex in examples:
        m = _HYPERBATON.match(ex["input"].strip())
        if m is None:
            raise ValueError(f"unexpected hyperbaton input: {ex['input']!r}")
        items.append(MCItem("", [" " + m.group(1), " " + m.group(2)], 0 if ex["target_scores"]["a"] else 1))
    return items


def _step_inference(examples: list[dict]) -> list[MCItem]:
    """Context "The most reasonable step of 'Goal' is", choices " Step" (4-way, chance 25 %).

    The BIG-bench input is used as is with its trailing space moved into the choices.
    """
    return [
        MCItem(ex["input"].rstrip(), [" " + c for c in ex["target_scores"]], _label(ex["target_scores"]))
        for ex in examples
    ]


def _social_iqa(examples: list[dict]) -> list[MCItem]:
    """Context "Q: <situation> <question>\\nA:", choices " <answer>" (3-way, chance 33 %).

    The BIG-bench input already joins situation and question; the Q:/A: frame follows
    BIG-bench's own zero-shot template. The reported metric for this task is acc_norm.
    """
    return [
        MCItem(f"Q: {ex['input'].strip()}\nA:", [" " + c for c in ex["target_scores"]],
               _label(ex["target_scores"]))
        for ex in examples
    ]


TASKS: dict[str, Callable[[list[dict]], list[MCItem]]] = {
    "hyperbaton": _hyperbaton,
    "goal_step_wikihow/step_inference": _step_inference,
    "social_iqa": _social_iqa,
}


def load_task(name: str, limit: int | None = None, seed: int = 0) -> list[MCItem]:
    """All items of a task, or a fixed random subset of `limit` items for a given `seed`.

    The subset keeps the file order, so a larger limit is not a superset of a smaller one,
    but the same (limit, seed) always gives the same items.
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    items = TASKS[name](_examples(name))
    if limit is not None and limit < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in keep]
    return items
