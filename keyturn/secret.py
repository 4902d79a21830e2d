"""`SecretKey`: a holder for plaintext key bytes that protects itself.

It refuses pickling and copying, shows no material in `repr` or `str`, and
`wipe()` overwrites its buffer (best effort: Python may hold other copies, so
the real guarantee is that keyturn keeps no reference beyond a scope).
"""

from __future__ import annotations

from typing import NoReturn

__all__ = ["SecretKey"]


class SecretKey:
    """Plaintext key material. Use `.material` only at the point of use."""

    __slots__ = ("_buf", "_label")

    def __init__(self, material: bytes | bytearray, *, label: str = "key") -> None:
        if not isinstance(material, (bytes, bytearray)):
            raise TypeError(f"key material must be bytes, not {type(material).__name__}")
        if len(material) == 0:
            raise ValueError("key material must not be empty")
        self._buf = bytearray(material)
        self._label = label

    @property
    def material(self) -> bytes:
        """The key bytes; raises `ValueError` once wiped."""
        if self._buf is None:
            raise ValueError(f"{self._label} has been wiped")
        return bytes(self._buf)

    def view(self) -> memoryview:
        """A read-only view of the key bytes, no copy (for a native call that reads them in place).

        The view sees the wipe: once `wipe()` has run it reads zeros.
        `ValueError` once wiped.
        """
        if self._buf is None:
            raise ValueError(f"{self._label} has been wiped")
        return memoryview(self._buf).toreadonly()

    @property
    def wiped(self) -> bool:
        return self._buf is None

    def __len__(self) -> int:
        return 0 if self._buf is None else len(self._buf)

    def wipe(self) -> None:
        """Overwrite and drop the buffer. Idempotent."""
        if self._buf is not None:
            for i in range(len(self._buf)):
                self._buf[i] = 0
            self._buf = None

    def __repr__(self) -> str:
        state = "wiped" if self._buf is None else f"{len(self._buf)} bytes"
        return f"SecretKey({self._label}, {state}, material=<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretKey refuses to be pickled: plaintext keys never leave their scope")

    def __getstate__(self) -> NoReturn:
        raise TypeError("SecretKey refuses to be pickled: plaintext keys never leave their scope")

    def __copy__(self) -> NoReturn:
        raise TypeError("SecretKey refuses to be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("SecretKey refuses to be copied")

    def __eq__(self, other: object) -> bool:  # identity only: no timing oracle on material
        return self is other

    __hash__ = object.__hash__
