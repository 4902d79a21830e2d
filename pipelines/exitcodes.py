"""The `keyturn` CLI's exit codes, and how errors and reports map to them.

| code | name        | meaning                                                               |
|------|-------------|-----------------------------------------------------------------------|
| 0    | OK          | done (also: `rotate --if-due` when rotation is not due yet)           |
| 1    | INTERNAL    | an unexpected error (a bug); rerun with --debug for the traceback     |
| 2    | USAGE       | bad arguments, bad config, missing home or input, unknown column/version |
| 3    | DATA        | data problems found: side outputs non-empty, audit chain broken, corrupt files, |
|      |             | or rows with a missing/unknown key version rejected (VersionMismatchError) |
| 4    | UNAVAILABLE | the KMS, the key registry or an audit sink could not be used          |
| 5    | REFUSED     | refused on purpose: version still in use, lake locked, invalid state change |
| 130  | INTERRUPTED | stopped by Ctrl-C (SIGINT) before it finished                         |

`exit_code_for(exc)` maps an exception to a code by walking its class
hierarchy, so subclasses inherit their parent's code; errors added later
(for example by the lake package) can set a class attribute `exit_code`
to choose their own.

`report_exit_code(report)` maps a verb's report (a `keyturn.reports.Report`,
or any mapping of its JSON form): DATA when ``report["problems"]`` is a
positive count or a non-empty list (of problem records), else OK.

Beam wraps what a DoFn raises. In process, the runner re-raises a copy
with `` [while running 'STEP']`` added to the message (tagged
``_tagged_with_step``; the original is its ``__context__``), or, when the
copy cannot be built (a ``KeyboardInterrupt``, an error whose constructor
takes other arguments), a ``RuntimeError`` naming the original's type.
Out of process (multi-process workers, a portable job service) only text
comes back: a ``RuntimeError`` holding the worker's traceback. `unwrap(exc)`
undoes both, and `exit_code_for` and `message_for` look through it, so an
error gets the same code and line whichever runner ran the step:

- a ``KeyboardInterrupt`` anywhere in the chain (Ctrl-C, whatever a step
  did about it) is INTERRUPTED;
- a Beam copy is replaced by the exception it copied;
- a traceback in the text is replaced by a `RemoteError` carrying the
  original's class (when it is a class this process knows: builtins and
  modules already imported) and message.
"""

from __future__ import annotations

import builtins
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from keyturn import errors

__all__ = [
    "OK", "INTERNAL", "USAGE", "DATA", "UNAVAILABLE", "REFUSED", "INTERRUPTED", "CODES",
    "RemoteError", "unwrap", "exit_code_for", "message_for", "type_name_for", "report_exit_code",
]

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
    errors.AccountingError: DATA,
    errors.LakeError: USAGE,
    errors.InvalidTransitionError: REFUSED,
    errors.ConcurrentModificationError: REFUSED,
    errors.RegistryError: UNAVAILABLE,
    errors.KmsClosedError: INTERNAL,
    errors.KmsError: UNAVAILABLE,
    errors.AuditChainError: DATA,
    errors.AuditSinkError: UNAVAILABLE,
    errors.DecryptionError: DATA,
    errors.VersionMismatchError: DATA,  # `version_tracking.on_*_version: reject`: the data is the problem
    errors.ScopeClosedError: INTERNAL,
    FileNotFoundError: USAGE,
    NotADirectoryError: USAGE,
    IsADirectoryError: USAGE,
    FileExistsError: USAGE,
    PermissionError: USAGE,
    ValueError: USAGE,  # keyturn's convention: a caller mistake raises ValueError with a helpful message
}


class RemoteError(Exception):
    """An exception known only from the text a runner sent back: its class (if this process knows it) and message."""

    def __init__(self, type_name: str, message: str, cls: type[BaseException] | None) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.message = message
        self.cls = cls


# " [while running 'Encrypt/ParDo(EncryptFn)']": what Beam adds to the message of an exception a step raised
_STEP_NOTE = re.compile(r" \[while running '[^']*'\]")
# The last line of a formatted traceback: "keyturn.errors.KmsAccessDeniedError: KEK 'kek-1' is disabled"
_EXC_LINE = re.compile(r"^(?P<name>[A-Za-z_][\w.]*)(?:: ?(?P<message>.*))?$")


