"""``--quiet`` for third-party code: progress bars, log lines and warnings, for one block only.

Setting TQDM_DISABLE inside the process is too late: tqdm reads its environment overrides
when it is imported, which torch and transformers have done long before the CLI parses its
arguments. So the block switches off what is already loaded (tqdm's constructor,
transformers' and huggingface_hub's bars, the logging module, onnxruntime's C++ logger,
the warnings filters) and puts every switch back afterwards: a library that calls
``llmrank.cli.main`` keeps its own settings, and a run without --quiet hides nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator

__all__ = ["quiet_libraries"]

_TQDM_DISABLE_POSITION = 10  # tqdm(iterable, desc, total, leave, file, ncols, mininterval, maxinterval, miniters, ascii, disable)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _tqdm_disabled() -> Iterator[None]:
    """Every tqdm bar created in the block is disabled (subclasses such as tqdm.auto included)."""
    try:
        from tqdm import std
    except ImportError:  # pragma: no cover - tqdm is a dependency
        yield
        return
    saved = std.tqdm.__dict__["__init__"]
    original = std.tqdm.__init__

    def quiet_init(self, *args, **kwargs):
        if len(args) > _TQDM_DISABLE_POSITION:
            args = (*args[:_TQDM_DISABLE_POSITION], True, *args[_TQDM_DISABLE_POSITION + 1:])
        else:
            kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = quiet_init
    try:
        yield
    finally:
        std.tqdm.__init__ = saved


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # also huggingface_hub's bars
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _logging_quiet() -> Iterator[None]:
    """Python logging below ERROR (torch.onnx, onnxscript, ...) is dropped in the block."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def _onnxruntime_quiet() -> Iterator[None]:
    """onnxruntime's C++ logger writes to stderr directly: raise its level to ERROR."""
    if importlib.util.find_spec("onnxruntime") is None:
        yield
        return
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    try:
        yield
    finally:
        onnxruntime.set_default_logger_severity(2)  # onnxruntime's default (WARNING); it offers no getter


@contextlib.contextmanager
def quiet_libraries(enabled: bool = True) -> Iterator[None]:
    """With enabled, hide third-party progress bars, warnings and log lines inside the block
    (errors still show); everything is restored on exit. Disabled: a no-op."""
    if not enabled:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(_env("TQDM_DISABLE", "1"))  # for tqdm imported later, and child processes
        stack.enter_context(_tqdm_disabled())
        stack.enter_context(_transformers_quiet())
        stack.enter_context(_logging_quiet())
        stack.enter_context(_onnxruntime_quiet())
        yield
