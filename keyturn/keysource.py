"""Where a worker gets its KMS and key registry: a picklable recipe, never a key.

Beam ships DoFns to workers by pickling them, so a DoFn holds a `KeySource`
and calls it in `setup()`. A key source holds paths and names only; secrets
(a passphrase) are read from the environment on the worker, and KEKs stay in
the KMS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from keyturn.kms.base import KmsBackend
from keyturn.registry.base import KeyRegistry

__all__ = ["KeySource", "LocalKeySource"]


@runtime_checkable
class KeySource(Protocol):
    """Builds the KMS backend and the registry on the worker that uses them."""

    def open_kms(self) -> KmsBackend: ...

    def open_registry(self) -> KeyRegistry: ...


@dataclass(frozen=True)
class LocalKeySource:
    """The embedded defaults: a LocalKms keystore file and a SQLite registry (single node).

    The keystore's root key comes from `key_file` (mode 0600) or from the
    passphrase in the environment variable named by `passphrase_env`.
    """

    keystore: str
    registry: str
    key_file: str | None = None
    passphrase_env: str | None = None

    def __post_init__(self) -> None:
        if (self.key_file is None) == (self.passphrase_env is None):
            raise ValueError("give exactly one of key_file or passphrase_env")

    def open_kms(self) -> KmsBackend:
        from keyturn.kms.local import LocalKms

        if self.key_file is not None:
            return LocalKms.open(self.keystore, key_file=self.key_file)
        passphrase = os.environ.get(self.passphrase_env or "")
        if not passphrase:
            raise ValueError(f"environment variable {self.passphrase_env} holds no keystore passphrase")
        return LocalKms.open(self.keystore, passphrase=passphrase)

    def open_registry(self) -> KeyRegistry:
        from keyturn.registry.sqlite import SqliteKeyRegistry

        return SqliteKeyRegistry(self.registry)
