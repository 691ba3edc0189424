"""The two kinds of failure a user can see, and the exit codes the CLI maps them to.

Everything a user can cause (bad recipe, unknown model, missing data, corrupted
artifact, infeasible target) is raised as :class:`UserError`; the CLI turns it into
exit code 2 and one line. A failed parity gate is :class:`GateFailed` (exit 3), so
CI pipelines can tell "the compressed model diverges" apart from "you typed it wrong".
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_GATE_FAILED = 3
EXIT_INTERRUPTED = 130


class CascadecError(Exception):
    """Base class of the errors cascadec raises on purpose."""

    exit_code = 1


class UserError(CascadecError):
    """Input the user can fix: the message names the file, key or value at fault."""

    exit_code = EXIT_USER_ERROR


class GateFailed(CascadecError):
    """A parity gate failed; ``failures`` lists what failed, for the report table."""

    exit_code = EXIT_GATE_FAILED

    def __init__(self, message: str, failures: list[dict] | None = None) -> None:
        super().__init__(message)
        self.failures = failures or []


def first_line(exc: BaseException, limit: int = 300, *, whole: bool = False) -> str:
    """An exception's message as one line of at most ``limit`` characters.

    A :class:`UserError` and a manifest's ``error`` field must stay one line. By default the
    first line is kept (the rest of a torch or safetensors error is context); ``whole``
    collapses every line into one instead, for errors whose cause comes last (the ONNX
    exporter's). An empty message gives the exception's type."""
    text = str(exc).strip()
    if not whole:
        text = next((line for line in text.splitlines() if line.strip()), "")
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
