"""The key home: one directory holding everything the embedded defaults need.

    <home>/config.yaml      keyturn.config (paths inside are relative to <home>)
    <home>/root.key         32 random bytes, mode 0600: the LocalKms root key
    <home>/keystore.json    LocalKms keystore (KEKs sealed under the root key)
    <home>/registry.sqlite  SqliteKeyRegistry (key versions and their states)
    <home>/audit.log        AuditChain: hash-chained control-plane events

`KeyHome.init(path)` creates a home with KEK ``kek-0001`` registered as
version 1 (active), and records that first version in the audit log as a
``rotate`` event from no version to 1 (the log then starts with who created
the first key, when and why). It refuses to touch a directory that already
holds any of these files.

`KeyHome.open(path)` loads the config and checks, with one clear error per
problem, that the keystore opens with its root key, that the registry is
valid and not empty, and that every readable version's KEK is in the
keystore. The home itself holds no open clients: `.kms()`, `.registry()`
and `.chain()` build fresh ones, and `.key_source()` is the picklable
recipe Beam DoFns take to their workers.

The default home is ``$KEYTURN_HOME`` or ``./.keyturn`` (`default_home`).

The audit log is anchored in the key registry (`KeyHome.chain`): each
control-plane entry moves the registry's (seq, hash) anchor forward, and
`keyturn audit verify` checks that the log still reaches it.

Two kinds of home:

- **local** (the embedded, single-node default): provider ``local``,
  storage ``sqlite``, audit sink ``file``: every file above.
- **AWS** (`KeyHome.init(..., provider="aws_kms", key_id=...)`): provider
  ``aws_kms`` with the registry in DynamoDB (``registry_table``; the table
  is created if missing) or, single-node, in ``registry.sqlite``. The home
  holds only ``config.yaml`` and ``audit.log`` (plus ``registry.sqlite`` for
  a SQLite registry): no key material. Init checks the key with DescribeKey
  (enabled, symmetric) and registers it as version 1; opening the home
  reads the registry but makes no KMS call. Rotation supports both AWS
  models (`KeyHome.provisioner`): a new KMS key per version
  (``new_key=``), or on-demand rotation of the active key's material
  (RotateKeyOnDemand) with the registry's next version naming the same key.
  With ``audit.sink: cloudwatch`` control-plane events go to CloudWatch
  Logs as well; the hash-chained ``audit.log`` always stays in the home.

`KeyHome.lake(uri)` opens a lake with the config's ``lake`` section (the S3
endpoint and region of ``s3://`` lakes; see `keyturn.lake.s3`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from datetime import datetime
from typing import Any

from keyturn.fsutil import write_file_atomically
from keyturn.audit.chain import AuditChain
from keyturn.audit.events import AuditAction, build_event, utc_now
from keyturn.config import KeyturnConfig, dump_config, load_config, map_paths, parse_config, resolve_paths
from keyturn.errors import (
    AuditSinkError,
    ConcurrentModificationError,
    ConfigError,
    HomeError,
    KeystoreError,
    KmsError,
    RegistryError,
)
from keyturn.keysource import KeySource, key_source_from_config
from keyturn.lake.layout import Lake
from keyturn.lake.s3 import S3Settings
from keyturn.kms.local import LocalKms, generate_root_key_file
from keyturn.policy import KeyPolicy
from keyturn.registry.base import KeyRegistry, KeyVersion
from keyturn.registry.sqlite import SqliteKeyRegistry
from keyturn.rotation import CONTROL_PLANE_PARTITION, kek_id_for

__all__ = ["KeyHome", "default_home", "lake_of", "HOME_ENV", "DEFAULT_HOME", "CONFIG_NAME", "HOME_FILES"]

HOME_ENV = "KEYTURN_HOME"
DEFAULT_HOME = ".keyturn"
CONFIG_NAME = "config.yaml"
ROOT_KEY_NAME = "root.key"
KEYSTORE_NAME = "keystore.json"
REGISTRY_NAME = "registry.sqlite"
AUDIT_NAME = "audit.log"
HOME_FILES = (CONFIG_NAME, ROOT_KEY_NAME, KEYSTORE_NAME, REGISTRY_NAME, AUDIT_NAME)


def default_home() -> str:
    """``$KEYTURN_HOME`` if set and non-empty, else ``./.keyturn``."""
    return os.environ.get(HOME_ENV) or DEFAULT_HOME


class KeyHome:
    """An opened key home; build it with `KeyHome.open` or `KeyHome.init`."""

    def __init__(self, path: str, config: KeyturnConfig, *, clock: Callable[[], datetime] = utc_now) -> None:
        self.path = os.path.abspath(path)
        self.config = config
        self.clock = clock

    def __repr__(self) -> str:
        return f"KeyHome({self.path!r}, dataset={self.dataset!r})"

    # ------------------------------------------------------------------ creating

    @classmethod
    def init(
        cls,
        path: str | os.PathLike[str],
        *,
        dataset: str = "default",
        rotation_interval_days: int | None = None,
        provider: str = "local",
        key_id: str | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        registry_table: str | None = None,
        log_group: str | None = None,
        log_stream: str | None = None,
        s3_endpoint_url: str | None = None,
        s3_region: str | None = None,
        actor: str = "keyturn",
        reason: str = "keyturn init: first key version",
        clock: Callable[[], datetime] = utc_now,
    ) -> KeyHome:
        """Create a new home at `path`; `HomeError` if it already holds any home file.

        ``provider="aws_kms"`` (with `key_id`, optional `region`, KMS
        `endpoint_url`, DynamoDB `registry_table`, CloudWatch `log_group`)
        makes an AWS home; see the module docstring.
        """
        home = os.path.abspath(os.fspath(path))
        if os.path.lexists(home) and not os.path.isdir(home):
            raise HomeError(f"cannot create a key home at {home!r}: it exists and is not a directory")
        present = [name for name in HOME_FILES if os.path.lexists(os.path.join(home, name))]
        if present:
            raise HomeError(
                f"{home!r} already holds a key home ({', '.join(present)}); refusing to overwrite keys. "
                "Use it, or pick another --home"
            )
        aws = provider == "aws_kms"
        overrides: dict[str, Any] = {"dataset": dataset}
        if aws:
            cmk = {"provider": "aws_kms", "key_id": key_id, "region": region, "endpoint_url": endpoint_url}
            overrides["key_hierarchy"] = {"cmk": {k: v for k, v in cmk.items() if v is not None}}
            if registry_table is not None:
                overrides["version_tracking"] = {"storage": "dynamodb", "table": registry_table}
        else:
            aws_only = {"key_id": key_id, "region": region, "endpoint_url": endpoint_url,
                        "registry_table": registry_table}
            given = [name for name, value in aws_only.items() if value is not None]
            if provider != "local":
                raise ConfigError("key_hierarchy.cmk.provider", f"must be 'local' or 'aws_kms', got {provider!r}")
            if given:
                raise ConfigError("key_hierarchy.cmk.provider", f"{', '.join(given)} need provider 'aws_kms'")
            overrides["key_hierarchy"] = {"cmk": {"root_key_file": ROOT_KEY_NAME}}
        if log_group is not None or log_stream is not None:
            overrides["audit"] = {"sink": "cloudwatch", "log_group": log_group, "log_stream": log_stream}
        if s3_endpoint_url is not None or s3_region is not None:
            overrides["lake"] = {k: v for k, v in (("s3_endpoint_url", s3_endpoint_url), ("s3_region", s3_region)) if v}
        if rotation_interval_days is not None:
            overrides["key_hierarchy"]["rotation_interval_days"] = rotation_interval_days
        config = parse_config(overrides)  # ConfigError names the bad option before anything is written
        os.makedirs(home, mode=0o700, exist_ok=True)
        config = resolve_paths(config, home)

        if aws:
            first, fresh = cls._init_aws_registry(home, config, actor=actor, reason=reason, clock=clock)
        else:
            key_file = generate_root_key_file(os.path.join(home, ROOT_KEY_NAME))
            kek_id = kek_id_for(1)
            with LocalKms.create(os.path.join(home, KEYSTORE_NAME), key_file=key_file) as kms:
                kms.create_kek(kek_id)
            first = SqliteKeyRegistry(os.path.join(home, REGISTRY_NAME), clock=clock).initialize(
                kek_id, actor=actor, reason=reason
            )
            fresh = True
        chain = AuditChain(config.audit.path, anchor=_registry_for(config, clock))  # anchored from the first entry
        if fresh or chain.head() is None:
            event = build_event(
                AuditAction.ROTATE,
                actor=actor,
                reason=reason,
                dataset=config.dataset,
                partition=CONTROL_PLANE_PARTITION,
                version_from=None,
                version_to=first.version,
                counts={},
                scope_key=f"init:{first.version}",
                clock=clock,
            )
            chain.append(event)
            if config.audit.sink == "cloudwatch":
                _send_to_sink(config, [event])
        # The config goes last: a home interrupted mid-init has no config and `open` says so.
        text = _config_header() + dump_config(_relative(config, home))
        write_file_atomically(os.path.join(home, CONFIG_NAME), text.encode("utf-8"), mode=0o644, exclusive=True)
        return cls.open(home, clock=clock)

    @staticmethod
    def _init_aws_registry(
        home: str, config: KeyturnConfig, *, actor: str, reason: str, clock: Callable[[], datetime]
    ) -> tuple[KeyVersion, bool]:
        """Create the table if missing, check the key, register it as version 1; (version 1, newly made?).

        A registry that already holds exactly version 1 on the same key (an
        init interrupted before the config was written) is adopted; any
        other non-empty registry is refused.
        """
        cmk = config.key_hierarchy.cmk
        assert cmk.key_id is not None
        if config.version_tracking.storage == "dynamodb":
            from keyturn.aws.dynamodb_registry import create_table

            assert config.version_tracking.table is not None
            create_table(config.version_tracking.table, region=cmk.region)
        keys = key_source_from_config(config, home)
        with keys.open_kms() as kms:
            kms.check_usable(cmk.key_id)  # DescribeKey: enabled, symmetric encryption key
        registry = _registry_for(config, clock)
        existing = registry.versions()
        if existing:
            if len(existing) == 1 and existing[0].version == 1 and existing[0].kek_id == cmk.key_id:
                return existing[0], False
            where = (f"DynamoDB table {config.version_tracking.table!r}" if config.version_tracking.storage == "dynamodb"
                     else repr(config.version_tracking.path))
            raise HomeError(
                f"the key registry in {where} already holds {len(existing)} key version(s); "
                "refusing to start a new history there. Use another table, or copy the existing home's config.yaml"
            )
        return registry.initialize(cmk.key_id, actor=actor, reason=reason), True

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, clock: Callable[[], datetime] = utc_now, check_keys: bool = True
    ) -> KeyHome:
        """Open and validate the home at `path`; one `HomeError`, `ConfigError`, `KmsError` or `RegistryError`.

        `check_keys=False` loads only the config (enough to verify the audit log of a home whose
        keystore or registry is damaged).
        """
        home = os.path.abspath(os.fspath(path))
        if not os.path.isdir(home):
            raise HomeError(f"no key home at {home!r}; run `keyturn init` (or pass --home / set {HOME_ENV})")
        config_path = os.path.join(home, CONFIG_NAME)
        if not os.path.isfile(config_path):
            others = [n for n in HOME_FILES if os.path.lexists(os.path.join(home, n))]
            if others:
                raise HomeError(
                    f"key home {home!r} is incomplete: {CONFIG_NAME} is missing (an interrupted init?); "
                    "move the directory aside and run `keyturn init` again"
                )
            raise HomeError(f"no key home at {home!r} ({CONFIG_NAME} not found); run `keyturn init`")
        config = load_config(config_path)
        self = cls(home, config, clock=clock)
        if check_keys:
            self._validate()
        return self

    def _validate(self) -> None:
        cfg = self.config
        if cfg.audit.sink not in ("file", "cloudwatch"):
            raise ConfigError(
                "audit.sink", "the key home keeps control-plane events in a file; set sink to 'file' (or 'cloudwatch' as well)"
            )
        if not os.path.isfile(cfg.audit.path):
            raise HomeError(f"key home {self.path!r}: audit log {cfg.audit.path!r} is missing")
        if cfg.version_tracking.storage == "sqlite" and not os.path.isfile(cfg.version_tracking.path):
            raise HomeError(f"key home {self.path!r}: registry {cfg.version_tracking.path!r} is missing")
        if self.is_aws:
            versions = self.registry().check()  # reads the registry; no KMS call
            if not versions:
                raise RegistryError("the key registry is empty; the home was not initialised (run `keyturn init`)")
            return
        cmk = cfg.key_hierarchy.cmk
        if cfg.version_tracking.storage != "sqlite":
            raise ConfigError("version_tracking.storage", "dynamodb needs key_hierarchy.cmk.provider 'aws_kms'")
        if not os.path.isfile(cmk.keystore):
            raise HomeError(f"key home {self.path!r}: keystore {cmk.keystore!r} is missing")
        if cmk.root_key_file is not None:
            try:
                mode = stat.S_IMODE(os.stat(cmk.root_key_file).st_mode)
            except FileNotFoundError:
                raise HomeError(f"key home {self.path!r}: root key file {cmk.root_key_file!r} is missing") from None
            if mode & 0o077:
                raise HomeError(
                    f"root key file {cmk.root_key_file!r} has mode {mode:04o}; it must be 0600 (chmod 600 it)"
                )
        versions = self.registry().check()
        if not versions:
            raise RegistryError(f"key registry {cfg.version_tracking.path!r} is empty; the home was not initialised")
        try:
            kms = self.kms()
        except ValueError as exc:  # no passphrase in the environment
            raise HomeError(str(exc)) from None
        with kms:
            missing = [v.kek_id for v in versions if v.state.readable and not kms.has_kek(v.kek_id)]
        if missing:
            raise KeystoreError(f"keystore {cmk.keystore!r} lacks KEK(s) the registry needs: {', '.join(missing)}")

    # ------------------------------------------------------------------ parts

    @property
    def dataset(self) -> str:
        """The dataset name bound into every ciphertext."""
        return self.config.dataset

    @property
    def is_aws(self) -> bool:
        """True for a home on AWS KMS."""
        return self.config.key_hierarchy.cmk.provider == "aws_kms"

    def key_source(self) -> KeySource:
        """A picklable recipe for the KMS and registry, for Beam DoFns (`key_source_from_config`)."""
        return key_source_from_config(self.config, self.path)

    def kms(self) -> Any:
        """A freshly opened KMS backend (LocalKms or AwsKms); close it (or use `with`) when done."""
        return self.key_source().open_kms()

    def registry(self) -> KeyRegistry:
        """The key registry (SQLite or DynamoDB) on this home's clock; cheap to build."""
        return _registry_for(self.config, self.clock)

    def chain(self) -> Any:
        """The control-plane audit log: the hash-chained file, anchored in the key registry, mirrored to CloudWatch when configured.

        Every control-plane append (rotate, retire, schedule-deletion, rewrap,
        contract changes, init) goes through here, so each one moves the
        registry's audit anchor (see `keyturn.audit.chain`), and every
        verify, `entries()` and `head()` checks that the log still reaches it.
        """
        if self.config.version_tracking.storage == "sqlite" and not os.path.isfile(self.config.version_tracking.path):
            raise HomeError(
                f"key home {self.path!r}: registry {self.config.version_tracking.path!r} is missing; "
                "it holds the audit log's anchor, so the log cannot be checked without it"
            )
        chain = AuditChain(self.config.audit.path, anchor=self.registry())
        if self.config.audit.sink == "cloudwatch":
            return MirroredChain(chain, self.config)
        return chain

    def policy(self) -> KeyPolicy:
        """A snapshot of the registry for readers and rewriters."""
        return KeyPolicy.from_registry(self.registry())

    def lake(self, uri: str | os.PathLike[str] | Lake, *, s3_endpoint_url: str | None = None) -> Lake:
        """The lake at `uri`; an ``s3://`` lake reaches S3 at `s3_endpoint_url`, else the config's ``lake`` section.

        With neither, the AWS endpoint variables apply (see `keyturn.lake.s3`).
        """
        if isinstance(uri, Lake):
            return uri
        uri = os.fspath(uri)
        if not uri.startswith("s3://"):
            return Lake(uri)
        section = self.config.lake
        url = s3_endpoint_url or section.s3_endpoint_url
        if url is not None:
            settings = S3Settings.from_endpoint_url(url.rstrip("/"), region=section.s3_region)
        else:
            settings = S3Settings.from_environment(region=section.s3_region)
        return Lake(uri, s3=settings, lock_options={"lease_seconds": section.lock_lease_seconds})

    def provisioner(self, new_key: str | None = None) -> Callable[[int], str]:
        """The `provision_kek(version)` a rotation uses.

        Local: a fresh KEK in the keystore (`provision_kek`). AWS: `new_key`
        (checked usable with DescribeKey) for the new-key-per-version model,
        or, without it, RotateKeyOnDemand on the active version's key and the
        same key id for the new version (the KMS-rotation model).
        """
        if not self.is_aws:
            if new_key is not None:
                raise ConfigError("key_hierarchy.cmk.provider", "--new-key needs provider 'aws_kms'; a local home makes its own KEKs")
            return self.provision_kek

        def provision(_version: int) -> str:
            with self.kms() as kms:
                if new_key is not None:
                    kms.check_usable(new_key)
                    return new_key
                current = self.registry().active().kek_id
                kms.rotate_key_material(current)
                return current

        return provision

    def provision_kek(self, version: int) -> str:
        """Create the KEK for key `version` (``kek-000N``) and return its id.

        A KEK left behind by a rotation that failed before the registry
        changed is unused by any version; it is reused rather than refused.
        """
        if self.is_aws:
            raise KmsError("an AWS home does not create KMS keys; rotate with --new-key KEY or on-demand rotation")
        kek_id = kek_id_for(version)
        with self.kms() as kms:
            if not kms.has_kek(kek_id):
                try:
                    return kms.create_kek(kek_id)
                except ValueError:  # a concurrent rotation created it first: the registry decides below
                    if not kms.has_kek(kek_id):
                        raise
        users: list[KeyVersion] = [v for v in self.registry().versions() if v.kek_id == kek_id]
        if users:
            raise ConcurrentModificationError(
                f"KEK {kek_id!r} already protects key version {users[0].version} (another rotation got there first); "
                "nothing was changed"
            )
        return kek_id


