"""Every error keyturn raises on purpose, in one small tree.

Failures of *data* (bad bytes, wrong key, tampering) all raise one opaque
`DecryptionError`, so an attacker learns nothing about why. Mistakes by the
*caller* raise the built-in `ValueError` or `TypeError` with a helpful
message; the few classes below that subclass `ValueError` are caller-facing
configuration problems.
"""

from __future__ import annotations

__all__ = [
    "KeyturnError",
    "DecryptionError",
    "ConfigError",
    "KmsError",
    "KmsUnavailableError",
    "KmsThrottledError",
    "KmsAccessDeniedError",
    "KmsKeyNotFoundError",
    "KmsClosedError",
    "KeystoreError",
    "RegistryError",
    "RegistryInvariantError",
    "UnknownVersionError",
    "VersionInUseError",
    "InvalidTransitionError",
    "ConcurrentModificationError",
    "ScopeClosedError",
    "AuditChainError",
    "HomeError",
    "LakeError",
    "AccountingError",
    "ElementTypeError",
    "NotAKeyturnLakeError",
    "WrongKeyHomeError",
    "InputError",
    "AuditSinkError",
    "ContractError",
    "DirectoryError",
    "LakeLockedError",
    "LakeLockLostError",
    "VersionMismatchError",
]


class KeyturnError(Exception):
    """Base class of every error keyturn raises on purpose."""


class DecryptionError(KeyturnError):
    """Data failed to parse or authenticate; deliberately says no more."""

    def __init__(self, message: str = "ciphertext could not be decrypted") -> None:
        super().__init__(message)


class ConfigError(KeyturnError, ValueError):
    """A configuration file or value is invalid; `field` names the culprit."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"invalid config at {field!r}: {problem}")


class KmsError(KeyturnError):
    """A KMS operation failed."""


class KmsUnavailableError(KmsError):
    """The KMS could not be reached or kept failing; the call may succeed later."""


class KmsThrottledError(KmsUnavailableError):
    """The KMS throttled the request past the retry budget."""


class KmsAccessDeniedError(KmsError):
    """The KMS refused the key: disabled, pending deletion, or not permitted."""


class KmsKeyNotFoundError(KmsError):
    """The KMS has no key-encryption key with that id."""


class KmsClosedError(KmsError, ValueError):
    """The KMS client was closed: a caller mistake (hence `ValueError`), never a verdict on data."""


class KeystoreError(KmsError):
    """The local keystore file cannot be opened: wrong secret, bad mode, or damage."""


class RegistryError(KeyturnError):
    """A key-registry operation failed."""


class RegistryInvariantError(RegistryError):
    """The registry's stored state breaks an invariant (for example two active versions)."""


class UnknownVersionError(RegistryError):
    """The registry has no such key version."""


class VersionInUseError(RegistryError):
    """A key version still protects data, so it cannot be retired or deleted."""


class InvalidTransitionError(RegistryError, ValueError):
    """The requested state change is not allowed from the version's current state."""


class ConcurrentModificationError(RegistryError):
    """Another writer changed the registry first; re-read and retry."""


class ScopeClosedError(KeyturnError):
    """A DEK scope was used after it was closed."""


class AuditChainError(KeyturnError):
    """A hash-chained audit log failed verification; `index` is the first bad entry."""

    def __init__(self, index: int, problem: str) -> None:
        self.index = index
        self.problem = problem
        super().__init__(f"audit chain broken at entry {index}: {problem}")


class HomeError(KeyturnError):
    """A key home directory is missing, incomplete, or already exists where one would be created."""


class LakeError(KeyturnError):
    """A lake cannot be used as asked: a missing directory, a file that is not keyturn's, a bad layout."""


class LakeLockedError(LakeError):
    """Another keyturn job holds the lake lock; wait for it to finish (or remove a stale lock)."""


class LakeLockLostError(LakeLockedError):
    """An S3 lake lease expired unrenewed and another job took the lake over while this one ran."""


class InputError(KeyturnError, ValueError):
    """Input cannot be used as asked: a missing source or column, an unreadable file, a bad layout."""


class ElementTypeError(InputError, TypeError):
    """A transform was given elements of a type it does not take; the message names the forms it accepts."""


class AuditSinkError(KeyturnError):
    """An audit sink (for example CloudWatch Logs) could not deliver or was refused events."""


class ContractError(InputError):
    """Data or a request breaks the dataset contract the key registry holds (encrypted columns, types, bindings)."""


class DirectoryError(RegistryError):
    """The DEK directory refused an entry or holds one that does not match its envelope."""


class VersionMismatchError(KeyturnError):
    """A reader met rows whose key version is missing or unknown, and the config says ``reject``.

    Raised instead of routing those rows to the version-mismatch side output
    when ``version_tracking.on_missing_version`` / ``on_unknown_version`` is
    ``reject``. `reason` is ``"missing"`` or ``"unknown"`` and `rows` how many
    rows (None when not known, e.g. after Beam re-raised the error). The CLI
    exits with code 3 (data problems found). The message holds counts and
    names only, never row data.
    """

    def __init__(self, message: str, *, reason: str | None = None, rows: int | None = None) -> None:
        self.reason = reason
        self.rows = rows
        super().__init__(message)


class AccountingError(LakeError):
    """The rows written, skipped and quarantined do not add up to the source rows; nothing was committed (exit code 3)."""


class NotAKeyturnLakeError(LakeError):
    """The directory holds data files, but keyturn wrote none of them and the key home knows nothing of it.

    A usage error (exit code 2): `--lake` names plain Parquet, not an
    encrypted lake. See `check_fits_home`.
    """


class WrongKeyHomeError(LakeError):
    """The key home knows none of the lake's DEKs, and the files name another dataset than the home's.

    A usage error (exit code 2): `--home` names the key home of another
    dataset. See `check_fits_home`.
    """
