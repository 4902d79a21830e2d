"""Known-answer vectors of wire format v1 (docs/vectors/*.json, docs/FORMAT.md).

The vectors are frozen. If one of these tests fails, the code can no longer
read (or no longer rejects) data that is already written: fix the code,
never the vectors. (They were regenerated once, before v1 was released, when
the plain type descriptor joined the cell AAD.)
"""

from __future__ import annotations

import datetime as dt
import io
import json
from decimal import Decimal
from pathlib import Path

import fastavro
import pyarrow as pa
import pytest

from keyturn.arrow_values import arrow_type_descriptor, from_plaintexts, to_plaintexts
from keyturn.avro_codec import avro_type_descriptor
from keyturn.context import encode_context
from keyturn.errors import DecryptionError
from keyturn.format import cell_aad, derive_commitment, parse_envelope
from keyturn.kms.local import LocalKms
from keyturn.reader import DekReader
from keyturn.scope import Location

DOCS_DIR = Path(__file__).resolve().parents[1] / "docs"
VECTOR_DIR = DOCS_DIR / "vectors"
OPAQUE_MESSAGE = str(DecryptionError())


def _load() -> list[dict]:
    vectors: list[dict] = []
    for path in sorted(VECTOR_DIR.glob("*.json")):
        vectors.extend(json.loads(path.read_text(encoding="utf-8"))["vectors"])
    return vectors


VECTORS = _load()
POSITIVE = [v for v in VECTORS if "plaintext" in v]
NEGATIVE = [v for v in VECTORS if "error" in v]
BY_ID = {v["id"]: v for v in VECTORS}


def _params(vectors: list[dict]) -> list:
    return [pytest.param(v, id=v["id"]) for v in vectors]


def _open(v: dict) -> bytes:
    """Decrypt a vector's cell exactly as the read path does."""
    kms = LocalKms.in_memory({v["kek_id"]: bytes.fromhex(v["kek"])})
    with DekReader(kms) as reader:
        opened = reader.open(bytes.fromhex(v["envelope"]), Location(v["dataset"], v["partition"]))
        bindings = {name: bytes.fromhex(value) for name, value in v["bindings"].items()}
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


def test_vector_set_is_complete() -> None:
    assert len(VECTORS) >= 30
    assert len(NEGATIVE) >= 10
    assert len(POSITIVE) + len(NEGATIVE) == len(VECTORS)
    ids = [v["id"] for v in VECTORS]
    assert len(ids) == len(set(ids)), "vector ids must be unique"
    for v in VECTORS:
        assert ("plaintext" in v) != ("error" in v), v["id"]
        assert v.get("error", "DecryptionError") == "DecryptionError", v["id"]
        assert len(bytes.fromhex(v["kek"])) == 32, v["id"]
        assert isinstance(v["type"], str) and v["type"].startswith(("arrow:", "avro:")), v["id"]
    for needed in ("neg-wrong-type", "neg-wrong-type-avro"):
        assert needed in BY_ID and "error" in BY_ID[needed]


def test_wrong_type_vectors_differ_from_their_base_only_in_the_type() -> None:
    """The same cell, envelope and location: only the descriptor changed, and that alone is rejected."""
    pairs = [("neg-wrong-type", "int64-negative"), ("neg-wrong-type-avro", "avro-string")]
    for neg_id, base_id in pairs:
        neg, base = BY_ID[neg_id], BY_ID[base_id]
        for key in ("envelope", "cell", "dataset", "partition", "field", "bindings", "kek_id"):
            assert neg[key] == base[key], (neg_id, key)
        assert neg["type"] != base["type"]
    assert (BY_ID["neg-wrong-type"]["type"], BY_ID["int64-negative"]["type"]) == ("arrow:double", "arrow:int64")


@pytest.mark.parametrize("v", _params(POSITIVE))
def test_positive_vector_decrypts(v: dict) -> None:
    assert _open(v) == bytes.fromhex(v["plaintext"])


@pytest.mark.parametrize("v", _params(NEGATIVE))
def test_negative_vector_is_rejected(v: dict) -> None:
    with pytest.raises(DecryptionError) as caught:
        _open(v)
    err = caught.value
    assert type(err) is DecryptionError
    assert str(err) == OPAQUE_MESSAGE
    assert err.args == (OPAQUE_MESSAGE,)
    assert err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__


