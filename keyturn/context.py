"""Canonical encoding of a context (string keys to string or bytes values).

Used for AES-GCM associated data and for binding a wrapped DEK to its place.
The encoding is injective: pairs are sorted by key bytes and every key and
value is length-prefixed, so `{"ab": "c"}` and `{"a": "bc"}` never collide.

Layout (all integers big-endian)::

    u16  number of pairs
    then, for each pair in ascending order of key bytes:
    u16  key length      (1..255)
    ...  key, UTF-8
    u32  value length    (0..65536)
    ...  value (str values as UTF-8)

The whole encoding is capped at `MAX_CONTEXT_BYTES`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

__all__ = ["encode_context", "MAX_CONTEXT_BYTES", "MAX_KEY_BYTES", "MAX_VALUE_BYTES"]

MAX_KEY_BYTES = 255
MAX_VALUE_BYTES = 65536
MAX_CONTEXT_BYTES = 1 << 20
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


def encode_context(context: Mapping[str, str | bytes]) -> bytes:
    """Encode `context` canonically; `ValueError`/`TypeError` on caller mistakes."""
    items = []
    for key, value in context.items():
        if not isinstance(key, str):
            raise TypeError(f"context keys must be str, got {type(key).__name__}")
        kb = key.encode("utf-8")
        if not 1 <= len(kb) <= MAX_KEY_BYTES:
            raise ValueError(f"context key {key!r} must be 1..{MAX_KEY_BYTES} bytes")
        if isinstance(value, str):
            vb = value.encode("utf-8")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            vb = bytes(value)
        else:
            raise TypeError(f"context value for {key!r} must be str or bytes, got {type(value).__name__}")
        if len(vb) > MAX_VALUE_BYTES:
            raise ValueError(f"context value for {key!r} exceeds {MAX_VALUE_BYTES} bytes")
        items.append((kb, vb))
    if len(items) > 0xFFFF:
        raise ValueError("context has too many pairs")
    items.sort()
    parts = [_U16.pack(len(items))]
    for kb, vb in items:
        parts += (_U16.pack(len(kb)), kb, _U32.pack(len(vb)), vb)
    encoded = b"".join(parts)
    if len(encoded) > MAX_CONTEXT_BYTES:
        raise ValueError(f"context encodes to {len(encoded)} bytes, over the {MAX_CONTEXT_BYTES}-byte cap")
    return encoded
