"""AOTInductor packages of (slim) ExportedPrograms: compile ahead of time, load without Python model code.

``export_aoti(program, path)`` compiles an ``ExportedProgram`` (e.g. ``prune_program(...).program``)
with ``torch._inductor.aoti_compile_and_package`` into a ``.pt2`` package and moves it into
place only when compilation succeeded (``atomic_path``); ``load_aoti(path)`` returns a callable
with the program's inputs and outputs.

Needs a working C++ compiler (gcc/g++ on Linux). The first compile on a machine also
precompiles the AOTI headers (cached under the inductor cache dir, /tmp/torchinductor_$USER
by default), so it is much slower than later ones: measured on a busy 2-core CPU, a 2-layer
MLP took ~2 min cold and tens of seconds warm.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .atomic import atomic_path
from llmrank.ir.errors import ExportError

__all__ = ["AotiError", "AotiExportResult", "check_compiler", "export_aoti", "export_aoti_timed", "load_aoti"]

SUFFIX = ".pt2"


class AotiError(ExportError):
    """AOTInductor cannot compile here (no C++ compiler) or the package is unusable."""


@dataclass(frozen=True)
class AotiExportResult:
    path: Path
    bytes: int
    compile_seconds: float


def check_compiler() -> str:
    """Path of the C++ compiler inductor will use; raises AotiError when none is found."""
    for name in ("g++", "c++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    raise AotiError("AOTInductor needs a C++ compiler: install g++ (e.g. apt-get install g++) or clang++")


def export_aoti(
    program: torch.export.ExportedProgram,
    path: Path | str,
    *,
    force: bool | int = False,
    inductor_configs: dict[str, Any] | None = None,
) -> Path:
    """Compile ``program`` into an AOTInductor package at ``path`` (a ``.pt2`` file).

    The package is written to a temporary sibling and renamed onto ``path`` only after a
    successful compile, so a failure never leaves a partial package under the final name.
    An existing ``path`` is refused unless ``force=True``.
    """
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"an AOTInductor package path must end with {SUFFIX}, got {path.name!r}")
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"export_aoti takes a torch.export.ExportedProgram, got {type(program).__name__}")
    check_compiler()
    with atomic_path(path, force=force) as tmp:
        # aoti_compile_and_package insists on a name ending in .pt2: stage beside the temporary.
        staged = tmp.with_name(tmp.name + SUFFIX)
        try:
            written = Path(torch._inductor.aoti_compile_and_package(program, package_path=str(staged), inductor_configs=inductor_configs))
            if not written.is_file():
                raise AotiError(f"AOTInductor reported {written} but wrote no file there")
            written.replace(tmp)
        finally:
            staged.unlink(missing_ok=True)
    return path


def export_aoti_timed(program: torch.export.ExportedProgram, path: Path | str, **kwargs: Any) -> AotiExportResult:
    """``export_aoti`` plus the package size and the compile time."""
    clock = time.perf_counter()
    out = export_aoti(program, path, **kwargs)
    return AotiExportResult(out, out.stat().st_size, time.perf_counter() - clock)


def load_aoti(path: Path | str) -> Callable[..., Any]:
    """Load a package written by ``export_aoti``; call it like the program's module."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no AOTInductor package at {path}")
    return torch._inductor.aoti_load_package(str(path))
