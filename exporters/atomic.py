"""Atomic writes for exported artefacts.

A crashed or failed export must never leave a half-written model under its final
name, where a later run (or a user) would take it for a good one. Everything is
written to a hidden temporary sibling in the same folder, so the final step is a
rename on one file system, and only a complete result is moved into place.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_files", "refuse_input_overlap", "check_writable"]


def check_writable(final: Path | str, force: bool) -> Path:
    """Refuse early (before any expensive work) to replace an existing output."""
    final = Path(final)
    if final.exists() and not force:
        raise FileExistsError(
            f"{final} already exists; pass --force / force=True to overwrite it"
        )
    return final


def _temp_sibling(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"


def _remove(path: Path) -> None:
    """Remove a file or a directory tree; missing is fine (cleanup must not mask the real error)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename tmp onto final. A directory cannot be renamed over a non-empty one, so an
    existing directory is first renamed aside and deleted only after the swap succeeded."""
    if final.is_dir() and not final.is_symlink():
        old = _temp_sibling(final)
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        _remove(old)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_path(final: Path | str, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `final`; move it onto `final` only if the block succeeds.

    The caller creates the file or directory at the yielded path. On an exception
    the temporary is removed and `final` is left exactly as it was.
    """
    final = check_writable(final, force)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to the temporary path for {final}")
        check_writable(final, force)  # someone may have created it meanwhile
        _move_into_place(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_files(finals: Sequence[Path | str], force: bool = False) -> Iterator[Path]:
    """Write several sibling files (e.g. `model.onnx` + `model.onnx.data`) as one unit.

    Yields a staging directory next to the files; the caller writes each file there
    under its final base name. On success the files are moved in the given order, so
    put the file that marks completeness (the `.onnx`) last; siblings that were not
    written are deleted at the final location (a stale `.onnx.data` from an older
    export must not sit beside a new `.onnx`). On failure nothing is moved.
    """
    finals = [Path(f) for f in finals]
    parents = {f.parent.resolve() for f in finals}
    if len(parents) != 1:
        raise ValueError(f"atomic_files needs files in one folder, got {sorted(map(str, parents))}")
    for f in finals:
        check_writable(f, force)
    folder = finals[0].parent
    folder.mkdir(parents=True, exist_ok=True)
    staging = _temp_sibling(finals[-1])
    staging.mkdir()
    try:
        yield staging
        primary = staging / finals[-1].name
        if not primary.exists():
            raise RuntimeError(f"nothing was written for {finals[-1]}")
        for f in finals:
            check_writable(f, force)
        for f in finals:
            written = staging / f.name
            if written.exists():
                os.replace(written, f)
            elif f.exists():
                _remove(f)
    finally:
        _remove(staging)


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def refuse_input_overlap(out_dir: Path | str, input_dir: Path | str | None) -> None:
    """Refuse to write a model into (or over) the folder it was loaded from.

    Writing inside the input folder would mix files of two models; replacing a folder
    that contains the input (with force) would delete the model being read.
    `input_dir` that is None or not a local folder (a hub id) is fine.
    """
    if input_dir is None or str(input_dir) == "":
        return
    inp = Path(input_dir)
    if not inp.is_dir():
        return
    out = Path(out_dir).resolve()
    inp = inp.resolve()
    if _is_within(out, inp):
        raise ValueError(
            f"output {out} is the model's input folder {inp} or inside it; choose another output folder"
        )
    if _is_within(inp, out):
        raise ValueError(
            f"output {out} contains the model's input folder {inp}; overwriting it would delete the input"
        )
