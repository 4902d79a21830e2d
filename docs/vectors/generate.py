"""Build the known-answer vectors of wire format v1 (docs/FORMAT.md).

THE VECTORS ARE FROZEN. The committed JSON files pin format v1: every
reader, now and later, must decrypt the positive vectors to the same
plaintext and reject the negative ones. Never regenerate or edit a committed
vector to make a failing test pass; a failing vector test means the code can
no longer read data that is already written, and the code is what must be
fixed. New cases go into new vectors with new ids.

History: format v1 was unreleased when the cell AAD gained its "type" pair
(the plain type descriptor); the vectors were regenerated that one time,
before any data existed outside the repository. From now on they are frozen.

This script is run by hand, never by the tests:

    python docs/vectors/generate.py          # check: rebuild in memory, compare with the files
    python docs/vectors/generate.py --write  # write the files (only for a new, unfrozen file)

Everything is deterministic: KEKs are SHA-256 of their id, and every random
value (dek_id, DEK, LocalKms wrap nonce) comes from a SHA-256 counter stream.
The bytes are built twice: once by the small reference implementation below,
written from FORMAT.md alone, and once by keyturn itself (DekScope, LocalKms,
rewrap_envelope, and the Arrow and Avro codecs for the typed cells) fed the
same streams. The two must agree byte for byte, and
every vector is then checked through the reference reader and DekReader.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import fastavro  # noqa: E402
import pyarrow as pa  # noqa: E402
from cryptography.exceptions import InvalidTag  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: E402

from keyturn.arrow_codec import encrypt_batch  # noqa: E402
from keyturn.arrow_values import arrow_type_descriptor, to_plaintexts  # noqa: E402
from keyturn.avro_codec import avro_type_descriptor, encrypt_records  # noqa: E402
from keyturn.context import encode_context  # noqa: E402
from keyturn.errors import DecryptionError  # noqa: E402
from keyturn.format import cell_aad  # noqa: E402
from keyturn.kms.local import LocalKms  # noqa: E402
from keyturn.reader import DekReader  # noqa: E402
from keyturn.rewrap import rewrap_envelope  # noqa: E402
from keyturn.scope import DekScope, KekRef, Location  # noqa: E402

FROZEN = (
    "Frozen known-answer vectors of keyturn wire format v1. Never regenerate or edit them to make a "
    "failing test pass: a reader must keep decrypting (or rejecting) every one. Add new vectors with new ids."
)

# --------------------------------------------------------------------------- determinism


def kek_material(kek_id: str) -> bytes:
    return hashlib.sha256(b"keyturn/vectors/kek/" + kek_id.encode("utf-8")).digest()


class Stream:
    """random_bytes(n) for n <= 32: SHA-256 of (label, counter), counter from 0."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.counter = 0

    def __call__(self, n: int) -> bytes:
        if not 1 <= n <= 32:
            raise ValueError("a draw is 1..32 bytes")
        block = hashlib.sha256(f"keyturn/vectors/{self.label}/{self.counter}".encode()).digest()
        self.counter += 1
        return block[:n]


def filler(label: str, size: int) -> bytes:
    out = b""
    i = 0
    while len(out) < size:
        out += hashlib.sha256(f"keyturn/vectors/filler/{label}/{i}".encode()).digest()
        i += 1
    return out[:size]


# --------------------------------------------------------------------------- reference implementation (from FORMAT.md)


def ref_context(pairs: dict[str, str | bytes]) -> bytes:
    items = sorted((k.encode("utf-8"), v.encode("utf-8") if isinstance(v, str) else v) for k, v in pairs.items())
    out = struct.pack(">H", len(items))
    for k, v in items:
        assert 1 <= len(k) <= 255 and len(v) <= 65536
        out += struct.pack(">H", len(k)) + k + struct.pack(">I", len(v)) + v
    assert len(out) <= 1 << 20
    return out


def ref_hkdf(dek: bytes, dek_id: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=dek_id, info=info).derive(dek)


def ref_kms_context(dataset: str, partition: str, dek_id: bytes, version: int) -> dict[str, str]:
    return {
        "keyturn:dataset": dataset,
        "keyturn:partition": partition,
        "keyturn:dek": dek_id.hex(),
        "keyturn:version": str(version),
    }


def ref_wrap(kek_id: str, dek: bytes, nonce: bytes, context: dict[str, str]) -> bytes:
    aad = ref_context({"kms:kek": kek_id, **context})
    return b"\x01" + nonce + AESGCM(kek_material(kek_id)).encrypt(nonce, dek, aad)


def ref_envelope(
    dek_id: bytes, version: int, kek_id: str | bytes, commitment: bytes, wrapped: bytes, *, fmt: int = 1, alg: int = 1,
    kek_len: int | None = None, wrapped_len: int | None = None,
) -> bytes:
    kek = kek_id.encode("utf-8") if isinstance(kek_id, str) else kek_id
    return (
        bytes([fmt, alg])
        + dek_id
        + struct.pack(">I", version)
        + struct.pack(">H", len(kek) if kek_len is None else kek_len)
        + kek
        + commitment
        + struct.pack(">H", len(wrapped) if wrapped_len is None else wrapped_len)
        + wrapped
    )