def test_every_rejection_has_the_same_message() -> None:
    messages = set()
    for v in NEGATIVE:
        try:
            _open(v)
        except DecryptionError as err:
            messages.add(str(err))
    assert messages == {OPAQUE_MESSAGE}


@pytest.mark.parametrize("v", _params(POSITIVE))
def test_envelope_reserializes_byte_identical(v: dict) -> None:
    raw = bytes.fromhex(v["envelope"])
    envelope = parse_envelope(raw)
    assert envelope.to_bytes() == raw
    assert envelope.kek_id == v["kek_id"]
    cell = bytes.fromhex(v["cell"])
    assert cell[1:17] == envelope.dek_id
    assert int.from_bytes(cell[17:29], "big") == v["nonce"]
    assert derive_commitment(bytes.fromhex(v["dek"]), envelope.dek_id) == envelope.commitment


def test_rewrap_keeps_cell_bytes() -> None:
    pairs = [(v, BY_ID[v["rewrap_of"]]) for v in POSITIVE if "rewrap_of" in v]
    assert pairs
    for after, before in pairs:
        assert after["cell"] == before["cell"]
        old, new = parse_envelope(bytes.fromhex(before["envelope"])), parse_envelope(bytes.fromhex(after["envelope"]))
        assert (new.dek_id, new.commitment) == (old.dek_id, old.commitment)
        assert (new.key_version, new.kek_id) != (old.key_version, old.kek_id)


_ARROW_TYPES = {
    str(t): t
    for t in (
        pa.int32(),
        pa.int64(),
        pa.float64(),
        pa.decimal128(38, 9),
        pa.timestamp("us", tz="UTC"),
        pa.date32(),
        pa.bool_(),
    )
}


def _python_value(arrow_type: pa.DataType, value: object) -> object:
    if pa.types.is_decimal(arrow_type):
        return Decimal(value)
    if pa.types.is_timestamp(arrow_type):
        return dt.datetime.fromisoformat(value)
    if pa.types.is_date(arrow_type):
        return dt.date.fromisoformat(value)
    return value


@pytest.mark.parametrize("v", _params([v for v in POSITIVE if "arrow_type" in v]))
def test_typed_plaintext_matches_arrow_serialization(v: dict) -> None:
    arrow_type = _ARROW_TYPES[v["arrow_type"]]
    value = _python_value(arrow_type, v["value"])
    plaintext = bytes.fromhex(v["plaintext"])
    assert to_plaintexts(pa.array([value], arrow_type)) == [plaintext]
    assert from_plaintexts([plaintext], pa.field(v["field"], arrow_type)).to_pylist() == [value]
    assert arrow_type_descriptor(arrow_type) == v["type"]


@pytest.mark.parametrize("v", _params([v for v in POSITIVE if "avro_type" in v]))
def test_avro_plaintext_and_descriptor(v: dict) -> None:
    """Avro cells: the Avro binary encoding under the plain type (union branch index included)."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(v["avro_type"]), v["value"])
    assert buf.getvalue() == bytes.fromhex(v["plaintext"])
    assert avro_type_descriptor(v["avro_type"]) == v["type"]


def test_format_md_worked_example_matches_its_vector() -> None:
    """The hex in FORMAT.md's worked example is the string-utf8-basic vector, byte for byte."""
    v = BY_ID["string-utf8-basic"]
    text = (DOCS_DIR / "FORMAT.md").read_text(encoding="utf-8").split("## 19. Worked example", 1)[1]
    tables: list[str] = []
    block: list[str] = []
    code: list[str] = []
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            code.append(line)
        elif line.startswith("| `"):
            block.append(line.split("`")[1])
        elif block:
            tables.append("".join(block))
            block = []
    if block:
        tables.append("".join(block))
    assert tables == [v["envelope"], v["cell"]]
    envelope = parse_envelope(bytes.fromhex(v["envelope"]))
    aad = encode_context(
        cell_aad(
            dataset=v["dataset"], partition=v["partition"], field=v["field"], dek_id=envelope.dek_id, value_type=v["type"]
        )
    )
    assert "".join("".join(code).split()) == aad.hex()
