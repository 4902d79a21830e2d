"""Avro schemas (.avsc) shipped with keyturn, and helpers to load them.

Schemas live next to this module as package data and are read through
`importlib.resources`, so they work from a wheel or a zip as well.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

import fastavro

__all__ = ["load_schema", "schema_names"]

_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")


def schema_names() -> list[str]:
    """Names of the packaged schemas (file names without ``.avsc``), sorted."""
    return sorted(
        entry.name[: -len(".avsc")] for entry in resources.files(__name__).iterdir() if entry.name.endswith(".avsc")
    )


def load_schema(name: str) -> dict[str, Any]:
    """Read ``<name>.avsc`` from this package and return `fastavro.parse_schema` of it.

    `name` is a bare schema name such as ``"audit_event"`` (a trailing
    ``.avsc`` is accepted); unknown names raise `ValueError`.
    """
    if not isinstance(name, str):
        raise TypeError(f"schema name must be str, got {type(name).__name__}")
    stem = name[: -len(".avsc")] if name.endswith(".avsc") else name
    if not _NAME_RE.fullmatch(stem):
        raise ValueError(f"schema name must be a bare lowercase name such as 'audit_event', got {name!r}")
    resource = resources.files(__name__).joinpath(f"{stem}.avsc")
    try:
        text = resource.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"no schema named {stem!r}; available: {', '.join(schema_names())}") from None
    return fastavro.parse_schema(json.loads(text))
