"""Typed errors. Every message says what failed, where, and how to fix it.

The CLI turns any :class:`GraphoptError` into one line on stderr and exit code 2
(a traceback only with ``--debug``).
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Base class: a user-facing failure with a fix in its message."""

    exit_code = 2


class SourceError(GraphoptError):
    """The model source (folder, GGUF file, built-in name) cannot be used."""


class TraceError(GraphoptError):
    """torch.onnx.export failed or produced a graph we cannot use."""


class PassError(GraphoptError):
    """A pass failed; the message names the pass and the passes before it."""


class RecipeError(GraphoptError):
    """A pipeline recipe (TOML) is malformed or names unknown passes/options."""


class ArtifactError(GraphoptError):
    """An artifact directory is missing, incomplete, corrupted or mismatched."""


class RuntimeInputError(GraphoptError):
    """A request cannot be run: prompt too long, bad sampling value, ..."""


class OverloadedError(GraphoptError):
    """The runtime's request queue is full; the caller should retry later (HTTP 429)."""


class RequestError(RuntimeInputError):
    """An HTTP request the server refuses: ``param`` names the offending field, ``status`` is the HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


class BenchError(GraphoptError):
    """A benchmark peer cannot be set up (missing package, failed build)."""
