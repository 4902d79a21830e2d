"""The Avro plain-type descriptor bound into every Avro cell's associated data (wire format v1).

Beam-free and free of fastavro and pyarrow, so `keyturn.contract` and
`keyturn.avro_codec` both use it without importing each other.
"""

from __future__ import annotations

import json

from keyturn.context import MAX_VALUE_BYTES

__all__ = ["avro_type_descriptor"]


def avro_type_descriptor(plain_type: object) -> str:
    """The type descriptor bound into every cell's associated data.

    ``"avro:" + json.dumps(plain_type, sort_keys=True, separators=(",", ":"))``
    of the field's plain type as written in the schema (the value of
    ``keyturn.plain_type``). Part of wire format v1 (docs/FORMAT.md, "Cell
    associated data"): cells sealed under one descriptor only open under the
    same one, so this function must never change for v1. `ValueError` if the
    type is not JSON or the descriptor is too long to bind.
    """
    try:
        text = "avro:" + json.dumps(plain_type, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        raise ValueError("an Avro plain type must be JSON data (str, list, dict)") from None
    if len(text.encode("utf-8")) > MAX_VALUE_BYTES:
        raise ValueError(f"the Avro type descriptor exceeds {MAX_VALUE_BYTES} bytes")
    return text
