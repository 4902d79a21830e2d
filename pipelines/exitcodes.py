"""The `keyturn` CLI's exit codes, and how errors and reports map to them.

| code | name        | meaning                                                               |
|------|-------------|-----------------------------------------------------------------------|
| 0    | OK          | done (also: `rotate --if-due` when rotation is not due yet)           |
| 1    | INTERNAL    | an unexpected error (a bug); rerun with --debug for the traceback     |
| 2    | USAGE       | bad arguments, bad config, missing home or input, unknown column/version |
| 3    | DATA        | data problems found: side outputs non-empty, audit chain broken, corrupt files |
| 4    | UNAVAILABLE | the KMS, the key registry or an audit sink could not be used          |
| 5    | REFUSED     | refused on purpose: version still in use, lake locked, invalid state change |
| 130  | INTERRUPTED | stopped by Ctrl-C (SIGINT) before it finished                         |

`exit_code_for(exc)` maps an exception to a code by walking its class
hierarchy, so subclasses inherit their parent's code; errors added later
(for example by the lake package) can set a class attribute `exit_code`
to choose their own.

`report_exit_code(report)` maps a pipeline's JSON-able report: DATA when
``report["problems"]`` is a positive count or a non-empty list (of problem
records), else OK.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from keyturn import errors

__all__ = ["OK", "INTERNAL", "USAGE", "DATA", "UNAVAILABLE", "REFUSED", "INTERRUPTED", "CODES", "exit_code_for", "report_exit_code"]

OK = 0
INTERNAL = 1
USAGE = 2
DATA = 3
UNAVAILABLE = 4
REFUSED = 5
INTERRUPTED = 130  # the shell convention for SIGINT; not an error class, so not in CODES

CODES: dict[int, str] = {
    OK: "ok",
    INTERNAL: "internal error",
    USAGE: "usage or config error",
    DATA: "data problems found",
    UNAVAILABLE: "KMS or registry unavailable",
    REFUSED: "refused",
}

# Most specific first is not needed: the class hierarchy is walked from the
# exception's own class upward, and the first class listed here wins.
_BY_CLASS: dict[type[BaseException], int] = {
    errors.ConfigError: USAGE,
    errors.HomeError: USAGE,
    errors.UnknownVersionError: USAGE,
    errors.VersionInUseError: REFUSED,
    errors.LakeLockedError: REFUSED,
    errors.LakeError: USAGE,
    errors.InvalidTransitionError: REFUSED,
    errors.ConcurrentModificationError: REFUSED,
    errors.RegistryError: UNAVAILABLE,
    errors.KmsClosedError: INTERNAL,
    errors.KmsError: UNAVAILABLE,
    errors.AuditChainError: DATA,
    errors.AuditSinkError: UNAVAILABLE,
    errors.DecryptionError: DATA,
    errors.ScopeClosedError: INTERNAL,
    FileNotFoundError: USAGE,
    NotADirectoryError: USAGE,
    IsADirectoryError: USAGE,
    FileExistsError: USAGE,
    PermissionError: USAGE,
    ValueError: USAGE,  # keyturn's convention: a caller mistake raises ValueError with a helpful message
}


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an exception (INTERNAL when nothing more specific applies)."""
    for cls in type(exc).__mro__:
        own = cls.__dict__.get("exit_code")
        if isinstance(own, int) and own in CODES:
            return own
        if cls in _BY_CLASS:
            return _BY_CLASS[cls]
    return INTERNAL


def report_exit_code(report: Mapping[str, Any]) -> int:
    """DATA when the report has problems (``report["problems"]``: a count > 0 or a non-empty list), else OK."""
    problems = report.get("problems", 0) if isinstance(report, Mapping) else 0
    if isinstance(problems, (list, tuple)):
        return DATA if problems else OK
    if isinstance(problems, bool) or not isinstance(problems, int):
        return OK
    return DATA if problems > 0 else OK
