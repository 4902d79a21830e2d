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
This module is the embedded, single-node setup: provider ``local``, storage
``sqlite`` and audit sink ``file``; other providers come with the AWS
backends.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from datetime import datetime

from keyturn.audit.chain import AuditChain
from keyturn.audit.events import AuditAction, build_event, utc_now
from keyturn.config import KeyturnConfig, dump_config, load_config, parse_config
from keyturn.errors import ConfigError, HomeError, KeystoreError, KmsError, RegistryError
from keyturn.keysource import LocalKeySource
from keyturn.kms.local import LocalKms, generate_root_key_file
from keyturn.policy import KeyPolicy
from keyturn.registry.base import KeyVersion
from keyturn.registry.sqlite import SqliteKeyRegistry
from keyturn.rotation import CONTROL_PLANE_PARTITION, kek_id_for

__all__ = ["KeyHome", "default_home", "HOME_ENV", "DEFAULT_HOME", "CONFIG_NAME", "HOME_FILES"]

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


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: str, text: str, mode: int = 0o644) -> None:
    """Create `path` (refusing to overwrite), write `text`, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


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
        actor: str = "keyturn",
        reason: str = "keyturn init: first key version",
        clock: Callable[[], datetime] = utc_now,
    ) -> KeyHome:
        """Create a new home at `path`; `HomeError` if it already holds any home file."""
        home = os.path.abspath(os.fspath(path))
        if os.path.lexists(home) and not os.path.isdir(home):
            raise HomeError(f"cannot create a key home at {home!r}: it exists and is not a directory")
        present = [name for name in HOME_FILES if os.path.lexists(os.path.join(home, name))]
        if present:
            raise HomeError(
                f"{home!r} already holds a key home ({', '.join(present)}); refusing to overwrite keys. "
                "Use it, or pick another --home"
            )
        overrides: dict[str, object] = {
            "dataset": dataset,
            "key_hierarchy": {"cmk": {"root_key_file": ROOT_KEY_NAME}},
        }
        if rotation_interval_days is not None:
            overrides["key_hierarchy"]["rotation_interval_days"] = rotation_interval_days  # type: ignore[index]
        config = parse_config(overrides)  # ConfigError names the bad option before anything is written
        os.makedirs(home, mode=0o700, exist_ok=True)

        key_file = generate_root_key_file(os.path.join(home, ROOT_KEY_NAME))
        kek_id = kek_id_for(1)
        with LocalKms.create(os.path.join(home, KEYSTORE_NAME), key_file=key_file) as kms:
            kms.create_kek(kek_id)
        first = SqliteKeyRegistry(os.path.join(home, REGISTRY_NAME), clock=clock).initialize(
            kek_id, actor=actor, reason=reason
        )
        AuditChain(os.path.join(home, AUDIT_NAME)).append(
            build_event(
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
        )
        # The config goes last: a home interrupted mid-init has no config and `open` says so.
        _write_new(os.path.join(home, CONFIG_NAME), _config_header() + dump_config(config))
        _fsync_dir(home)
        return cls.open(home, clock=clock)

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
        cmk = cfg.key_hierarchy.cmk
        if cmk.provider != "local":
            raise ConfigError("key_hierarchy.cmk.provider", "this keyturn CLI supports only 'local' for now")
        if cfg.version_tracking.storage != "sqlite":
            raise ConfigError("version_tracking.storage", "this keyturn CLI supports only 'sqlite' for now")
        if cfg.audit.sink != "file":
            raise ConfigError("audit.sink", "the key home keeps control-plane events in a file; set sink to 'file'")
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
        if not os.path.isfile(cfg.version_tracking.path):
            raise HomeError(f"key home {self.path!r}: registry {cfg.version_tracking.path!r} is missing")
        if not os.path.isfile(cfg.audit.path):
            raise HomeError(f"key home {self.path!r}: audit log {cfg.audit.path!r} is missing")
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

    def key_source(self) -> LocalKeySource:
        """A picklable recipe for the KMS and registry, for Beam DoFns."""
        cmk = self.config.key_hierarchy.cmk
        if cmk.root_key_file is not None:
            return LocalKeySource(cmk.keystore, self.config.version_tracking.path, key_file=cmk.root_key_file)
        return LocalKeySource(cmk.keystore, self.config.version_tracking.path, passphrase_env=cmk.passphrase_env)

    def kms(self) -> LocalKms:
        """A freshly opened LocalKms; close it (or use `with`) when done."""
        kms = self.key_source().open_kms()
        assert isinstance(kms, LocalKms)
        return kms

    def registry(self) -> SqliteKeyRegistry:
        """The key registry (opens a connection per call; cheap to build)."""
        return SqliteKeyRegistry(self.config.version_tracking.path, clock=self.clock)

    def chain(self) -> AuditChain:
        """The hash-chained control-plane audit log."""
        return AuditChain(self.config.audit.path)

    def policy(self) -> KeyPolicy:
        """A snapshot of the registry for readers and rewriters."""
        return KeyPolicy.from_registry(self.registry())

    def provision_kek(self, version: int) -> str:
        """Create the KEK for key `version` (``kek-000N``) and return its id.

        A KEK left behind by a rotation that failed before the registry
        changed is unused by any version; it is reused rather than refused.
        """
        kek_id = kek_id_for(version)
        with self.kms() as kms:
            if not kms.has_kek(kek_id):
                return kms.create_kek(kek_id)
        users: list[KeyVersion] = [v for v in self.registry().versions() if v.kek_id == kek_id]
        if users:
            raise KmsError(f"KEK {kek_id!r} already protects key version {users[0].version}; refusing to reuse it")
        return kek_id


def _config_header() -> str:
    return (
        "# keyturn key home configuration (written by `keyturn init`).\n"
        "# Relative paths are relative to this file's directory. Every field is\n"
        "# explained in docs/config.example.yaml of the keyturn sources.\n"
    )