_TRACEBACK = "Traceback (most recent call last):"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then every exception it was raised from or while handling (suppressed context included)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo.extend(e for e in (cur.__context__, cur.__cause__) if e is not None)


def _known_class(name: str) -> type[BaseException] | None:
    """The exception class named `name` (builtin, or in a module this process imported), else None."""
    module, _, attr = name.rpartition(".")
    where = sys.modules.get(module) if module else builtins
    cls = getattr(where, attr, None) if where is not None else None
    return cls if isinstance(cls, type) and issubclass(cls, BaseException) else None


def _from_text(text: str) -> RemoteError | None:
    """The original exception of a runner's message that holds a worker's traceback (or names an exception)."""
    marker = text.find(_TRACEBACK)
    if marker >= 0:  # the exception is the last unindented line after the traceback that names one
        lines = text[marker + len(_TRACEBACK) :].splitlines()
        candidates = [line.strip() for line in reversed(lines) if line.strip() and not line[:1].isspace()]
    else:  # Beam's fallback copy: "KeyboardInterrupt [while running 'X']", "pkg.SomeError: message [while ...]"
        candidates = text.strip().splitlines()[:1]
    for line in candidates:
        match = _EXC_LINE.match(_STEP_NOTE.sub("", line))
        if not match:
            continue
        name = match.group("name")
        cls = _known_class(name)
        if cls is None and not name.rpartition(".")[2].endswith(("Error", "Exception", "Interrupt", "Exit")):
            continue
        message = (match.group("message") or "").strip()
        inner = _from_text(message) if cls is RuntimeError and message else None
        return inner or RemoteError(name, message, cls)
    return None


def unwrap(exc: BaseException) -> BaseException:
    """The exception behind Beam's wrapping of `exc` (see the module doc); `exc` itself when it is not wrapped."""
    for link in _chain(exc):
        if isinstance(link, KeyboardInterrupt):
            return link
    cur = exc
    while getattr(cur, "_tagged_with_step", False) and cur.__context__ is not None:
        cur = cur.__context__  # Beam's copy of the exception a step raised: the original is its context
    if isinstance(cur, KeyboardInterrupt):
        return cur
    if type(cur) is RuntimeError or getattr(cur, "_tagged_with_step", False):
        remote = _from_text(str(cur))
        if remote is not None:
            if remote.cls is not None and issubclass(remote.cls, KeyboardInterrupt):
                return KeyboardInterrupt()
            return remote
    return cur


def _code_for_class(exc_class: type[BaseException]) -> int:
    for cls in exc_class.__mro__:
        own = cls.__dict__.get("exit_code")
        if isinstance(own, int) and own in CODES:
            return own
        if cls in _BY_CLASS:
            return _BY_CLASS[cls]
    return INTERNAL


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an exception, looking through Beam's wrapping (INTERNAL by default)."""
    cause = unwrap(exc)
    if isinstance(cause, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(cause, RemoteError):
        return INTERNAL if cause.cls is None else _code_for_class(cause.cls)
    return _code_for_class(type(cause))


def message_for(exc: BaseException) -> str:
    """One line for `exc`, looking through Beam's wrapping; no step annotation (``[while running ...]``)."""
    cause = unwrap(exc)
    if isinstance(cause, KeyboardInterrupt):
        return "interrupted"
    text = _STEP_NOTE.sub("", str(cause))
    return " ".join(text.split()) or "(no message)"


def type_name_for(exc: BaseException) -> str:
    """The class name of the exception behind `exc` (its own for a `RemoteError`)."""
    cause = unwrap(exc)
    if isinstance(cause, RemoteError):
        return cause.type_name.rpartition(".")[2]
    return type(cause).__name__


def report_exit_code(report: Mapping[str, Any]) -> int:
    """DATA when the report has problems (``report["problems"]``: a count > 0 or a non-empty list), else OK."""
    problems = report.get("problems", 0) if isinstance(report, Mapping) else 0
    if isinstance(problems, (list, tuple)):
        return DATA if problems else OK
    if isinstance(problems, bool) or not isinstance(problems, int):
        return OK
    return DATA if problems > 0 else OK
