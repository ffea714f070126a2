"""One error hierarchy for the whole package, each class mapped to a CLI exit code.

Every error llmrank raises on purpose derives from :class:`LLMRankError`; the message says
what to change. Errors about the user's request also derive from ``ValueError`` (and errors
about failed work from ``RuntimeError``) so that generic ``except ValueError`` code keeps
working. When a pass fails, the pass runner records which pass it was and which passes ran
before it (``pass_name`` / ``passes_before``); ``str(error)`` then starts with that context.
"""

from __future__ import annotations


class LLMRankError(Exception):
    """Base of every error llmrank raises on purpose."""

    exit_code = 1
    pass_name: str | None = None
    passes_before: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = super().__str__()
        if self.pass_name is None:
            return text
        ran = ", ".join(self.passes_before) if self.passes_before else "nothing"
        return f"pass {self.pass_name} failed (after {ran}): {text}"


class ConfigError(LLMRankError, ValueError):
    """An option or a combination of options is invalid; nothing was loaded or computed."""

    exit_code = 2


class InputError(LLMRankError, ValueError):
    """The model, data or files given cannot be used as they are."""

    exit_code = 2


class CalibrationError(InputError):
    """The calibration data cannot produce statistics (empty, wrong dtype, ids out of range)."""


class UnsupportedModelError(InputError):
    """The model has nothing llmrank can prune (no channel group found in its graph)."""

    exit_code = 3


class TraceError(LLMRankError, RuntimeError):
    """torch.export could not trace the model; the message says what to try."""

    exit_code = 3


class PassError(LLMRankError, RuntimeError):
    """A pass broke its contract or failed with an unexpected error (please report it)."""

    exit_code = 1


class VerificationError(LLMRankError, RuntimeError):
    """A produced model does not compute what it must (shrunk != masked, non-finite outputs)."""

    exit_code = 4


class ExportError(LLMRankError, RuntimeError):
    """An exported artefact failed its check against PyTorch; nothing was written."""

    exit_code = 5