def ref_arrow_type(type_string: str) -> str:
    """FORMAT.md section 8: an Arrow plain type's descriptor is "arrow:" + its pyarrow type string."""
    return "arrow:" + type_string


def ref_avro_type(plain_type: object) -> str:
    """FORMAT.md section 8: "avro:" + compact JSON of the plain type as written, keys sorted."""
    return "avro:" + json.dumps(plain_type, sort_keys=True, separators=(",", ":"))


def ref_cell_aad(
    dataset: str, partition: str, field_name: str, value_type: str, dek_id: bytes, bindings: dict[str, bytes]
) -> bytes:
    pairs: dict[str, str | bytes] = {
        "keyturn:format": "1",
        "dataset": dataset,
        "partition": partition,
        "field": field_name,
        "type": value_type,
        "dek": dek_id,
    }
    pairs.update({"row:" + k: v for k, v in bindings.items()})
    return ref_context(pairs)


def ref_cell(cell_key: bytes, dek_id: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    nonce = counter.to_bytes(12, "big")
    return b"\x01" + dek_id + nonce + AESGCM(cell_key).encrypt(nonce, plaintext, aad)


class Reject(Exception):
    """The reference reader refused the input; `args[0]` names the step."""


def ref_open(v: dict) -> bytes:
    """Decrypt a vector by the steps of FORMAT.md ("Reading a cell"); `Reject(step)` on failure."""
    env = bytes.fromhex(v["envelope"])
    cell = bytes.fromhex(v["cell"])
    # 1. envelope
    if len(env) < 1 or env[0] != 1:
        raise Reject("envelope-format-version")
    if len(env) < 24 or env[1] != 1:
        raise Reject("envelope-parse")
    dek_id = env[2:18]
    (version,) = struct.unpack_from(">I", env, 18)
    (klen,) = struct.unpack_from(">H", env, 22)
    if version == 0 or not 1 <= klen <= 1024 or len(env) < 24 + klen + 34:
        raise Reject("envelope-parse")
    try:
        kek_id = env[24 : 24 + klen].decode("utf-8")
    except UnicodeDecodeError:
        raise Reject("envelope-parse") from None
    pos = 24 + klen
    commitment = env[pos : pos + 32]
    (wlen,) = struct.unpack_from(">H", env, pos + 32)
    wrapped = env[pos + 34 :]
    if not 1 <= wlen <= 4096 or len(wrapped) != wlen:
        raise Reject("envelope-parse")
    # 2. unwrap (LocalKms)
    assert kek_id == v["kek_id"], "a vector's envelope must name the KEK it ships"
    if len(wrapped) != 61 or wrapped[0] != 1:
        raise Reject("kms-unwrap")
    ctx = ref_kms_context(v["dataset"], v["partition"], dek_id, version)
    try:
        dek = AESGCM(bytes.fromhex(v["kek"])).decrypt(wrapped[1:13], wrapped[13:], ref_context({"kms:kek": kek_id, **ctx}))
    except InvalidTag:
        raise Reject("kms-unwrap") from None
    # 3. commitment
    if not hmac.compare_digest(ref_hkdf(dek, dek_id, b"keyturn/v1/commitment"), commitment):
        raise Reject("commitment")
    # 4. cell
    if not 45 <= len(cell) <= 45 + 64 * 1024 * 1024 or cell[0] != 1:
        raise Reject("cell-parse")
    if cell[1:17] != dek_id:
        raise Reject("cell-dek-id")
    bindings = {k: bytes.fromhex(x) for k, x in v["bindings"].items()}
    aad = ref_cell_aad(v["dataset"], v["partition"], v["field"], v["type"], dek_id, bindings)
    try:
        return AESGCM(ref_hkdf(dek, dek_id, b"keyturn/v1/cell-key")).decrypt(cell[17:29], cell[29:], aad)
    except InvalidTag:
        raise Reject("cell-auth") from None


def keyturn_open(v: dict) -> bytes:
    """Decrypt a vector with keyturn, exactly as tests/test_vectors.py does."""
    kms = LocalKms.in_memory({v["kek_id"]: bytes.fromhex(v["kek"])})
    opened = DekReader(kms).open(bytes.fromhex(v["envelope"]), Location(v["dataset"], v["partition"]))
    bindings = {k: bytes.fromhex(x) for k, x in v["bindings"].items()}
    aad = encode_context(
        cell_aad(
            dataset=v["dataset"],
            partition=v["partition"],
            field=v["field"],
            dek_id=opened.envelope.dek_id,
            value_type=v["type"],
            bindings=bindings,
        )
    )
    return opened.open_cell(bytes.fromhex(v["cell"]), aad)


# --------------------------------------------------------------------------- one DEK, sealed both ways


@dataclass
class Row:
    id: str
    description: str
    plaintext: bytes
    bindings: dict[str, bytes] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass
class Dek:
    """One DEK scope: a location, a KEK, and the cells sealed under it (one field per column)."""

    label: str
    kek_id: str
    version: int
    dataset: str
    partition: str
    fields: list[str]
    columns: list[list[Row]]  # columns[j][i]: row i of fields[j]
    types: list[str] = field(default_factory=list)  # types[j]: descriptor of fields[j] (cell AAD "type")
    bind: bool = False
    dek_id: bytes = b""
    dek: bytes = b""
    envelope: bytes = b""
    cells: list[list[bytes]] = field(default_factory=list)

    def build(self) -> None:
        assert len(self.types) == len(self.fields), f"{self.label}: one type descriptor per field"
        scope_rng, kms_rng = Stream(self.label + "/scope"), Stream(self.label + "/kms")
        self.dek_id = scope_rng(16)
        self.dek = kms_rng(32)
        wrap_nonce = kms_rng(12)
        ctx = ref_kms_context(self.dataset, self.partition, self.dek_id, self.version)
        wrapped = ref_wrap(self.kek_id, self.dek, wrap_nonce, ctx)
        commitment = ref_hkdf(self.dek, self.dek_id, b"keyturn/v1/commitment")
        self.envelope = ref_envelope(self.dek_id, self.version, self.kek_id, commitment, wrapped)
        cell_key = ref_hkdf(self.dek, self.dek_id, b"keyturn/v1/cell-key")
        counter = 0
        self.cells = []
        for name, value_type, col in zip(self.fields, self.types, self.columns):
            out = []
            for row in col:
                aad = ref_cell_aad(self.dataset, self.partition, name, value_type, self.dek_id, row.bindings)
                out.append(ref_cell(cell_key, self.dek_id, counter, row.plaintext, aad))
                counter += 1
            self.cells.append(out)
        self._check_against_keyturn()

    def _check_against_keyturn(self) -> None:
        kms = LocalKms.in_memory({self.kek_id: kek_material(self.kek_id)}, random_bytes=Stream(self.label + "/kms"))
        location = Location(self.dataset, self.partition)
        with DekScope(kms, KekRef(self.version, self.kek_id), location, random_bytes=Stream(self.label + "/scope")) as scope:
            bindings = [col_row.bindings for col_row in self.columns[0]] if self.bind else None
            sealed = scope.seal_rows(
                self.fields, [[r.plaintext for r in col] for col in self.columns], bindings, types=self.types
            )
        assert sealed.envelopes == [self.envelope], f"{self.label}: keyturn envelope differs from the reference"
        assert sealed.cells == self.cells, f"{self.label}: keyturn cells differ from the reference"

    def vector(self, j: int, i: int, **overrides) -> dict:
        row = self.columns[j][i]
        v = {
            "id": row.id,
            "description": row.description,
            "kek_id": self.kek_id,
            "kek": kek_material(self.kek_id).hex(),
            "dataset": self.dataset,
            "partition": self.partition,
            "field": self.fields[j],
            "type": self.types[j],
            "bindings": {k: b.hex() for k, b in row.bindings.items()},
            "envelope": self.envelope.hex(),
            "cell": self.cells[j][i].hex(),
            "plaintext": row.plaintext.hex(),
            **row.extra,
            "dek": self.dek.hex(),
            "nonce": int.from_bytes(self.cells[j][i][17:29], "big"),
        }
        v.update(overrides)
        return v


def typed(id_: str, description: str, arrow_type: pa.DataType, py_value, json_value) -> Row:
    (plaintext,) = to_plaintexts(pa.array([py_value], arrow_type))
    return Row(id_, description, plaintext, extra={"arrow_type": str(arrow_type), "value": json_value})


def i64(n: int) -> bytes:
    return n.to_bytes(8, "little", signed=True)


# --------------------------------------------------------------------------- the vectors


def build() -> dict[str, dict]:
    import datetime as dt
    from decimal import Decimal

    basic = Dek("basic", "kek-alpha", 1, "customers", "dt=2024-06-01", ["email"], types=[ref_arrow_type("string")], columns=[[
        Row("string-utf8-basic", "A short UTF-8 string, the first cell (nonce 0) of its DEK.", b"alice@example.com"),
        Row("string-utf8-multibyte", "UTF-8 with 2-, 3- and 4-byte characters; second cell (nonce 1) under the same DEK.",
            "Zoë Łukasiewicz — 東京 🔑".encode()),
        Row("empty-plaintext", "An empty value (not null): a 45-byte cell, nonce 2 under the same DEK.", b""),
    ]])
    binary = Dek("binary", "kek-alpha", 1, "customers", "dt=2024-06-01", ["avatar"], types=[ref_arrow_type("binary")], columns=[[
        Row("binary-short", "Four raw bytes.", bytes.fromhex("00ff7f80")),
        Row("binary-all-byte-values", "The 256 byte values 0x00..0xff in order.", bytes(range(256))),
        Row("binary-one-aes-block", "Exactly 16 bytes (one AES block).", filler("block16", 16)),
        Row("binary-17-bytes", "17 bytes: one block and one byte.", filler("block17", 17)),
        Row("long-4kib", "4096 bytes of deterministic filler.", filler("4kib", 4096)),
    ]])
    ts = dt.datetime(2024, 6, 1, 12, 34, 56, 789012, tzinfo=dt.timezone.utc)
    typed_rows = [
        typed("int64-negative", "An int64 value: 8 bytes, little-endian two's complement.", pa.int64(),
              -1234567890123, -1234567890123),
        typed("int32-positive", "An int32 value: 4 bytes, little-endian.", pa.int32(), 20240601, 20240601),
        typed("float64-pi", "A float64 value: 8 bytes, IEEE 754 little-endian.", pa.float64(),
              3.141592653589793, 3.141592653589793),
        typed("decimal128-scale-9", "decimal128(38, 9): the unscaled integer 12345678900000 as 16 bytes little-endian.",
              pa.decimal128(38, 9), Decimal("12345.678900000"), "12345.678900000"),
        typed("timestamp-us-utc", "timestamp[us, tz=UTC]: microseconds since the epoch as int64 little-endian.",
              pa.timestamp("us", tz="UTC"), ts, ts.isoformat()),
        typed("date32", "date32: days since 1970-01-01 as int32 little-endian.", pa.date32(),
              dt.date(2024, 6, 1), "2024-06-01"),
        typed("boolean-true", "A boolean: one byte, 0x01 for true.", pa.bool_(), True, True),
    ]
    typed_names = ["user_id", "quantity", "score", "price", "created_at", "birth_date", "verified"]
    types = Dek("typed", "kek-alpha", 1, "payments", "region=eu/dt=2024-06-01", typed_names, [[r] for r in typed_rows],
                types=[ref_arrow_type(r.extra["arrow_type"]) for r in typed_rows])
    for r, name in zip(typed_rows, typed_names):
        r.description += f" One of seven fields sealed in one row; field order gives nonce {typed_names.index(name)}."

    bound = Dek("bindings", "kek-alpha", 1, "orders", "dt=2024-06-01", ["card_number"], types=[ref_arrow_type("string")], columns=[[
        Row("bindings-two-columns", "Row-key bindings: customer_id and order_id (int64 little-endian) in the AAD.",
            b"4111111111111111", {"customer_id": i64(77), "order_id": i64(1001)}),
        Row("bindings-null-value-omitted", "customer_id is null in this row, so only row:order_id is bound.",
            b"5500005555555559", {"order_id": i64(1002)}),
    ]], bind=True)
    uni = Dek("unicode-location", "kek-ünïcødé", 3, "données-clients", "région=Île-de-France/日付=2024-06-01",
              ["nom_complet"], types=[ref_arrow_type("string")], columns=[[
                  Row("unicode-location", "Non-ASCII dataset, partition and KEK id (all UTF-8); key version 3.",
                      "Émilie Dubois".encode()),
              ]])
    nopart = Dek("empty-partition", "kek-alpha", 1, "events", "", ["ip_address"], types=[ref_arrow_type("string")], columns=[[
        Row("empty-partition", "An unpartitioned dataset: partition is the empty string.", b"192.0.2.17"),
    ]])
    rotation = Dek("rotation", "kek-alpha", 1, "customers", "dt=2023-12-31", ["phone"], types=[ref_arrow_type("string")], columns=[[
        Row("rewrap-before", "A cell under key version 1 (kek-alpha), before rotation.", b"+1 555 0100"),
    ]])
    limits = Dek("limits", "k", 0xFFFFFFFF, "d", "p", ["f"], types=[ref_arrow_type("binary")], columns=[[
        Row("envelope-max-key-version", "Key version 4294967295 (the u32 maximum) and a one-byte KEK id.", b"x"),
    ]])
    big_kek = Dek("kek-id-1024", "🔑" * 256, 1, "customers", "dt=2024-06-01", ["email"], types=[ref_arrow_type("string")], columns=[[
        Row("envelope-kek-id-1024-bytes", "A KEK id of 1024 UTF-8 bytes (256 four-byte characters), the maximum.",
            b"bob@example.com"),
    ]])
    counter = Dek("nonce-counter", "kek-alpha", 1, "metrics", "hour=00", ["token"], types=[ref_arrow_type("string")], columns=[[
        Row(f"nonce-{i}", f"Cell {i} under one DEK: nonce {i} as 96-bit big-endian.", f"token-{i}".encode())
        for i in range(257)
    ]])

    # Avro cells: the Avro binary encoding under the plain type, union branch index included (FORMAT.md 12).
    avro_types = [AVRO_SCHEMA["fields"][0]["type"], AVRO_SCHEMA["fields"][1]["type"]]
    avro = Dek("avro", "kek-alpha", 1, "crm", "dt=2024-06-01", ["nickname", "age"], [
        [Row("avro-string", 'Avro "string" "bob": zig-zag varint length 3 (0x06), then the UTF-8 bytes.',
             b"\x06bob", extra={"avro_type": avro_types[0], "value": "bob"})],
        [Row("avro-union-long", 'Avro ["null", "long"] 42: union branch index 1 (zig-zag 0x02), then long 42 '
             "(zig-zag 0x54). Second field of the row: nonce 1.",
             b"\x02\x54", extra={"avro_type": avro_types[1], "value": 42})],
    ], types=[ref_avro_type(t) for t in avro_types])

    deks = [basic, binary, types, bound, uni, nopart, rotation, limits, big_kek, counter, avro]
    for d in deks:
        d.build()
    check_arrow_codec(types, typed_rows)
    check_avro_codec(avro)

    valid = [basic.vector(0, i) for i in range(3)]
    valid += [binary.vector(0, i) for i in range(5)]
    valid += [types.vector(j, 0) for j in range(len(typed_names))]
    valid += [bound.vector(0, i) for i in range(2)]
    valid += [uni.vector(0, 0), nopart.vector(0, 0), rotation.vector(0, 0), limits.vector(0, 0), big_kek.vector(0, 0)]
    valid += [counter.vector(0, 255, id="nonce-255"), counter.vector(0, 256, id="nonce-256")]
    valid += [avro.vector(0, 0), avro.vector(1, 0)]

    # rewrap: same DEK under kek-beta, key version 2; the cell bytes do not change.
    rw_kms_rng = Stream("rotation/kms")
    rw_kms_rng(32), rw_kms_rng(12)  # the draws made when the DEK was generated
    new_wrapped = ref_wrap("kek-beta", rotation.dek, rw_kms_rng(12),
                           ref_kms_context(rotation.dataset, rotation.partition, rotation.dek_id, 2))
    commitment = ref_hkdf(rotation.dek, rotation.dek_id, b"keyturn/v1/commitment")
    rewrapped = ref_envelope(rotation.dek_id, 2, "kek-beta", commitment, new_wrapped)
    kms = LocalKms.in_memory({"kek-alpha": kek_material("kek-alpha"), "kek-beta": kek_material("kek-beta")},
                             random_bytes=Stream("rotation/kms"))
    with DekScope(kms, KekRef(1, "kek-alpha"), Location(rotation.dataset, rotation.partition),
                  random_bytes=Stream("rotation/scope")) as scope:
        assert scope.seal_rows(["phone"], [[b"+1 555 0100"]], types=rotation.types).envelopes == [rotation.envelope]
    got, _ = rewrap_envelope(kms, rotation.envelope, Location(rotation.dataset, rotation.partition), KekRef(2, "kek-beta"))
    assert got == rewrapped, "keyturn rewrap differs from the reference"
    valid.append(rotation.vector(
        0, 0, id="rewrap-after", kek_id="kek-beta", kek=kek_material("kek-beta").hex(), envelope=rewrapped.hex(),
        description="The DEK of rewrap-before re-wrapped under kek-beta as key version 2: same cell bytes, new envelope.",
        rewrap_of="rewrap-before",
    ))

    invalid = negatives(basic, binary, bound, rotation, types, avro)
    return {
        "cells_v1.json": {"description": "Valid cells: each decrypts to its plaintext. " + FROZEN, "vectors": valid},
        "invalid_v1.json": {
            "description": "Invalid inputs: each must raise DecryptionError. " + FROZEN,
            "vectors": invalid,
        },
    }


AVRO_SCHEMA = {
    "type": "record",
    "name": "Contact",
    "fields": [{"name": "nickname", "type": "string"}, {"name": "age", "type": ["null", "long"]}],
}


def check_arrow_codec(typed_dek: Dek, rows: list[Row]) -> None:
    """keyturn's Arrow codec, fed the same streams, seals the typed row to the same cells."""
    arrow_types = {str(t): t for t in (pa.int32(), pa.int64(), pa.float64(), pa.decimal128(38, 9),
                                       pa.timestamp("us", tz="UTC"), pa.date32(), pa.bool_())}
    for r, descriptor in zip(rows, typed_dek.types):
        assert arrow_type_descriptor(arrow_types[r.extra["arrow_type"]]) == descriptor, r.id
    batch = pa.RecordBatch.from_arrays(
        [_arrow_array(r, arrow_types[r.extra["arrow_type"]]) for r in rows],
        names=typed_dek.fields,
    )
    kms = LocalKms.in_memory({typed_dek.kek_id: kek_material(typed_dek.kek_id)}, random_bytes=Stream(typed_dek.label + "/kms"))
    location = Location(typed_dek.dataset, typed_dek.partition)
    with DekScope(kms, KekRef(typed_dek.version, typed_dek.kek_id), location,
                  random_bytes=Stream(typed_dek.label + "/scope")) as scope:
        sealed = encrypt_batch(batch, typed_dek.fields, scope)
    assert sealed.column("_keyturn_dek").dictionary.to_pylist() == [typed_dek.envelope]
    for name, cells in zip(typed_dek.fields, typed_dek.cells):
        assert sealed.column(name).to_pylist() == cells, f"typed/{name}: the Arrow codec differs from the reference"


def _arrow_array(r: Row, arrow_type: pa.DataType) -> pa.Array:
    import datetime as dt
    from decimal import Decimal

    value = r.extra["value"]
    if pa.types.is_decimal(arrow_type):
        value = Decimal(value)
    elif pa.types.is_timestamp(arrow_type):
        value = dt.datetime.fromisoformat(value)
    elif pa.types.is_date(arrow_type):
        value = dt.date.fromisoformat(value)
    arr = pa.array([value], arrow_type)
    assert to_plaintexts(arr) == [r.plaintext], r.id
    return arr


def check_avro_codec(avro: Dek) -> None:
    """keyturn's Avro codec, fed the same streams, seals the record to the same cells and descriptors."""
    import io

    record = {}
    for name, col, descriptor in zip(avro.fields, avro.columns, avro.types):
        (row,) = col
        assert avro_type_descriptor(row.extra["avro_type"]) == descriptor, row.id
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, fastavro.parse_schema(row.extra["avro_type"]), row.extra["value"])
        assert buf.getvalue() == row.plaintext, f"{row.id}: fastavro encodes it differently"
        record[name] = row.extra["value"]
    kms = LocalKms.in_memory({avro.kek_id: kek_material(avro.kek_id)}, random_bytes=Stream(avro.label + "/kms"))
    location = Location(avro.dataset, avro.partition)
    with DekScope(kms, KekRef(avro.version, avro.kek_id), location, random_bytes=Stream(avro.label + "/scope")) as scope:
        (sealed,) = encrypt_records([record], AVRO_SCHEMA, avro.fields, scope)
    assert sealed["_keyturn_dek"] == avro.envelope
    for name, cells in zip(avro.fields, avro.cells):
        assert [sealed[name]] == cells, f"avro/{name}: the Avro codec differs from the reference"


