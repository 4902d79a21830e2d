"""Local-filesystem durability: the one atomic small-file writer, and directory fsync.

`write_file_atomically(path, data)` is how keyturn puts a small local file
in place (the key home's config, the keystore and root key, the audit
log's head sidecar, a local lake's markers and ledgers):

1. a fresh temp file beside `path` (same directory, so the rename cannot
   cross filesystems), created exclusively with mode 0600 and then given
   exactly `mode` (the umask does not apply);
2. write everything, fsync the file;
3. ``os.replace`` it over `path`, or with ``exclusive=True`` hard-link it
   to `path` (`FileExistsError` if `path` exists: never overwritten);
4. fsync the directory, so the rename survives a power cut.

A crash before step 3 leaves the old file (or none) untouched and at most a
temp file; after it, the new file, complete. Temp names are
``.keyturn-tmp-<uuid>-<name>.tmp`` (`temp_name_for`): hidden, never ending
in a data suffix, and recognised by `is_temp_name` (a lake removes leftover
ones under its lock). POSIX only.
"""

from __future__ import annotations

import os
import uuid

__all__ = ["write_file_atomically", "fsync_dir", "temp_name_for", "is_temp_name", "TEMP_PREFIX", "TEMP_SUFFIX"]

TEMP_PREFIX = ".keyturn-tmp-"
TEMP_SUFFIX = ".tmp"


def temp_name_for(name: str) -> str:
    """A fresh temp file name for a file called `name`, in the same directory.

    Hidden (a leading ".") for pyarrow and Spark, and ending in ``.tmp`` so
    that no glob for the final suffix (DuckDB's ``*.parquet``) matches it.
    """
    return f"{TEMP_PREFIX}{uuid.uuid4().hex}-{name}{TEMP_SUFFIX}"


def is_temp_name(name: str) -> bool:
    """True for keyturn's temp files: ``.keyturn-tmp-<uuid>-<name>.tmp``, and the older
    ``.keyturn-tmp-<uuid>-<name>`` (without ``.tmp``) that earlier versions left behind."""
    return name.startswith(TEMP_PREFIX)


def fsync_dir(directory: str) -> None:
    """fsync a local directory, so a rename or create inside it survives a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(
    path: str | os.PathLike[str], data: bytes | bytearray | memoryview, *, mode: int = 0o644, exclusive: bool = False
) -> None:
    """Put `data` at `path` durably and atomically (see the module docstring); the file gets exactly `mode`.

    ``exclusive=True`` refuses (`FileExistsError`) to replace an existing
    `path`. The temp file is removed on any failure.
    """
    name = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(name)
    tmp = os.path.join(directory, temp_name_for(base))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, name)
            os.unlink(tmp)
        else:
            os.replace(tmp, name)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)