class MirroredChain:
    """The home's `AuditChain`, with each appended event also sent to CloudWatch Logs.

    The file is written first (it is the record the rotation checks); a
    failed delivery raises `AuditSinkError` saying the event is in the file.
    """

    def __init__(self, chain: AuditChain, config: KeyturnConfig) -> None:
        self.chain = chain
        self.config = config
        self.path = chain.path

    def head(self) -> Any:
        return self.chain.head()

    def entries(self) -> Any:
        return self.chain.entries()

    def verify(self, **kwargs: Any) -> Any:
        return self.chain.verify(**kwargs)

    @property
    def anchored_in(self) -> Any:
        return self.chain.anchored_in

    def append(self, event: Any) -> int:
        seq = self.chain.append(event)
        _send_to_sink(self.config, [event])
        return seq


def _send_to_sink(config: KeyturnConfig, events: list[Any]) -> int:
    """Deliver audit events (AuditEvents or their dicts) to the configured CloudWatch sink; returns how many."""
    if not events:
        return 0
    from keyturn.aws.cloudwatch_sink import CloudWatchAuditSink

    sink = CloudWatchAuditSink.from_config(config)
    try:
        sink.extend(events)
        sink.flush()
    except AuditSinkError as exc:
        raise AuditSinkError(
            f"{len(events)} audit event(s) were recorded but not delivered to CloudWatch Logs: {exc}"
        ) from exc
    finally:
        try:
            sink.close()
        except AuditSinkError:
            pass
    return len(events)


