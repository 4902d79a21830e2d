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

from keyturn.config import KeyturnConfig, resolve_paths
from keyturn.errors import ConfigError
from keyturn.kms.base import KmsBackend
from keyturn.kms.decorators import DEFAULT_REQUESTS_PER_SECOND, RateLimitedKms, TokenBucket, process_bucket
from keyturn.kms.local import LocalKms
from keyturn.registry.base import KeyRegistry
from keyturn.registry.sqlite import SqliteKeyRegistry

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

    `max_requests_per_second` (default 50, the config's default; None for no
    limit) is enforced per process: every `LocalKms` opened in the process
    on the same keystore takes one token per generate/decrypt/rewrap from
    one shared bucket (`keyturn.kms.decorators`).
    """

    keystore: str
    registry: str
    key_file: str | None = None
    passphrase_env: str | None = None
    max_requests_per_second: float | None = DEFAULT_REQUESTS_PER_SECOND

    def __post_init__(self) -> None:
        if (self.key_file is None) == (self.passphrase_env is None):
            raise ValueError("give exactly one of key_file or passphrase_env")
        if self.max_requests_per_second is not None:
            TokenBucket(self.max_requests_per_second)  # ValueError unless a finite number > 0

    @property
    def kms_name(self) -> str:
        """Which KMS this is, for `process_bucket`: the keystore's absolute path."""
        return f"local-kms {os.path.abspath(self.keystore)}"

    def open_kms(self) -> KmsBackend:
        """The keystore's `LocalKms`, behind the process's shared rate limit (a `RateLimitedKms`)."""
        if self.key_file is not None:
            kms = LocalKms.open(self.keystore, key_file=self.key_file)
        else:
            passphrase = os.environ.get(self.passphrase_env or "")
            if not passphrase:
                raise ValueError(f"environment variable {self.passphrase_env} holds no keystore passphrase")
            kms = LocalKms.open(self.keystore, passphrase=passphrase)
        rate = self.max_requests_per_second
        if rate is None:
            return kms
        return RateLimitedKms(kms, process_bucket(self.kms_name, rate))

    def open_registry(self) -> KeyRegistry:
        return SqliteKeyRegistry(self.registry)


def key_source_from_config(cfg: KeyturnConfig, home_dir: str | os.PathLike[str]) -> KeySource:
    """The key source a validated config describes; relative paths resolve against `home_dir`.

    Both carry ``lifecycle.max_kms_requests_per_second``, which their
    ``open_kms()`` enforces once per process (see `keyturn.kms.decorators`).
    Provider ``local`` gives a `LocalKeySource` (keystore + SQLite registry).
    Provider ``aws_kms`` gives a `keyturn.aws.AwsKeySource`: KMS key
    `key_id` in `region` (endpoint `endpoint_url`) and the registry in
    DynamoDB table ``version_tracking.table`` or the SQLite file
    ``version_tracking.path``. A DynamoDB registry with the single-node local
    keystore is refused (`ConfigError`).
    """
    cfg = resolve_paths(cfg, home_dir)
    cmk = cfg.key_hierarchy.cmk
    tracking = cfg.version_tracking
    if cmk.provider == "local":
        if tracking.storage != "sqlite":
            raise ConfigError(
                "version_tracking.storage",
                "dynamodb needs key_hierarchy.cmk.provider 'aws_kms' (the local keystore is single-node)",
            )
        rate = cfg.lifecycle.max_kms_requests_per_second
        if cmk.root_key_file is not None:
            return LocalKeySource(cmk.keystore, tracking.path, key_file=cmk.root_key_file, max_requests_per_second=rate)
        return LocalKeySource(cmk.keystore, tracking.path, passphrase_env=cmk.passphrase_env, max_requests_per_second=rate)

    from keyturn.aws.keysource import AwsKeySource  # the AWS backends (boto3) load only for an AWS config

    dynamodb = tracking.storage == "dynamodb"
    return AwsKeySource(
        region=cmk.region,
        endpoint_url=cmk.endpoint_url,
        key_id=cmk.key_id,
        registry_table=tracking.table if dynamodb else None,
        registry_path=None if dynamodb else tracking.path,
        max_requests_per_second=cfg.lifecycle.max_kms_requests_per_second,
    )
