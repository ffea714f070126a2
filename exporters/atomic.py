"""Atomic writes for exported artefacts.

A crashed or failed export must never leave a half-written model under its final
name, where a later run (or a user) would take it for a good one. Everything is
written to a hidden temporary sibling in the same folder, so the final step is a
rename on one file system, and only a complete result is moved into place.

The temporary's name records the machine and the process that owns it
(`.NAME.tmp-HOST-PID-RANDOM`), so a later write of the same target can remove what a
killed run (SIGKILL, power loss) left behind, and nothing else. `force` replaces an
existing output only when it looks like one of ours; anything else needs force=2
(`--force --force`), because replacing a folder deletes everything in it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from llmrank.ir.errors import ConfigError

__all__ = ["atomic_path", "atomic_files", "refuse_input_overlap", "check_writable", "is_llmrank_output",
           "remove_stale_temporaries", "OutputPathError", "UnsafeOverwriteError"]

# Files that llmrank writes as a single-file target: ONNX graphs, their external weights, AOTI packages, GGUF files.
_OUTPUT_SUFFIXES = (".onnx", ".onnx.data", ".pt2", ".gguf")


class OutputPathError(ConfigError):
    """The output cannot be created there: a parent on its path is a file, not a folder."""

    hint = "choose an --out path whose parent folders are folders, not files"


class UnsafeOverwriteError(ConfigError, FileExistsError):
    """force=True met an existing output that llmrank did not write: replacing it would delete it."""

    hint = "choose another --out, or pass --force twice (force=2) if that folder really may be deleted"


def is_llmrank_output(path: Path | str) -> bool:
    """Does `path` look like something llmrank wrote (so that --force may replace it)?

    A folder with report.json (`llmrank prune`), a save_hf folder (config.json with an
    `llmrank` entry) or an empty folder; a file with an .onnx, .onnx.data, .pt2 or .gguf name.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        if (path / "report.json").is_file() or not any(path.iterdir()):
            return True
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(config, dict) and "llmrank" in config
    return path.name.endswith(_OUTPUT_SUFFIXES)


def _check_parents(final: Path) -> None:
    """The nearest existing ancestor of `final` must be a folder (mkdir would say 'exists')."""
    for parent in final.parents:
        if parent.is_dir():
            return
        if parent.exists() or parent.is_symlink():
            raise OutputPathError(f"cannot write {final}: {parent} is a file, not a folder")


def check_writable(final: Path | str, force: bool | int = False) -> Path:
    """Refuse early (before any expensive work) to write where the output cannot go or to
    replace an existing output.

    force: 0/False refuses any existing `final`; 1/True replaces it when it looks like an
    llmrank output (`is_llmrank_output`); 2 replaces anything (the CLI's --force --force).
    """
    final = Path(final)
    _check_parents(final)
    if not (final.exists() or final.is_symlink()):
        return final
    level = int(force or 0)
    if level < 1:
        raise FileExistsError(
            f"{final} already exists; pass --force / force=True to overwrite it (the existing one is deleted)"
        )
    if level < 2 and not is_llmrank_output(final):
        what = "no report.json in it" if final.is_dir() else "not an .onnx, .pt2 or .gguf file"
        raise UnsafeOverwriteError(
            f"{final} exists and does not look like an llmrank output ({what}); replacing it deletes it, "
            f"so it needs --force --force (force=2), or choose another --out"
        )
    return final


def _host_tag() -> str:
    """8 hex digits naming this machine: a pid is only meaningful on the machine that issued it."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_sibling(final: Path, kind: str = "tmp") -> Path:
    return final.parent / f".{final.name}.{kind}-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    """True unless the process is certainly gone (when in doubt, keep the temporary)."""
    if pid <= 0 or os.name == "nt":  # on Windows os.kill(pid, 0) would send CTRL_C, not probe
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists but belongs to someone else
        return True
    return True


def remove_stale_temporaries(final: Path | str) -> list[Path]:
    """Remove the temporaries of `final` whose owning process on this machine is gone.

    Only names this module makes for this very target count (`.NAME.tmp-HOST-PID-RANDOM`,
    with an optional extension, and `.NAME.old-...`); a temporary of a live process, of
    another machine, of another target or without a recorded owner is never touched. An
    `.old-` copy (the previous output, renamed aside just before the swap) whose owner died
    before the swap finished is moved back to `final` when `final` is missing.
    Returns the removed paths.
    """
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(tmp|old)-{_host_tag()}-(\d+)-[0-9a-f]{{8}}(?:\.[A-Za-z0-9]+)?")
    removed = []
    for entry in sorted(parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match is None or int(match[2]) == os.getpid() or _pid_alive(int(match[2])):
            continue
        if match[1] == "old" and not (final.exists() or final.is_symlink()):
            os.replace(entry, final)
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _remove(path: Path) -> None:
    """Remove a file or a directory tree; missing is fine (cleanup must not mask the real error)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give every file under ``path`` the mode a plain ``open`` would (0644 under umask 022):
    safetensors and mkstemp create 0600 files, which other users of a shared output folder
    (or a server reading it) cannot read. Executable bits are kept."""
    mode = 0o666 & ~_umask()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for f in files:
        current = f.stat().st_mode & 0o777
        if current != (current | mode):
            os.chmod(f, current | mode)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename tmp onto final. A directory cannot be renamed over a non-empty one, so an
    existing directory is first renamed aside and deleted only after the swap succeeded."""
    if final.is_dir() and not final.is_symlink():
        old = _temp_sibling(final, "old")
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
def atomic_path(final: Path | str, force: bool | int = False) -> Iterator[Path]:
    """Yield a temporary path next to `final`; move it onto `final` only if the block succeeds.

    The caller creates the file or directory at the yielded path. On an exception
    the temporary is removed and `final` is left exactly as it was. Temporaries of
    `final` left by killed runs are removed first. `force`: see check_writable.
    """
    final = check_writable(final, force)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = _temp_sibling(final)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to the temporary path for {final}")
        check_writable(final, force)  # someone may have created it meanwhile
        honour_umask(tmp)
        _move_into_place(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_files(finals: Sequence[Path | str], force: bool | int = False) -> Iterator[Path]:
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
    remove_stale_temporaries(finals[-1])
    staging = _temp_sibling(finals[-1])
    staging.mkdir()
    try:
        yield staging
        primary = staging / finals[-1].name
        if not primary.exists():
            raise RuntimeError(f"nothing was written for {finals[-1]}")
        for f in finals:
            check_writable(f, force)
        honour_umask(staging)
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
