"""`AwsKeySource`: a picklable recipe for AWS KMS and the key registry, opened on each worker.

Like `keyturn.keysource.LocalKeySource` it holds names and settings only,
never a key or a credential: credentials come from the worker's usual AWS
chain (environment, instance or task role, profile). A Beam DoFn keeps the
source and calls `open_kms()` / `open_registry()` in ``setup()``.

`endpoint_url` and the rate limit apply to KMS. The registry is a DynamoDB
table (`registry_table`, endpoint `registry_endpoint_url`) or, for a
single-node setup, a SQLite file (`registry_path`); give exactly one. An
endpoint left as None is resolved by botocore, which honours the standard
``AWS_ENDPOINT_URL_<SERVICE>`` / ``AWS_ENDPOINT_URL`` variables.

`max_requests_per_second` (default 50, the config's default; None for no
limit) is enforced per process: every `AwsKms` opened in the process for
the same region and endpoint takes its tokens, one per HTTP attempt, from
one shared bucket (`keyturn.kms.decorators.process_bucket`). Divide the
account's KMS quota by the number of worker processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from keyturn.aws.clients import ClientSettings
from keyturn.aws.dynamodb_registry import DynamoDbKeyRegistry
from keyturn.aws.kms import AwsKms, _check_kek_id
from keyturn.kms.decorators import DEFAULT_REQUESTS_PER_SECOND, process_bucket
from keyturn.registry.base import KeyRegistry
from keyturn.registry.sqlite import SqliteKeyRegistry

__all__ = ["AwsKeySource"]


@dataclass(frozen=True)
class AwsKeySource:
    """Builds an `AwsKms` and a DynamoDB (or SQLite) registry on the worker that uses them."""

    region: str | None = None
    endpoint_url: str | None = None
    key_id: str | None = None
    registry_table: str | None = None
    registry_name: str = "default"
    registry_endpoint_url: str | None = None
    registry_path: str | None = None
    max_requests_per_second: float | None = DEFAULT_REQUESTS_PER_SECOND
    max_attempts: int = 5
    connect_timeout: float = 5.0
    read_timeout: float = 30.0

    def __post_init__(self) -> None:
        """Validate eagerly, so a bad recipe fails at pipeline construction, not on a worker."""
        ClientSettings(self.region, self.endpoint_url, self.max_attempts, self.connect_timeout, self.read_timeout)
        ClientSettings(self.region, self.registry_endpoint_url)
        if self.key_id is not None:
            _check_kek_id(self.key_id)
        if (self.registry_table is None) == (self.registry_path is None):
            raise ValueError("give exactly one of registry_table (DynamoDB) or registry_path (SQLite)")
        if self.registry_path is not None and self.registry_endpoint_url is not None:
            raise ValueError("registry_endpoint_url is only used with registry_table")
        rate = self.max_requests_per_second
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0
        ):
            raise ValueError("max_requests_per_second must be a finite number > 0 or None")

    @property
    def kms_name(self) -> str:
        """Which KMS this is, for `process_bucket`: the region and endpoint (None: botocore's default)."""
        return f"aws-kms {self.region} {self.endpoint_url}"

    def _client_options(self) -> dict[str, Any]:
        """The botocore settings both clients share (each has its own endpoint)."""
        return {name: getattr(self, name) for name in ("region", "max_attempts", "connect_timeout", "read_timeout")}

    def open_kms(self) -> AwsKms:
        """A new `AwsKms` on the process's shared rate limit (close it in ``teardown()``)."""
        rate = self.max_requests_per_second
        return AwsKms(
            endpoint_url=self.endpoint_url,
            rate_limiter=None if rate is None else process_bucket(self.kms_name, rate),
            **self._client_options(),
        )

    def open_registry(self) -> KeyRegistry:
        """The key registry: DynamoDB when `registry_table` is set, else the SQLite file."""
        if self.registry_table is not None:
            return DynamoDbKeyRegistry(
                self.registry_table, name=self.registry_name, endpoint_url=self.registry_endpoint_url, **self._client_options()
            )
        assert self.registry_path is not None
        return SqliteKeyRegistry(self.registry_path)
