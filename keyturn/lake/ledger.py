"""The source ledger `_keyturn/ingested.json`: which source files a lake already holds, by keyed MAC.

Beam-free. Entries carry an HMAC-SHA256 of the source bytes under a key
derived from a DEK in the key home's directory (never a plain hash, which
would let anyone with the lake test a guess of a source file).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

import pyarrow.fs as pafs
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyturn.directory import new_entry
from keyturn.errors import DecryptionError, InputError
from keyturn.format import DEK_ID_BYTES, Envelope, commitment_matches, derive_commitment, kms_context, parse_envelope
from keyturn.lake.atomic import write_json_atomically
from keyturn.lake.layout import Lake
from keyturn.sources import SourceFile, resolve

__all__ = ["LEDGER", "LEDGER_KEY_PARTITION", "read_ledger", "record_sources", "SourceMacs", "legacy_sha256"]


LEDGER = "ingested.json"


def read_ledger(lake: Lake) -> dict[str, dict[str, Any]]:
    """The source ledger `<lake>/_keyturn/ingested.json`: source key -> what was done with it."""
    path = lake.keyturn_path(LEDGER)
    if lake.fs.get_file_info(path).type != pafs.FileType.File:
        return {}
    with lake.fs.open_input_stream(path) as f:
        return dict(json.loads(f.read()).get("sources", {}))


def record_sources(lake: Lake, sources: dict[str, dict[str, Any]]) -> None:
    """Add `sources` to the ledger, atomically (idempotent: recording twice changes nothing)."""
    if not sources:
        return
    ledger = read_ledger(lake)
    if all(ledger.get(k) == v for k, v in sources.items()):
        return
    ledger.update(sources)
    write_json_atomically(lake, lake.keyturn_path(LEDGER), {"format": 1, "sources": ledger})


LEDGER_KEY_PARTITION = "_keyturn/ingest-ledger"
"""The DEK-directory partition of the ledger's MAC key (no lake partition can be named so)."""


_MAC_INFO = b"keyturn/v1/ingest-ledger-mac"


def _digest(source: SourceFile, h: Any) -> str:
    fs, path = resolve(source.path)
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def legacy_sha256(source: SourceFile) -> str:
    """Only to recognise entries of ledgers written before MACs; never written to a ledger."""
    return _digest(source, hashlib.sha256())


class SourceMacs:
    """Keyed MACs of source files for the ledger; the key is a DEK of the key home's directory (see the module docstring).

    The key is opened (one KMS Decrypt) or created (one GenerateDataKey and
    a directory registration) only when a MAC is needed, and kept for the
    run. An entry whose ``mac_key`` the key home does not hold under this
    dataset's ledger partition is refused (`InputError`): the lake belongs
    to another key home, or its ledger was edited.
    """

    def __init__(self, home: Any, actor: str = "keyturn ingest") -> None:
        self.home = home
        self.actor = actor
        self._keys: dict[str, bytes] = {}
        self._current: str | None = None
        self.kms_calls = 0

    def __reduce__(self) -> Any:
        raise TypeError("SourceMacs refuses to be pickled: its MAC key never leaves this process")

    def __repr__(self) -> str:
        return f"SourceMacs(keys={sorted(self._keys)}, kms_calls={self.kms_calls})"  # key ids only

    def _location(self) -> tuple[str, str]:
        return self.home.dataset, LEDGER_KEY_PARTITION

    def _derive(self, material: bytes, dek_id: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=dek_id, info=_MAC_INFO).derive(material)

    def _open(self, key_id: str) -> bytes:
        key = self._keys.get(key_id)
        if key is not None:
            return key
        dataset, partition = self._location()
        where = f"the source ledger's MAC key {key_id}"
        try:
            dek_id = bytes.fromhex(key_id)
        except (TypeError, ValueError):
            dek_id = b""
        if len(dek_id) != DEK_ID_BYTES:
            raise InputError(f"{where} is not a DEK id: the ledger was edited")
        entry = self.home.registry().lookup_deks([dek_id]).get(dek_id)
        if entry is None or (entry.dataset, entry.partition) != (dataset, partition):
            raise InputError(
                f"{where} is not in the DEK directory of this key home for dataset {dataset!r}: "
                "is the lake ingested with another key home?"
            )
        try:
            envelope = parse_envelope(entry.envelope)
        except DecryptionError:
            raise InputError(f"{where}: its directory entry does not parse") from None
        context = kms_context(dataset=dataset, partition=partition, dek_id=dek_id, key_version=envelope.key_version)
        with self.home.kms() as kms:
            unwrapped = kms.decrypt(envelope.kek_id, envelope.wrapped_dek, context)
        self.kms_calls += 1
        try:
            material = unwrapped.plaintext.material
            if not commitment_matches(material, envelope):
                raise InputError(f"{where}: the KMS returned a key its envelope does not commit to")
            key = self._keys[key_id] = self._derive(material, dek_id)
        finally:
            unwrapped.plaintext.wipe()
        return key

    def _create(self) -> str:
        registry = self.home.registry()
        active = registry.active()
        dataset, partition = self._location()
        dek_id = os.urandom(DEK_ID_BYTES)
        context = kms_context(dataset=dataset, partition=partition, dek_id=dek_id, key_version=active.version)
        with self.home.kms() as kms:
            generated = kms.generate_data_key(active.kek_id, context)
        self.kms_calls += 1
        try:
            material = generated.plaintext.material
            envelope = Envelope(dek_id, active.version, active.kek_id, derive_commitment(material, dek_id), generated.wrapped)
            key = self._derive(material, dek_id)
        finally:
            generated.plaintext.wipe()
        registry.register_deks(  # registered before any MAC made with it reaches the lake
            [new_entry(envelope.to_bytes(), dataset=dataset, partition=partition, created_at=self.home.clock(), actor=self.actor)]
        )
        self._keys[dek_id.hex()] = key
        return dek_id.hex()

    def key_for_new_entries(self, ledger: dict[str, dict[str, Any]]) -> str:
        """The key new entries use: one the ledger already names (the first, by path), else a new one."""
        if self._current is None:
            named = sorted((k, e["mac_key"]) for k, e in ledger.items() if isinstance(e.get("mac_key"), str))
            self._current = named[0][1] if named else self._create()
        return self._current

    def mac(self, source: SourceFile, key_id: str) -> str:
        """HMAC-SHA256 (hex) of the file's bytes under the key `key_id` names."""
        return _digest(source, hmac.new(self._open(key_id), digestmod=hashlib.sha256))

    def matches(self, entry: dict[str, Any], source: SourceFile) -> bool:
        """Whether `source`'s bytes are those `entry` recorded (by MAC, or by an old ledger's sha256)."""
        if isinstance(entry.get("mac"), str) and isinstance(entry.get("mac_key"), str):
            return hmac.compare_digest(self.mac(source, entry["mac_key"]), entry["mac"])
        if isinstance(entry.get("sha256"), str):  # a ledger from before MACs: compare, and write no new hash
            return hmac.compare_digest(legacy_sha256(source), entry["sha256"])
        return False
