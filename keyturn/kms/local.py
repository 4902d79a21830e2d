"""`LocalKms`: the embedded KMS. SINGLE-NODE ONLY. NOT A NETWORK SERVICE.

!!! WARNING: this backend is for one machine (development, tests, demos,
!!! single-node batch jobs). Its keystore is a file on local disk guarded by
!!! POSIX file locks; it gives no replication, no access policy, no audit
!!! trail and no rollback protection. Workers on other machines cannot share
!!! it. Use a real KMS (for example AWS KMS) for anything distributed.

Keystore file (JSON, mode 0600, written atomically)::

    {"format": "keyturn-local-kms-keystore", "version": 1,
     "warning": "<the single-node warning>",
     "root":  {"kdf": "scrypt", "salt": b64, "n": 32768, "r": 8, "p": 1}
              or {"kdf": "key-file"},
     "check": {"nonce": b64, "sealed": b64},
     "keks":  {kek_id: {"created_at": "...Z", "enabled": true,
                        "nonce": b64, "sealed": b64}, ...}}

The root key (32 bytes) comes from a passphrase through scrypt or from a key
file of exactly 32 random bytes with mode 0600. `check` is AES-256-GCM(root,
``CHECK_PLAINTEXT``) so a wrong root key is detected at open. Each KEK is 32
random bytes sealed with AES-256-GCM under the root key; its associated data
is ``encode_context({"keyturn:local-kms": "kek", "kek_id": id,
"created_at": created_at, "enabled": "true"|"false"})``, so material moved
to another id, or an edited `enabled`/`created_at`, fails authentication
(`KeystoreError` when that KEK is used). Copying an older keystore file back
(rollback) is not detected.

Wrapped DEK (normative, see docs/FORMAT.md)::

    offset  size  field
    0       1     local wrap version, 0x01 (checked first)
    1       12    nonce (random)
    13      48    AES-256-GCM(KEK, dek) ciphertext (32) || tag (16)

with associated data ``encode_context({"kms:kek": kek_id, **context})``.
Exactly 61 bytes; anything else raises `DecryptionError`. The context key
``kms:kek`` is reserved (`ValueError`).

Key handling in memory: an instance keeps the root key (as an AES-GCM
object, never as a plain attribute) until `close()`. Every operation
re-reads the keystore file (one small read) and re-parses it only if its
bytes changed, so KEKs created, disabled or enabled by another process take
effect on the next call. An AES-GCM object per KEK is built on first use and
kept until the file changes. Plaintext DEKs are never cached.

Writes (`create_kek`, `disable_kek`, `enable_kek`) take an exclusive `fcntl`
lock on the sidecar ``<keystore>.lock`` (never deleted), re-read the file
under the lock, and replace it atomically with
`keyturn.fsutil.write_file_atomically` (temp file in the same directory,
mode 0600, fsync, `os.replace`, fsync of the directory). POSIX only.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from keyturn.fsutil import write_file_atomically
from keyturn.context import encode_context
from keyturn.errors import DecryptionError, KeystoreError, KmsAccessDeniedError, KmsClosedError, KmsKeyNotFoundError
from keyturn.kms.base import BoundKek, GeneratedDataKey, KmsBackend, RewrappedDataKey, UnwrappedDataKey, check_context
from keyturn.secret import SecretKey

__all__ = [
    "LocalKms",
    "generate_root_key_file",
    "WARNING",
    "WRAP_VERSION",
    "WRAPPED_DEK_BYTES",
    "DEFAULT_SCRYPT_N",
    "MIN_SCRYPT_N",
    "MAX_SCRYPT_N",
    "RESERVED_CONTEXT_KEY",
]

WARNING = (
    "SINGLE-NODE ONLY: keyturn LocalKms keystore. For one machine (development, tests, "
    "single-node jobs). No replication, access policy, audit or rollback protection. "
    "Use a real KMS for distributed workers."
)
KEYSTORE_FORMAT = "keyturn-local-kms-keystore"
KEYSTORE_VERSION = 1
CHECK_PLAINTEXT = b"keyturn local-kms root-key check v1"

WRAP_VERSION = 0x01
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
WRAPPED_DEK_BYTES = 1 + NONCE_BYTES + KEY_BYTES + TAG_BYTES  # 61
RESERVED_CONTEXT_KEY = "kms:kek"
MAX_KEK_ID_CHARS = 256

DEFAULT_SCRYPT_N = 2**15
MIN_SCRYPT_N = 2**10  # below the default: for tests only
MAX_SCRYPT_N = 2**20  # caps memory/time a hostile keystore file can demand
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16

_KDF_SCRYPT = "scrypt"
_KDF_KEY_FILE = "key-file"
_CHECK_AAD = encode_context({"keyturn:local-kms": "root-check"})


# --------------------------------------------------------------------------- helpers


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _check_kek_id(kek_id: object) -> str:
    if not isinstance(kek_id, str):
        raise TypeError(f"kek_id must be str, not {type(kek_id).__name__}")
    if not 1 <= len(kek_id) <= MAX_KEK_ID_CHARS:
        raise ValueError(f"kek_id must be 1..{MAX_KEK_ID_CHARS} characters")
    if any(not ch.isprintable() for ch in kek_id):
        raise ValueError("kek_id must not contain control or non-printable characters")
    return kek_id


def _wrap_aad(kek_id: str, context: Mapping[str, str]) -> bytes:
    """Associated data of a wrapped DEK; `TypeError` unless `context` maps str to str."""
    check_context(context)
    if RESERVED_CONTEXT_KEY in context:
        raise ValueError(f"context key {RESERVED_CONTEXT_KEY!r} is reserved for the KEK id")
    return encode_context({RESERVED_CONTEXT_KEY: kek_id, **context})


def _kek_aad(kek_id: str, created_at: str, enabled: bool) -> bytes:
    return encode_context(
        {
            "keyturn:local-kms": "kek",
            "kek_id": kek_id,
            "created_at": created_at,
            "enabled": "true" if enabled else "false",
        }
    )


def _derive_scrypt(passphrase: str | bytes, salt: bytes, n: int, r: int, p: int) -> AESGCM:
    secret = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
    return AESGCM(Scrypt(salt=salt, length=KEY_BYTES, n=n, r=r, p=p).derive(secret))


def _check_secret_args(passphrase: object, key_file: object) -> None:
    if (passphrase is None) == (key_file is None):
        raise ValueError("give exactly one of passphrase= or key_file=")
    if passphrase is not None:
        if not isinstance(passphrase, (str, bytes)):
            raise TypeError(f"passphrase must be str or bytes, not {type(passphrase).__name__}")
        if len(passphrase) == 0:
            raise ValueError("passphrase must not be empty")


def _read_key_file(key_file: str | os.PathLike[str]) -> AESGCM:
    """Root key from a key file: a regular file of exactly 32 bytes with no group/other mode bits."""
    name = os.fspath(key_file)
    try:
        # Symlinks are followed (secret mounts use them); the target itself is checked.
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise KeystoreError(f"cannot read key file {name!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000) == 0o100000:
            raise KeystoreError(f"key file {name!r} is not a regular file")
        if st.st_mode & 0o077:
            raise KeystoreError(
                f"key file {name!r} has mode {st.st_mode & 0o777:04o}; it must not be accessible "
                "by group or others (chmod 600)"
            )
        buf = bytearray(KEY_BYTES + 1)
        got = 0
        while got < len(buf):
            chunk = os.readv(fd, [memoryview(buf)[got:]])
            if chunk == 0:
                break
            got += chunk
        try:
            if got != KEY_BYTES:
                raise KeystoreError(f"key file {name!r} must hold exactly {KEY_BYTES} bytes")
            return AESGCM(bytes(buf[:KEY_BYTES]))
        finally:
            for i in range(len(buf)):
                buf[i] = 0
    finally:
        os.close(fd)


def generate_root_key_file(path: str | os.PathLike[str]) -> str:
    """Write 32 random bytes to a new file with mode 0600, atomically.

    Refuses (`FileExistsError`) to overwrite an existing file: losing a root
    key makes its keystore unreadable. Returns the path.
    """
    name = os.path.abspath(os.fspath(path))
    key = bytearray(os.urandom(KEY_BYTES))
    try:
        write_file_atomically(name, key, mode=0o600, exclusive=True)
    finally:
        for i in range(len(key)):
            key[i] = 0
    return os.fspath(path)


# --------------------------------------------------------------------------- state


class _Kek:
    """One KEK entry: metadata, its sealed material (file mode), and a lazily built AES-GCM."""

    __slots__ = ("created_at", "enabled", "nonce", "sealed", "aead")

    def __init__(
        self,
        created_at: str,
        enabled: bool,
        nonce: bytes | None = None,
        sealed: bytes | None = None,
        aead: AESGCM | None = None,
    ) -> None:
        self.created_at = created_at
        self.enabled = enabled
        self.nonce = nonce
        self.sealed = sealed
        self.aead = aead

    def __repr__(self) -> str:
        return f"_Kek(enabled={self.enabled}, material=<redacted>)"


@dataclass
class _Doc:
    """A parsed keystore file."""

    root: dict[str, Any]
    check_nonce: bytes
    check_sealed: bytes
    keks: dict[str, _Kek]


class _Damaged(Exception):
    pass


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Damaged(f"duplicate key {key!r}")
        out[key] = value
    return out


def _field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in obj:
        raise _Damaged(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Damaged(f"field {key!r} has the wrong type")
    return value


def _b64field(obj: Mapping[str, Any], key: str, size: int) -> bytes:
    try:
        raw = base64.b64decode(_field(obj, key, str), validate=True)
    except (binascii.Error, ValueError):
        raise _Damaged(f"field {key!r} is not base64") from None
    if len(raw) != size:
        raise _Damaged(f"field {key!r} has the wrong length")
    return raw


def _parse(data: bytes) -> _Doc:
    """Parse and structurally validate keystore bytes; `_Damaged` on any problem."""
    try:
        top = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _Damaged("not valid JSON") from None
    if not isinstance(top, dict):
        raise _Damaged("top level is not an object")
    if top.get("format") != KEYSTORE_FORMAT:
        raise _Damaged("not a keyturn local KMS keystore")
    if top.get("version") != KEYSTORE_VERSION or isinstance(top.get("version"), bool):
        raise _Damaged("unsupported keystore version")
    root = _field(top, "root", dict)
    kdf = _field(root, "kdf", str)
    if kdf == _KDF_SCRYPT:
        _b64field(root, "salt", SALT_BYTES)
        n, r, p = _field(root, "n", int), _field(root, "r", int), _field(root, "p", int)
        if not (MIN_SCRYPT_N <= n <= MAX_SCRYPT_N and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
            raise _Damaged("scrypt parameters out of range")
    elif kdf != _KDF_KEY_FILE:
        raise _Damaged("unknown root key kind")
    check = _field(top, "check", dict)
    check_nonce = _b64field(check, "nonce", NONCE_BYTES)
    check_sealed = _b64field(check, "sealed", len(CHECK_PLAINTEXT) + TAG_BYTES)
    keks: dict[str, _Kek] = {}
    for kek_id, entry in _field(top, "keks", dict).items():
        try:
            _check_kek_id(kek_id)
        except ValueError:
            raise _Damaged("invalid KEK id") from None
        if not isinstance(entry, dict):
            raise _Damaged(f"KEK entry {kek_id!r} is not an object")
        keks[kek_id] = _Kek(
            created_at=_field(entry, "created_at", str),
            enabled=_field(entry, "enabled", bool),
            nonce=_b64field(entry, "nonce", NONCE_BYTES),
            sealed=_b64field(entry, "sealed", KEY_BYTES + TAG_BYTES),
        )
    return _Doc(root=root, check_nonce=check_nonce, check_sealed=check_sealed, keks=keks)


def _serialize(doc: _Doc) -> bytes:
    keks = {
        kek_id: {
            "created_at": k.created_at,
            "enabled": k.enabled,
            "nonce": _b64e(k.nonce or b""),
            "sealed": _b64e(k.sealed or b""),
        }
        for kek_id, k in sorted(doc.keks.items())
    }
    top = {
        "format": KEYSTORE_FORMAT,
        "version": KEYSTORE_VERSION,
        "warning": WARNING,
        "root": doc.root,
        "check": {"nonce": _b64e(doc.check_nonce), "sealed": _b64e(doc.check_sealed)},
        "keks": keks,
    }
    return (json.dumps(top, indent=2, sort_keys=False) + "\n").encode("utf-8")


# --------------------------------------------------------------------------- LocalKms


class LocalKms(KmsBackend):
    """Embedded SINGLE-NODE KMS implementing `KmsBackend`; see the module docstring.

    Build with `LocalKms.create`, `LocalKms.open` (same as the constructor)
    or `LocalKms.in_memory`. Thread-safe. Refuses pickling and copying: it
    holds the root key. POSIX only (uses `fcntl`).
    """

    warning = WARNING

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        passphrase: str | bytes | None = None,
        key_file: str | os.PathLike[str] | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """Open the keystore at `path`; `KeystoreError` if it is missing, damaged or the secret is wrong."""
        _check_secret_args(passphrase, key_file)
        name = os.path.abspath(os.fspath(path))
        self._setup(name, random_bytes)
        data = self._read_file()
        try:
            doc = _parse(data)
        except _Damaged as exc:
            raise KeystoreError(f"keystore {name!r} is damaged: {exc}") from None
        kdf = doc.root["kdf"]
        if kdf == _KDF_SCRYPT:
            if passphrase is None:
                raise KeystoreError(f"cannot open keystore {name!r}: it is protected by a passphrase")
            salt = base64.b64decode(doc.root["salt"])
            root = _derive_scrypt(passphrase, salt, doc.root["n"], doc.root["r"], doc.root["p"])
        else:
            if key_file is None:
                raise KeystoreError(f"cannot open keystore {name!r}: it is protected by a key file")
            root = _read_key_file(key_file)
        self._root = root
        self._verify_root(doc)
        self._raw = data
        self._doc = doc

    # ----------------------------------------------------------------- constructors

    def _setup(self, path: str | None, random_bytes: Callable[[int], bytes]) -> None:
        if not callable(random_bytes):
            raise TypeError("random_bytes must be callable")
        self._path = path
        self._random = random_bytes
        self._lock = threading.RLock()
        self._root: AESGCM | None = None
        self._raw: bytes | None = None
        self._doc = _Doc(root={}, check_nonce=b"", check_sealed=b"", keks={})
        self._closed = False

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        passphrase: str | bytes | None = None,
        key_file: str | os.PathLike[str] | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> LocalKms:
        """Open an existing keystore with exactly one of `passphrase` or `key_file`."""
        return cls(path, passphrase=passphrase, key_file=key_file, random_bytes=random_bytes)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        passphrase: str | bytes | None = None,
        key_file: str | os.PathLike[str] | None = None,
        scrypt_n: int = DEFAULT_SCRYPT_N,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> LocalKms:
        """Create a new, empty keystore (mode 0600); `FileExistsError` if `path` exists.

        `scrypt_n` (passphrase mode only) must be a power of two in
        [MIN_SCRYPT_N, MAX_SCRYPT_N]; values below the default are for tests.
        """
        _check_secret_args(passphrase, key_file)
        if isinstance(scrypt_n, bool) or not isinstance(scrypt_n, int):
            raise TypeError("scrypt_n must be int")
        if not (MIN_SCRYPT_N <= scrypt_n <= MAX_SCRYPT_N and scrypt_n & (scrypt_n - 1) == 0):
            raise ValueError(f"scrypt_n must be a power of two in [{MIN_SCRYPT_N}, {MAX_SCRYPT_N}]")
        name = os.path.abspath(os.fspath(path))
        if os.path.lexists(name):
            raise FileExistsError(f"keystore {name!r} already exists")
        if passphrase is not None:
            salt = os.urandom(SALT_BYTES)
            root_meta: dict[str, Any] = {
                "kdf": _KDF_SCRYPT,
                "salt": _b64e(salt),
                "n": scrypt_n,
                "r": SCRYPT_R,
                "p": SCRYPT_P,
            }
            root = _derive_scrypt(passphrase, salt, scrypt_n, SCRYPT_R, SCRYPT_P)
        else:
            assert key_file is not None
            root_meta = {"kdf": _KDF_KEY_FILE}
            root = _read_key_file(key_file)
        check_nonce = os.urandom(NONCE_BYTES)
        doc = _Doc(
            root=root_meta,
            check_nonce=check_nonce,
            check_sealed=root.encrypt(check_nonce, CHECK_PLAINTEXT, _CHECK_AAD),
            keks={},
        )
        data = _serialize(doc)
        self = cls.__new__(cls)
        self._setup(name, random_bytes)
        self._root = root
        with self._file_lock():
            try:
                write_file_atomically(name, data, mode=0o600, exclusive=True)
            except FileExistsError:
                raise FileExistsError(f"keystore {name!r} already exists") from None
        self._raw, self._doc = data, doc
        return self

    @classmethod
    def in_memory(
        cls,
        keks: Mapping[str, bytes] | None = None,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> LocalKms:
        """A keystore that lives only in this object (tests, known-answer vectors).

        `keks` maps ids to 32-byte KEK material; all start enabled.
        """
        self = cls.__new__(cls)
        self._setup(None, random_bytes)
        for kek_id, material in (keks or {}).items():
            _check_kek_id(kek_id)
            if not isinstance(material, (bytes, bytearray)):
                raise TypeError(f"KEK material for {kek_id!r} must be bytes")
            if len(material) != KEY_BYTES:
                raise ValueError(f"KEK material for {kek_id!r} must be exactly {KEY_BYTES} bytes")
            self._doc.keks[kek_id] = _Kek(_now(), True, aead=AESGCM(bytes(material)))
        return self

    # ----------------------------------------------------------------- file state

    def _read_file(self) -> bytes:
        assert self._path is not None
        try:
            with open(self._path, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise KeystoreError(f"cannot read keystore {self._path!r}: {exc.strerror}") from None

    def _verify_root(self, doc: _Doc) -> None:
        assert self._root is not None
        try:
            ok = self._root.decrypt(doc.check_nonce, doc.check_sealed, _CHECK_AAD) == CHECK_PLAINTEXT
        except InvalidTag:
            ok = False
        if not ok:
            raise KeystoreError(
                f"cannot open keystore {self._path!r}: wrong passphrase or key file, or the file is damaged"
            )

    def _load(self, data: bytes) -> _Doc:
        try:
            doc = _parse(data)
        except _Damaged as exc:
            raise KeystoreError(f"keystore {self._path!r} is damaged: {exc}") from None
        self._verify_root(doc)
        return doc

    def _current(self) -> _Doc:
        """The keystore as it is now (re-read from disk in file mode)."""
        if self._closed:
            raise KmsClosedError("LocalKms is closed")
        if self._path is None:
            return self._doc
        data = self._read_file()
        with self._lock:
            if data != self._raw:
                self._doc, self._raw = self._load(data), data
            return self._doc

    def _file_lock(self) -> _FileLock:
        assert self._path is not None
        return _FileLock(self._path + ".lock")

    def _modify(self, change: Callable[[_Doc], None]) -> None:
        """Apply `change` to the freshest keystore state and persist it atomically."""
        if self._closed:
            raise KmsClosedError("LocalKms is closed")
        with self._lock:
            if self._path is None:
                change(self._doc)
                return
            with self._file_lock():
                data = self._read_file()
                doc = self._load(data)
                change(doc)
                new = _serialize(doc)
                write_file_atomically(self._path, new, mode=0o600)
            self._doc, self._raw = doc, new

    def _seal_kek(self, kek_id: str, kek: _Kek, material: bytes) -> None:
        assert self._root is not None
        nonce = os.urandom(NONCE_BYTES)
        kek.nonce = nonce
        kek.sealed = self._root.encrypt(nonce, material, _kek_aad(kek_id, kek.created_at, kek.enabled))

    def _unseal_kek(self, kek_id: str, kek: _Kek) -> AESGCM:
        if kek.aead is None:
            assert self._root is not None and kek.nonce is not None and kek.sealed is not None
            try:
                material = self._root.decrypt(
                    kek.nonce, kek.sealed, _kek_aad(kek_id, kek.created_at, kek.enabled)
                )
            except InvalidTag:
                raise KeystoreError(
                    f"keystore {self._path!r} is damaged: entry {kek_id!r} failed authentication"
                ) from None
            kek.aead = AESGCM(material)
            del material
        return kek.aead

    def _material(self, kek_id: str, kek: _Kek) -> bytes:
        """Plaintext KEK material (file mode only, for re-sealing inside `_modify`)."""
        assert self._root is not None and kek.nonce is not None and kek.sealed is not None
        try:
            return self._root.decrypt(kek.nonce, kek.sealed, _kek_aad(kek_id, kek.created_at, kek.enabled))
        except InvalidTag:
            raise KeystoreError(
                f"keystore {self._path!r} is damaged: entry {kek_id!r} failed authentication"
            ) from None

    # ----------------------------------------------------------------- KEK management

    def create_kek(self, kek_id: str) -> str:
        """Create a new enabled KEK of 32 random bytes; `ValueError` if `kek_id` exists. Returns `kek_id`."""
        _check_kek_id(kek_id)

        def change(doc: _Doc) -> None:
            if kek_id in doc.keks:
                raise ValueError(f"KEK {kek_id!r} already exists")
            material = os.urandom(KEY_BYTES)
            kek = _Kek(_now(), True)
            if self._path is None:
                kek.aead = AESGCM(material)
            else:
                self._seal_kek(kek_id, kek, material)
            del material
            doc.keks[kek_id] = kek

        self._modify(change)
        return kek_id

    def _set_enabled(self, kek_id: str, enabled: bool) -> None:
        _check_kek_id(kek_id)

        def change(doc: _Doc) -> None:
            kek = doc.keks.get(kek_id)
            if kek is None:
                raise KmsKeyNotFoundError(f"no KEK {kek_id!r} in the local keystore")
            if kek.enabled == enabled:
                return
            if self._path is None:
                kek.enabled = enabled
                return
            material = self._material(kek_id, kek)
            kek.enabled = enabled
            kek.aead = None
            self._seal_kek(kek_id, kek, material)
            del material

        self._modify(change)

    def disable_kek(self, kek_id: str) -> None:
        """Disable a KEK: generate/decrypt/rewrap with it raise `KmsAccessDeniedError`. Idempotent."""
        self._set_enabled(kek_id, False)

    def enable_kek(self, kek_id: str) -> None:
        """Re-enable a disabled KEK. Idempotent."""
        self._set_enabled(kek_id, True)

    def kek_ids(self) -> list[str]:
        """Ids of all KEKs, enabled or not, sorted."""
        return sorted(self._current().keks)

    def has_kek(self, kek_id: str) -> bool:
        """True if a KEK with this id exists (enabled or not)."""
        return kek_id in self._current().keks

    def _usable(self, kek_id: str) -> AESGCM:
        kek = self._current().keks.get(kek_id)
        if kek is None:
            raise KmsKeyNotFoundError(f"no KEK {kek_id!r} in the local keystore")
        if not kek.enabled:
            raise KmsAccessDeniedError(f"KEK {kek_id!r} is disabled")
        return self._unseal_kek(kek_id, kek)

    # ----------------------------------------------------------------- KmsBackend

    def _random_exact(self, size: int) -> bytes:
        data = self._random(size)
        if not isinstance(data, (bytes, bytearray)) or len(data) != size:
            raise ValueError(f"random_bytes({size}) must return exactly {size} bytes")
        return bytes(data)

    def _wrap(self, aead: AESGCM, dek: bytes, aad: bytes) -> bytes:
        nonce = self._random_exact(NONCE_BYTES)
        return bytes([WRAP_VERSION]) + nonce + aead.encrypt(nonce, dek, aad)

    @staticmethod
    def _unwrap(aead: AESGCM, wrapped: bytes, aad: bytes) -> SecretKey:
        if len(wrapped) < 1 or wrapped[0] != WRAP_VERSION or len(wrapped) != WRAPPED_DEK_BYTES:
            raise DecryptionError()
        try:
            dek = aead.decrypt(wrapped[1 : 1 + NONCE_BYTES], wrapped[1 + NONCE_BYTES :], aad)
        except InvalidTag:
            raise DecryptionError() from None
        return SecretKey(dek, label="dek")

    @staticmethod
    def _check_wrapped(wrapped: object) -> bytes:
        if not isinstance(wrapped, (bytes, bytearray, memoryview)):
            raise TypeError(f"wrapped must be bytes, not {type(wrapped).__name__}")
        return bytes(wrapped)

    @staticmethod
    def _request_id() -> str:
        return f"local-{uuid.uuid4().hex}"

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> GeneratedDataKey:
        """New random 32-byte DEK, wrapped under `kek_id` and bound to `context`."""
        _check_kek_id(kek_id)
        aad = _wrap_aad(kek_id, context)
        aead = self._usable(kek_id)
        dek = SecretKey(self._random_exact(KEY_BYTES), label="dek")
        wrapped = self._wrap(aead, dek.material, aad)
        return GeneratedDataKey(plaintext=dek, wrapped=wrapped, kek_id=kek_id, request_id=self._request_id())

    def decrypt(self, kek_id: str, wrapped: bytes, context: Mapping[str, str]) -> UnwrappedDataKey:
        """Unwrap; `DecryptionError` for any malformed, tampered or wrong-context input."""
        _check_kek_id(kek_id)
        data = self._check_wrapped(wrapped)
        aad = _wrap_aad(kek_id, context)
        aead = self._usable(kek_id)
        return UnwrappedDataKey(plaintext=self._unwrap(aead, data, aad), request_id=self._request_id())

    def _rewrap(self, wrapped: bytes, source: BoundKek, destination: BoundKek) -> RewrappedDataKey:
        """Unwrap under the source and re-wrap under the destination, inside the KMS."""
        (source_kek_id, source_context), (destination_kek_id, destination_context) = source, destination
        _check_kek_id(source_kek_id)
        _check_kek_id(destination_kek_id)
        data = self._check_wrapped(wrapped)
        source_aad = _wrap_aad(source_kek_id, source_context)
        destination_aad = _wrap_aad(destination_kek_id, destination_context)
        source_aead = self._usable(source_kek_id)
        destination_aead = self._usable(destination_kek_id)
        dek = self._unwrap(source_aead, data, source_aad)
        try:
            new = self._wrap(destination_aead, dek.material, destination_aad)
        finally:
            dek.wipe()
        return RewrappedDataKey(wrapped=new, kek_id=destination_kek_id, request_id=self._request_id())

    # ----------------------------------------------------------------- lifecycle and safety

    def close(self) -> None:
        """Drop the root key and KEK objects; later calls raise `KmsClosedError` (a `ValueError`). Idempotent."""
        with self._lock:
            self._closed = True
            self._root = None
            self._doc = _Doc(root={}, check_nonce=b"", check_sealed=b"", keks={})
            self._raw = None

    def __enter__(self) -> LocalKms:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> str | None:
        """Absolute keystore path, or None for an in-memory instance."""
        return self._path

    def __repr__(self) -> str:
        where = "in-memory" if self._path is None else f"path={self._path!r}"
        state = "closed" if self._closed else f"keks={len(self._doc.keks)}"
        return f"LocalKms({where}, {state}, single-node)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("LocalKms refuses to be pickled: it holds the root key; open it in each worker")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("LocalKms refuses to be pickled: it holds the root key; open it in each worker")

    def __getstate__(self) -> NoReturn:
        raise TypeError("LocalKms refuses to be pickled: it holds the root key; open it in each worker")

    def __copy__(self) -> NoReturn:
        raise TypeError("LocalKms refuses to be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("LocalKms refuses to be copied")


class _FileLock:
    """Exclusive `fcntl.flock` on a sidecar lock file (created 0600, never deleted)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd: int | None = None

    def __enter__(self) -> _FileLock:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