def negatives(basic: Dek, binary: Dek, bound: Dek, rotation: Dek, typed_dek: Dek, avro: Dek) -> list[dict]:
    out: list[dict] = []
    env = basic.envelope
    cell = basic.cells[0][0]
    dek_id = basic.dek_id
    klen = len(basic.kek_id.encode())
    commit_at = 24 + klen
    wrapped_at = commit_at + 34
    wrapped = env[wrapped_at:]
    commitment = env[commit_at : commit_at + 32]
    loc_ctx = ref_kms_context(basic.dataset, basic.partition, dek_id, 1)

    def flip(data: bytes, index: int, bit: int = 0x01) -> bytes:
        b = bytearray(data)
        b[index] ^= bit
        return bytes(b)

    def add(v: dict, overrides: dict) -> None:
        """Append `v` as a negative: no plaintext, DEK or nonce; `overrides` applied (bytes as hex)."""
        for key in ("plaintext", "dek", "nonce"):
            v.pop(key)
        for key, value in overrides.items():
            v[key] = value.hex() if isinstance(value, bytes) else value
        v["error"] = "DecryptionError"
        out.append(v)

    def neg(id_: str, description: str, **overrides) -> None:
        add(basic.vector(0, 0, id=id_, description=description + " Base: string-utf8-basic."), overrides)

    # cell structure
    neg("neg-cell-format-byte-0x02", "Cell format byte 0x02 (unknown version).", cell=b"\x02" + cell[1:])
    neg("neg-cell-format-byte-0x00", "Cell format byte 0x00.", cell=b"\x00" + cell[1:])
    neg("neg-cell-empty", "An empty cell.", cell=b"")
    neg("neg-cell-header-only", "Cell truncated to its 29-byte header.", cell=cell[:29])
    neg("neg-cell-44-bytes", "Cell of 44 bytes, one short of the 45-byte minimum.", cell=basic.cells[0][2][:44])
    neg("neg-cell-truncated-one-byte", "Cell with its last byte removed.", cell=cell[:-1])
    neg("neg-cell-trailing-byte", "Cell with one extra byte appended.", cell=cell + b"\x00")
    # cell tampering
    neg("neg-cell-flipped-tag-bit", "Lowest bit of the last tag byte flipped.", cell=flip(cell, len(cell) - 1))
    neg("neg-cell-flipped-nonce-bit", "Lowest bit of the last nonce byte flipped (nonce 0 becomes 1).", cell=flip(cell, 28))
    neg("neg-cell-flipped-ciphertext-bit", "Lowest bit of the first ciphertext byte flipped.", cell=flip(cell, 29))
    neg("neg-cell-dek-id-mismatch", "Cell dek_id (bit flipped) does not match the envelope's dek_id.", cell=flip(cell, 1))
    neg("neg-cell-from-other-dek", "A valid cell of another DEK (binary-short) read with this envelope.",
        cell=binary.cells[0][0], field="avatar")
    neg("neg-cell-nonce-swapped", "The nonce of the next cell (1) spliced into this cell.",
        cell=cell[:17] + (1).to_bytes(12, "big") + cell[29:])
    # location and field
    neg("neg-wrong-dataset", "Read as dataset 'customers2': the KMS context no longer matches.", dataset="customers2")
    neg("neg-wrong-partition", "Read as partition 'dt=2024-06-02': the KMS context no longer matches.",
        partition="dt=2024-06-02")
    neg("neg-wrong-field", "Read as field 'phone': the cell AAD no longer matches.", field="phone")
    neg("neg-field-case", "Read as field 'Email': names are compared as exact UTF-8 bytes.", field="Email")
    other_ctx = ref_kms_context("customers-copy", basic.partition, dek_id, 1)
    forged = ref_envelope(dek_id, 1, basic.kek_id, commitment,
                          ref_wrap(basic.kek_id, basic.dek, Stream("neg/dataset")(12), other_ctx))
    neg("neg-wrong-dataset-cell-aad",
        "The same DEK legitimately wrapped for dataset 'customers-copy' (so unwrap and commitment pass); the cell "
        "was sealed for 'customers' and fails on its AAD.", dataset="customers-copy", envelope=forged)
    other_ctx = ref_kms_context(basic.dataset, "dt=2024-06-02", dek_id, 1)
    forged = ref_envelope(dek_id, 1, basic.kek_id, commitment,
                          ref_wrap(basic.kek_id, basic.dek, Stream("neg/partition")(12), other_ctx))
    neg("neg-wrong-partition-cell-aad",
        "The same DEK legitimately wrapped for partition 'dt=2024-06-02' (so unwrap and commitment pass); the "
        "cell was sealed for 'dt=2024-06-01' and fails on its AAD.", partition="dt=2024-06-02", envelope=forged)
    # bindings
    b0 = bound.vector(0, 0)

    def neg_bound(id_: str, description: str, **overrides) -> None:
        add(dict(b0, id=id_, description=description + " Base: bindings-two-columns."), overrides)

    neg_bound("neg-bindings-value-changed", "order_id 1001 replaced by 1002.",
              bindings={"customer_id": i64(77).hex(), "order_id": i64(1002).hex()})
    neg_bound("neg-bindings-dropped", "Read without bindings.", bindings={})
    neg_bound("neg-bindings-one-missing", "customer_id binding left out.", bindings={"order_id": i64(1001).hex()})
    neg_bound("neg-bindings-renamed", "Binding name order_id read as orderid.",
              bindings={"customer_id": i64(77).hex(), "orderid": i64(1001).hex()})
    neg_bound("neg-cell-moved-to-other-row", "The cell of bindings-null-value-omitted read with this row's bindings.",
              cell=bound.cells[0][1])
    neg("neg-bindings-added", "A binding the writer did not use (row:order_id) added at read time.",
        bindings={"order_id": i64(1001).hex()})
    # envelope structure
    neg("neg-envelope-format-byte-0x02", "Envelope format byte 0x02 (unknown version).", envelope=b"\x02" + env[1:])
    neg("neg-envelope-format-byte-0x00", "Envelope format byte 0x00.", envelope=b"\x00" + env[1:])
    neg("neg-envelope-unknown-algorithm", "Algorithm id 0x02.", envelope=env[:1] + b"\x02" + env[2:])
    neg("neg-envelope-algorithm-zero", "Algorithm id 0x00.", envelope=env[:1] + b"\x00" + env[2:])
    neg("neg-envelope-empty", "An empty envelope.", envelope=b"")
    neg("neg-envelope-23-bytes", "Envelope truncated to 23 bytes (inside the fixed header).", envelope=env[:23])
    neg("neg-envelope-truncated-one-byte", "Envelope with its last byte removed.", envelope=env[:-1])
    neg("neg-envelope-truncated-in-commitment", "Envelope cut inside the commitment.", envelope=env[: commit_at + 16])
    neg("neg-envelope-trailing-byte", "Envelope with one extra byte appended.", envelope=env + b"\x00")
    neg("neg-envelope-key-version-zero", "Key version field set to 0.",
        envelope=env[:18] + struct.pack(">I", 0) + env[22:])
    neg("neg-envelope-kek-len-zero", "KEK id length 0 with the id bytes removed.",
        envelope=ref_envelope(dek_id, 1, b"", commitment, wrapped))
    neg("neg-envelope-kek-len-over-max", "KEK id length 1025 (over the 1024 cap), with 1025 id bytes.",
        envelope=ref_envelope(dek_id, 1, "k" * 1025, commitment, wrapped))
    neg("neg-envelope-kek-len-overflow", "KEK id length field 0x0400 (1024) pointing past the end of the envelope.",
        envelope=env[:22] + struct.pack(">H", 1024) + env[24:])
    neg("neg-envelope-kek-len-ffff", "KEK id length field 0xffff.", envelope=env[:22] + b"\xff\xff" + env[24:])
    neg("neg-envelope-kek-id-not-utf8", "First KEK id byte replaced by 0xff (not UTF-8).",
        envelope=env[:24] + b"\xff" + env[25:])
    neg("neg-envelope-wrapped-len-zero", "Wrapped DEK length 0 with no wrapped bytes.",
        envelope=ref_envelope(dek_id, 1, basic.kek_id, commitment, b""))
    neg("neg-envelope-wrapped-len-over-max", "Wrapped DEK length 4097 (over the 4096 cap), with 4097 bytes.",
        envelope=ref_envelope(dek_id, 1, basic.kek_id, commitment, wrapped + bytes(4097 - len(wrapped))))
    neg("neg-envelope-wrapped-len-short", "Wrapped DEK length field 60 while 61 bytes follow.",
        envelope=ref_envelope(dek_id, 1, basic.kek_id, commitment, wrapped, wrapped_len=60))
    # envelope fields bound by the KMS or the commitment
    neg("neg-envelope-key-version-changed", "Key version 1 changed to 2: the KMS context no longer matches.",
        envelope=env[:18] + struct.pack(">I", 2) + env[22:])
    rb = rotation.vector(0, 0)
    out.append(dict(
        {k: x for k, x in rb.items() if k not in ("plaintext", "dek", "nonce")},
        id="neg-rewrap-rollback-version",
        description="rewrap-before with its key version set to 2 (the version of rewrap-after), KEK unchanged.",
        envelope=(rotation.envelope[:18] + struct.pack(">I", 2) + rotation.envelope[22:]).hex(),
        error="DecryptionError",
    ))
    neg("neg-envelope-kek-id-changed", "KEK id changed to kek-beta, another existing KEK: it cannot unwrap.",
        kek_id="kek-beta", kek=kek_material("kek-beta").hex(),
        envelope=ref_envelope(dek_id, 1, "kek-beta", commitment, wrapped))
    neg("neg-envelope-dek-id-changed", "A bit of the envelope dek_id flipped, and the cell's dek_id changed to match: "
        "the KMS context no longer matches.", envelope=flip(env, 2), cell=flip(cell, 1))
    neg("neg-envelope-commitment-flipped", "A bit of the key commitment flipped: unwrap passes, the commitment fails.",
        envelope=flip(env, commit_at))
    neg("neg-envelope-wrapped-dek-flipped", "A bit of the wrapped DEK's GCM tag flipped.", envelope=flip(env, len(env) - 1))
    neg("neg-local-wrap-version-byte", "LocalKms wrap version byte 0x02.", envelope=flip(env, wrapped_at, 0x03))
    neg("neg-local-wrap-60-bytes", "LocalKms wrapped DEK of 60 bytes (one short), lengths consistent.",
        envelope=ref_envelope(dek_id, 1, basic.kek_id, commitment, wrapped[:60]))
    # the plain type descriptor (cell AAD "type")
    def neg_from(dek: Dek, j: int, id_: str, description: str, **overrides) -> None:
        base = dek.vector(j, 0)
        v = {k: x for k, x in base.items() if k not in ("plaintext", "dek", "nonce", "arrow_type", "avro_type", "value")}
        v.update(id=id_, description=description + f" Base: {base['id']}.", **overrides)
        v["error"] = "DecryptionError"
        out.append(v)

    neg_from(typed_dek, 0, "neg-wrong-type",
             "The int64 cell read as arrow:double (same 8-byte width): the type descriptor is in the cell AAD.",
             type=ref_arrow_type("double"))
    neg_from(typed_dek, 4, "neg-wrong-type-timestamp-unit",
             "The timestamp[us, tz=UTC] cell read as timestamp[ns, tz=UTC].",
             type=ref_arrow_type("timestamp[ns, tz=UTC]"))
    neg_from(avro, 0, "neg-wrong-type-avro",
             'The Avro "string" cell read as "bytes" (identical encoding): the type descriptor is in the cell AAD.',
             type=ref_avro_type("bytes"))
    neg_from(avro, 1, "neg-wrong-type-avro-union-order",
             'The ["null", "long"] cell read as ["long", "null"].', type=ref_avro_type(["long", "null"]))
    neg_from(avro, 0, "neg-wrong-type-codec",
             'The Avro "string" cell read with the Arrow descriptor arrow:string.', type=ref_arrow_type("string"))

    other_dek = Stream("neg/substitute")(32)
    substituted = ref_wrap(basic.kek_id, other_dek, Stream("neg/substitute-nonce")(12), loc_ctx)
    neg("neg-substituted-dek", "A different DEK, validly wrapped with the right KMS context, under the original "
        "commitment: the commitment check fails.", envelope=ref_envelope(dek_id, 1, basic.kek_id, commitment, substituted))
    neg("neg-substituted-dek-and-commitment", "A different DEK, validly wrapped, with its own correct commitment: "
        "the cell fails to authenticate.",
        envelope=ref_envelope(dek_id, 1, basic.kek_id, ref_hkdf(other_dek, dek_id, b"keyturn/v1/commitment"), substituted))

    for v in out:
        try:
            ref_open(v)
        except Reject as exc:
            v["fails_at"] = exc.args[0]
        else:
            raise AssertionError(f"{v['id']}: the reference reader accepted a negative vector")
    return out


# --------------------------------------------------------------------------- checks and output


def check(files: dict[str, dict]) -> None:
    ids = set()
    for doc in files.values():
        for v in doc["vectors"]:
            assert v["id"] not in ids, f"duplicate id {v['id']}"
            ids.add(v["id"])
            if "plaintext" in v:
                assert ref_open(v) == bytes.fromhex(v["plaintext"]), v["id"]
                assert keyturn_open(v) == bytes.fromhex(v["plaintext"]), v["id"]
            else:
                try:
                    keyturn_open(v)
                except DecryptionError:
                    pass
                else:
                    raise AssertionError(f"{v['id']}: keyturn accepted a negative vector")


def render(doc: dict) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="write the JSON files (never over frozen vectors)")
    args = parser.parse_args()
    files = build()
    check(files)
    status = 0
    for name, doc in files.items():
        path = HERE / name
        text = render(doc)
        if args.write:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {name}: {len(doc['vectors'])} vectors")
        elif not path.exists() or path.read_text(encoding="utf-8") != text:
            print(f"{name}: differs from the generator output")
            status = 1
        else:
            print(f"{name}: {len(doc['vectors'])} vectors, identical")
    return status


if __name__ == "__main__":
    sys.exit(main())
