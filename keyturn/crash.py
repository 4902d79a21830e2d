"""Crashpoints: a test hook that kills the process at a named point.

`crashpoint(name)` sends SIGKILL to the current process when the environment
variable ``KEYTURN_CRASHPOINT`` equals `name`; otherwise it does nothing
(one dictionary lookup). Crash-safety tests set the variable on a
subprocess and then check that the lake is still readable with every row
exactly once. ``KEYTURN_CRASHPOINT_SKIP=N`` lets the first N hits of the
point pass, so a test can crash in the middle of a run rather than at its
first file.

This is a testing aid only; production runs never set the variable.

Points used by the reencrypt job (see `keyturn.lake.rewrite` and
`keyturn.pipelines.reencrypt`):

- ``run:after-lock``: lock taken, before temp-file cleanup;
- ``run:after-inventory``: inventory taken, before any rewrite;
- ``rewrite:before-write``: file read, temp file not yet created;
- ``rewrite:mid-write``: first row group written to the temp file;
- ``rewrite:before-swap``: temp file complete and verified, original untouched;
- ``rewrite:after-swap``: temp file renamed over the original;
- ``rewrite:after-side-outputs``: the file's audit/quarantine records written;
- ``run:before-report``: every file done, before the run's summary outputs.

And by `keyturn rewrap` (`keyturn.rewrap.rewrap_entries`):

- ``rewrap:before-swap``: the KMS re-wrapped a DEK; its directory entry, and
  those of the batch it is swapped with (the directory's `swap_batch`), not yet swapped.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["crashpoint", "CRASHPOINTS", "ENV_VAR", "SKIP_ENV_VAR"]

ENV_VAR = "KEYTURN_CRASHPOINT"
SKIP_ENV_VAR = "KEYTURN_CRASHPOINT_SKIP"
CRASHPOINTS = (
    "run:after-lock",
    "run:after-inventory",
    "rewrite:before-write",
    "rewrite:mid-write",
    "rewrite:before-swap",
    "rewrite:after-swap",
    "rewrite:after-side-outputs",
    "run:before-report",
    "rewrap:before-swap",
)

_hits: dict[str, int] = {}
_lock = threading.Lock()


def crashpoint(name: str) -> None:
    """SIGKILL this process if ``KEYTURN_CRASHPOINT`` names this point (test hook)."""
    if os.environ.get(ENV_VAR) != name:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        hit = _hits[name]
    if hit > int(os.environ.get(SKIP_ENV_VAR, "0") or 0):
        os.kill(os.getpid(), signal.SIGKILL)
