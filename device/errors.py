"""The root of edge-infer's own errors, with what the process should do about them.

``exit_code`` is what a command exits with when the error ends it: 2 means the
operator must act (systemd's ``RestartPreventExitStatus=2`` then stops
restarting), 1 a failure a restart may cure. ``transient`` says whether the
same call may succeed later without anyone acting (a full disk that a log
rotation empties, a broker coming back).
"""
from __future__ import annotations


class EdgeInferError(Exception):
    exit_code: int = 1
    transient: bool = False

    def __init__(self, message: str, *, exit_code: int | None = None, transient: bool | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
        if transient is not None:
            self.transient = transient


class StoreError(EdgeInferError):
    """The state database cannot be used. ``kind`` names the cause for status fields and tests:
    ``disk_full``, ``read_only``, ``corrupt``, ``io`` or ``locked``."""

    exit_code = 2

    def __init__(self, message: str, *, kind: str, exit_code: int | None = None,
                 transient: bool | None = None) -> None:
        super().__init__(message, exit_code=exit_code, transient=transient)
        self.kind = kind


class StoreUnavailable(EdgeInferError):
    """At run time: results cannot be committed now (the store is degraded); nothing was lost."""

    transient = True


class InferenceUnavailable(EdgeInferError):
    """At run time: the backend cannot answer this input now (its isolated child died, hung or cannot
    start) and no fallback is configured. Nothing was recorded for the input: submit it again (the
    spool keeps its file and retries it)."""

    transient = True
