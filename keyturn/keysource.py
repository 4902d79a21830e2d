"""Where a worker gets its KMS and key registry: a picklable recipe, never a key.

Beam ships DoFns to workers by pickling them, so a DoFn holds a `KeySource`
and calls it in `setup()`. A key source holds paths and names only; secrets
(a passphrase) are read from the environment on the worker, and KEKs stay in
the KMS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from keyturn.errors import ConfigError
from keyturn.kms.base import KmsBackend
from keyturn.registry.base import KeyRegistry

if TYPE_CHECKING:
    from keyturn.config import KeyturnConfig

__all__ = ["KeySource", "LocalKeySource", "key_source_from_config"]


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


def key_source_from_config(cfg: KeyturnConfig, home_dir: str | os.PathLike[str]) -> KeySource:
    """The key source a validated config describes; relative paths resolve against `home_dir`.

    Provider ``local`` gives a `LocalKeySource` (keystore + SQLite registry).
    Provider ``aws_kms`` gives a `keyturn.aws.AwsKeySource`: KMS key
    `key_id` in `region` (endpoint `endpoint_url`, limited to
    ``lifecycle.max_kms_requests_per_second`` per worker) and the registry in
    DynamoDB table ``version_tracking.table`` or the SQLite file
    ``version_tracking.path``. A DynamoDB registry with the single-node local
    keystore is refused (`ConfigError`).
    """
    from keyturn.config import resolve_paths

    cfg = resolve_paths(cfg, home_dir)
    cmk = cfg.key_hierarchy.cmk
    tracking = cfg.version_tracking
    if cmk.provider == "local":
        if tracking.storage != "sqlite":
            raise ConfigError(
                "version_tracking.storage",
                "dynamodb needs key_hierarchy.cmk.provider 'aws_kms' (the local keystore is single-node)",
            )
        if cmk.root_key_file is not None:
            return LocalKeySource(cmk.keystore, tracking.path, key_file=cmk.root_key_file)
        return LocalKeySource(cmk.keystore, tracking.path, passphrase_env=cmk.passphrase_env)

    from keyturn.aws.keysource import AwsKeySource

    dynamodb = tracking.storage == "dynamodb"
    return AwsKeySource(
        region=cmk.region,
        endpoint_url=cmk.endpoint_url,
        key_id=cmk.key_id,
        registry_table=tracking.table if dynamodb else None,
        registry_path=None if dynamodb else tracking.path,
        max_requests_per_second=cfg.lifecycle.max_kms_requests_per_second,
    )
