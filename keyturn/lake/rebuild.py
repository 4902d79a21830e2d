"""Disaster recovery: rebuild missing DEK directory entries from the birth envelopes in a lake.

The DEK directory is as precious as the KMS keys: a row whose DEK is not in
the directory reads as ``unknown``. If entries are lost (a registry restored
from an old backup, a table deleted by mistake), `rebuild_directory` reads
the ``_keyturn_dek`` column of every data file (the birth envelope each row
carries), and for each DEK the directory does not know:

1. parses the envelope and takes the DEK's place from the file's path
   (dataset from the key home, partition from the hive directory);
2. proves the envelope is genuine: the KMS must unwrap it under that exact
   place (the wrapped DEK is bound to dataset, partition, dek_id and key
   version) and the unwrapped key must match the envelope's commitment. A
   forged or moved envelope fails and is reported, never registered;
3. registers it with its birth envelope as the current wrapping, under the
   dataset contract's current revision (every contract column required of
   its rows, the strictest reading).

This works for as long as the birth KEK versions exist and are readable:
an envelope born under a retired or destroyed version cannot be proved and
is reported. Entries already in the directory are never changed, so a
rebuild can run at any time and twice. A dataset without a contract gets
one from the lake's own field metadata, only if every file agrees.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import pyarrow.parquet as pq

from keyturn.directory import LOOKUP_BATCH, new_entry
from keyturn.errors import ContractError, DecryptionError
from keyturn.format import parse_envelope
from keyturn.lake.footer import envelope_rows
from keyturn.lake.layout import Lake
from keyturn.reader import DekReader
from keyturn.scope import Location

__all__ = ["rebuild_directory"]


def rebuild_directory(
    lake: Lake,
    registry: Any,
    kms: Any,
    dataset: str,
    *,
    actor: str,
    clock: Callable[[], datetime],
) -> dict[str, Any]:
    """Register every genuine DEK of `lake` the directory lacks; returns a report (counts, no keys)."""
    lake.require()
    found: dict[bytes, list[tuple[bytes, str]]] = {}  # dek_id -> every (birth envelope, partition) naming it
    bad: list[dict[str, Any]] = []
    files = 0
    contract_sources: list[Any] = []
    for data_file in lake.data_files():
        try:
            with lake.fs.open_input_file(data_file.path) as f:
                pf = pq.ParquetFile(f)
                envelopes = envelope_rows(pf)
                contract_sources.append(pf.schema_arrow)
        except (OSError, ValueError) as exc:
            bad.append({"path": data_file.relpath, "reason": "unreadable", "detail": str(exc)[:200]})
            continue
        files += 1
        for env in envelopes:
            try:
                dek_id = parse_envelope(env).dek_id
            except DecryptionError:
                bad.append({"path": data_file.relpath, "reason": "corrupt", "detail": "an envelope does not parse"})
                continue
            candidates = found.setdefault(dek_id, [])
            if (env, data_file.partition) not in candidates:  # a forged copy must not hide the genuine one
                candidates.append((env, data_file.partition))
    ids = sorted(found)
    known: set[bytes] = set()
    for lo in range(0, len(ids), LOOKUP_BATCH):
        known.update(registry.lookup_deks(ids[lo : lo + LOOKUP_BATCH]))
    contract = registry.get_contract(dataset)
    pinned = None
    if contract is None and contract_sources:
        contract = pinned = registry.pin_contract(
            _contract_from_files(dataset, contract_sources), actor=actor,
            reason="keyturn directory rebuild: contract taken from the lake's field metadata",
        )
    revision = contract.revision if contract is not None else 0
    now = clock()
    registered = 0
    readable = {v.version for v in registry.versions() if v.state.readable}
    with DekReader(kms) as reader:  # no directory: the birth envelope itself must prove genuine
        batch = []
        for dek_id in ids:
            if dek_id in known:
                continue
            genuine = None
            for env, partition in found[dek_id]:
                version = parse_envelope(env).key_version
                if version not in readable:
                    bad.append({"dek_id": dek_id.hex(), "partition": partition, "reason": "version_not_readable",
                                "detail": f"born under key version {version}, which is not readable"})
                    continue
                try:
                    reader.open(env, Location(dataset, partition))
                except DecryptionError:
                    bad.append({"dek_id": dek_id.hex(), "partition": partition, "reason": "not_genuine",
                                "detail": "the KMS does not unwrap this envelope for this place"})
                    continue
                if genuine is None:
                    genuine = (env, partition)
            if genuine is None:
                continue
            env, partition = genuine
            batch.append(new_entry(env, dataset=dataset, partition=partition, created_at=now, actor=actor,
                                   contract_revision=revision))
            if len(batch) >= LOOKUP_BATCH:
                registry.register_deks(batch)
                registered += len(batch)
                batch = []
        if batch:
            registry.register_deks(batch)
            registered += len(batch)
    return {
        "lake": lake.uri,
        "dataset": dataset,
        "files": files,
        "deks_in_lake": len(ids),
        "deks_already_known": len(known),
        "deks_registered": registered,
        "contract_pinned": pinned.to_json() if pinned is not None else None,
        "problems": bad,
    }


def _contract_from_files(dataset: str, schemas: list[Any]) -> Any:
    """The contract the lake's own field metadata describes; `ContractError` unless every file agrees."""
    from keyturn.arrow_codec import META_BIND, META_PLAIN, encrypted_columns
    from keyturn.arrow_values import decode_plain_field
    from keyturn.contract import arrow_contract

    seen = None
    for schema in schemas:
        names = encrypted_columns(schema)
        if not names:
            continue
        try:
            fields = [decode_plain_field(schema.field(n).metadata[META_PLAIN]) for n in names]
        except (DecryptionError, KeyError):
            raise ContractError("a lake file's keyturn metadata is damaged; pin the contract by writing to the dataset") from None
        bind = schema.field(names[0]).metadata.get(META_BIND, b"[]")
        key = (tuple(names), tuple((f.name, str(f.type)) for f in fields), bind)
        if seen is None:
            seen = (key, fields, bind)
        elif seen[0] != key:
            raise ContractError("the lake's files disagree on their encrypted columns; cannot take a contract from them")
    if seen is None:
        raise ContractError(f"no file of the lake carries keyturn metadata to take dataset {dataset!r}'s contract from")
    import json

    import pyarrow as pa

    _, fields, bind = seen
    return arrow_contract(dataset, pa.schema(fields), [f.name for f in fields], bind=json.loads(bind))