def forward_audit(home: KeyHome, events: list[Any]) -> int:
    """Send a pipeline run's audit events to CloudWatch when the home's config says so; returns how many."""
    if home.config.audit.sink != "cloudwatch":
        return 0
    return _send_to_sink(home.config, events)


def _registry_for(config: KeyturnConfig, clock: Callable[[], datetime]) -> KeyRegistry:
    if config.version_tracking.storage == "dynamodb":
        from keyturn.aws.dynamodb_registry import DynamoDbKeyRegistry

        assert config.version_tracking.table is not None
        return DynamoDbKeyRegistry(config.version_tracking.table, region=config.key_hierarchy.cmk.region, clock=clock)
    return SqliteKeyRegistry(config.version_tracking.path, clock=clock)


def _relative(config: KeyturnConfig, home: str) -> KeyturnConfig:
    """`config` with paths inside `home` written relative to it (the config file lives there)."""

    def rel(p: str | None) -> str | None:
        if p is None or not os.path.isabs(p):
            return p
        r = os.path.relpath(p, home)
        return p if r.startswith("..") else r

    return map_paths(config, rel)


def lake_of(lake: str | os.PathLike[str] | Lake, home: Any = None) -> Lake:
    """`lake` as a `Lake`: itself, else opened by the key home (its ``lake`` section for S3), else `Lake(lake)`."""
    if isinstance(lake, Lake):
        return lake
    if home is not None and hasattr(home, "lake"):
        return home.lake(lake)
    return Lake(lake)


def _config_header() -> str:
    return (
        "# keyturn key home configuration (written by `keyturn init`).\n"
        "# Relative paths are relative to this file's directory. Every field is\n"
        "# explained in docs/config.example.yaml of the keyturn sources.\n"
    )
