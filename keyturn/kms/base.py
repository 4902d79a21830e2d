"""The one small interface every KMS backend implements.

A backend wraps and unwraps 32-byte DEKs under a key-encryption key (KEK)
named by `kek_id`, always bound to an encryption `context` (a str->str map).
It maps its own failures to `keyturn.errors`:

- a wrapped DEK that fails authentication, or a context that does not
  match: `DecryptionError` (the data is bad, never retry);
- an unknown KEK: `KmsKeyNotFoundError`;
- a disabled or forbidden KEK: `KmsAccessDeniedError`;
- throttling or an unreachable service after retries: `KmsThrottledError`
  / `KmsUnavailableError` (transient: never quarantine data for these).

The shape follows AWS KMS (GenerateDataKey, Decrypt, ReEncrypt) so the AWS
backend fits without adapters. Plaintext keys come back as `SecretKey`.
Wrappers around a backend (rate limit, call counts) live in
`keyturn.kms.decorators`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from keyturn.secret import SecretKey

__all__ = [
    "KmsBackend",
    "BoundKek",
    "check_context",
    "GeneratedDataKey",
    "UnwrappedDataKey",
    "RewrappedDataKey",
    "KmsCallLog",
    "CountingKms",
]

#: (kek_id, context): a KEK and the encryption context a DEK is bound to under it.
BoundKek = tuple[str, Mapping[str, str]]


@dataclass(frozen=True, slots=True)
class GeneratedDataKey:
    """A fresh DEK: plaintext (for this scope only) and its wrapped form."""

    plaintext: SecretKey
    wrapped: bytes
    kek_id: str
    request_id: str


@dataclass(frozen=True, slots=True)
class UnwrappedDataKey:
    """A DEK recovered from its wrapped form."""

    plaintext: SecretKey
    request_id: str


@dataclass(frozen=True, slots=True)
class RewrappedDataKey:
    """A DEK re-wrapped under another KEK, without the plaintext leaving the KMS."""

    wrapped: bytes
    kek_id: str
    request_id: str


def check_context(context: object) -> Mapping[str, str]:
    """`context` if it is a mapping of str to str; `TypeError` otherwise."""
    if not isinstance(context, Mapping):
        raise TypeError(f"context must be a mapping of str to str, not {type(context).__name__}")
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"context must map str to str, got {type(key).__name__} -> {type(value).__name__}")
    return context


@runtime_checkable
class KmsBackend(Protocol):
    """Generate, unwrap and rewrap data keys under KEKs.

    A backend that subclasses it explicitly inherits `rewrap` and
    implements `_rewrap(wrapped, source, destination)` (each a `BoundKek`).
    """

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> GeneratedDataKey:
        """Make a new random 32-byte DEK wrapped under `kek_id`, bound to `context`."""
        ...

    def decrypt(self, kek_id: str, wrapped: bytes, context: Mapping[str, str]) -> UnwrappedDataKey:
        """Unwrap `wrapped`; `DecryptionError` if it or `context` does not authenticate."""
        ...

    def rewrap(
        self,
        wrapped: bytes,
        *,
        source_kek_id: str,
        source_context: Mapping[str, str],
        destination_kek_id: str,
        destination_context: Mapping[str, str],
    ) -> RewrappedDataKey:
        """Re-wrap a DEK under `destination_kek_id` (AWS ReEncrypt)."""
        source, destination = (source_kek_id, source_context), (destination_kek_id, destination_context)
        return self._rewrap(wrapped, source, destination)  # type: ignore[attr-defined]


# Moved to keyturn.kms.decorators (the one module of KMS wrappers); importable from here as before.
from keyturn.kms.decorators import CountingKms, KmsCallLog  # noqa: E402
