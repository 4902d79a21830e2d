"""Small local-filesystem durability helpers shared by every file keyturn writes."""

from __future__ import annotations

import os

__all__ = ["fsync_dir"]


def fsync_dir(directory: str) -> None:
    """fsync a local directory, so a rename or create inside it survives a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
