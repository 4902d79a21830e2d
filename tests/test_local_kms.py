"""LocalKms: the embedded single-node KMS (keyturn/kms/local.py)."""

from __future__ import annotations

import base64
import copy
import json
import multiprocessing
import os
import pickle
import stat

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyturn.context import encode_context
from keyturn.errors import (
    DecryptionError,
    KeystoreError,
    KmsAccessDeniedError,
    KmsError,
    KmsKeyNotFoundError,
)
from keyturn.kms.base import CountingKms, KmsBackend
from keyturn.kms.local import (
    MIN_SCRYPT_N,
    WARNING,
    WRAPPED_DEK_BYTES,
    LocalKms,
    generate_root_key_file,
)
from keyturn.secret import SecretKey

FAST_N = MIN_SCRYPT_N  # low scrypt cost, tests only
CTX = {"dataset": "sales", "partition": "2024-01-01", "dek_id": "00112233"}
KEK_A = bytes(range(32))
KEK_B = bytes(range(32, 64))


@pytest.fixture
def kms() -> LocalKms:
    return LocalKms.in_memory({"a": KEK_A, "b": KEK_B})


@pytest.fixture
def key_file(tmp_path):
    return generate_root_key_file(tmp_path / "root.key")


@pytest.fixture
def file_kms(tmp_path, key_file) -> LocalKms:
    kms = LocalKms.create(tmp_path / "keystore.json", key_file=key_file)
    kms.create_kek("a")
    kms.create_kek("b")
    return kms


def _sequence(*chunks: bytes):
    """A random_bytes that hands out `chunks` in order and checks the requested sizes."""
    pending = list(chunks)

    def random_bytes(n: int) -> bytes:
        chunk = pending.pop(0)
        assert len(chunk) == n
        return chunk

    return random_bytes


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("mode", ["memory", "file"])
def test_generate_then_decrypt_round_trips(mode, kms, file_kms):
    backend = kms if mode == "memory" else file_kms
    assert isinstance(backend, KmsBackend)
    gen = backend.generate_data_key("a", CTX)
    assert isinstance(gen.plaintext, SecretKey) and len(gen.plaintext) == 32
    assert gen.kek_id == "a"
    assert len(gen.wrapped) == WRAPPED_DEK_BYTES == 61 and gen.wrapped[0] == 0x01
    assert gen.request_id.startswith("local-") and len(gen.request_id) == len("local-") + 32
    out = backend.decrypt("a", gen.wrapped, dict(CTX))
    assert out.plaintext.material == gen.plaintext.material
    assert out.request_id != gen.request_id
    assert backend.generate_data_key("a", CTX).plaintext.material != gen.plaintext.material


def test_empty_context_round_trips(kms):
    gen = kms.generate_data_key("a", {})
    assert kms.decrypt("a", gen.wrapped, {}).plaintext.material == gen.plaintext.material


def test_counting_wrapper_accepts_local_kms(kms):
    counted = CountingKms(kms)
    gen = counted.generate_data_key("a", CTX)
    counted.decrypt("a", gen.wrapped, CTX)
    counted.rewrap(gen.wrapped, source_kek_id="a", source_context=CTX, destination_kek_id="b", destination_context=CTX)
    assert (counted.calls.generate, counted.calls.decrypt, counted.calls.rewrap) == (1, 1, 1)


def test_known_answer_vector():
    dek = bytes(range(0xA0, 0xC0))
    nonce = bytes(range(0xD0, 0xDC))
    kms = LocalKms.in_memory({"kek-1": KEK_A}, random_bytes=_sequence(dek, nonce))
    ctx = {"dataset": "sales", "partition": "2024-01-01"}
    gen = kms.generate_data_key("kek-1", ctx)
    # Independent computation from the normative description.
    aad = encode_context({"kms:kek": "kek-1", **ctx})
    expected = b"\x01" + nonce + AESGCM(KEK_A).encrypt(nonce, dek, aad)
    assert gen.plaintext.material == dek
    assert gen.wrapped == expected
    assert gen.wrapped.hex() == (
        "01d0d1d2d3d4d5d6d7d8d9dadb"  # version, nonce
        "8c0644cdcc025706f0f682145a7b294e7fbbef66f4280ef18b33f42db38e9078"  # ciphertext
        "cc564cbb3c394d1ad2a85b028da944b6"  # tag
    )
    assert LocalKms.in_memory({"kek-1": KEK_A}).decrypt("kek-1", expected, ctx).plaintext.material == dek


# ----------------------------------------------------------------------------- binding and tampering


@pytest.mark.parametrize(
    "other",
    [
        {**CTX, "partition": "2024-01-02"},
        {k: v for k, v in CTX.items() if k != "dek_id"},
        {**CTX, "extra": ""},
        {},
    ],
)
def test_wrong_context_is_decryption_error(kms, other):
    gen = kms.generate_data_key("a", CTX)
    with pytest.raises(DecryptionError):
        kms.decrypt("a", gen.wrapped, other)


def test_context_encoding_is_injective(kms):
    gen = kms.generate_data_key("a", {"ab": "c"})
    with pytest.raises(DecryptionError):
        kms.decrypt("a", gen.wrapped, {"a": "bc"})
    assert kms.decrypt("a", gen.wrapped, {"ab": "c"}).plaintext.material == gen.plaintext.material


def test_kek_id_is_bound_even_with_identical_material():
    kms = LocalKms.in_memory({"x": KEK_A, "y": KEK_A})
    gen = kms.generate_data_key("x", CTX)
    with pytest.raises(DecryptionError):
        kms.decrypt("y", gen.wrapped, CTX)


def test_every_bit_flip_is_decryption_error(kms):
    gen = kms.generate_data_key("a", CTX)
    for i in range(len(gen.wrapped) * 8):
        bad = bytearray(gen.wrapped)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(DecryptionError):
            kms.decrypt("a", bytes(bad), CTX)


def test_wrong_length_or_version_is_decryption_error(kms):
    wrapped = kms.generate_data_key("a", CTX).wrapped
    for n in range(len(wrapped)):
        with pytest.raises(DecryptionError):
            kms.decrypt("a", wrapped[:n], CTX)
    for bad in (wrapped + b"\x00", b"\x02" + wrapped[1:], b"\x00" * 61):
        with pytest.raises(DecryptionError):
            kms.decrypt("a", bad, CTX)


def test_decryption_error_is_opaque(kms):
    gen = kms.generate_data_key("a", CTX)
    messages = set()
    for bad_wrapped, ctx in ((gen.wrapped[:-1], CTX), (gen.wrapped, {}), (b"\x09" + gen.wrapped[1:], CTX)):
        with pytest.raises(DecryptionError) as info:
            kms.decrypt("a", bad_wrapped, ctx)
        messages.add(str(info.value))
    assert len(messages) == 1


@pytest.mark.parametrize(
    "ctx, error",
    [
        ([("dataset", "x")], TypeError),
        ({"dataset": b"x"}, TypeError),
        ({"dataset": 1}, TypeError),
        ({1: "x"}, TypeError),
        ({"kms:kek": "b"}, ValueError),
    ],
)
def test_bad_context_is_caller_error(kms, ctx, error):
    with pytest.raises(error):
        kms.generate_data_key("a", ctx)
    wrapped = kms.generate_data_key("a", CTX).wrapped
    with pytest.raises(error):
        kms.decrypt("a", wrapped, ctx)


def test_bad_kek_id_and_wrapped_types(kms):
    with pytest.raises(TypeError):
        kms.generate_data_key(1, CTX)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        kms.create_kek("")
    with pytest.raises(ValueError):
        kms.create_kek("bad\nid")
    with pytest.raises(TypeError):
        kms.decrypt("a", "not bytes", CTX)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- rewrap


@pytest.mark.parametrize("mode", ["memory", "file"])
def test_rewrap_moves_dek_to_other_kek(mode, kms, file_kms):
    backend = kms if mode == "memory" else file_kms
    gen = backend.generate_data_key("a", CTX)
    new_ctx = {**CTX, "key_version": "2"}
    out = backend.rewrap(
        gen.wrapped, source_kek_id="a", source_context=CTX, destination_kek_id="b", destination_context=new_ctx
    )
    assert out.kek_id == "b" and out.request_id.startswith("local-")
    assert len(out.wrapped) == 61 and out.wrapped != gen.wrapped
    assert backend.decrypt("b", out.wrapped, new_ctx).plaintext.material == gen.plaintext.material
    with pytest.raises(DecryptionError):
        backend.decrypt("a", out.wrapped, new_ctx)
    with pytest.raises(DecryptionError):
        backend.decrypt("b", out.wrapped, CTX)
    # The old wrapped DEK is untouched and still decrypts under the old KEK.
    assert backend.decrypt("a", gen.wrapped, CTX).plaintext.material == gen.plaintext.material


def test_rewrap_with_wrong_source_context_fails(kms):
    gen = kms.generate_data_key("a", CTX)
    with pytest.raises(DecryptionError):
        kms.rewrap(gen.wrapped, source_kek_id="a", source_context={}, destination_kek_id="b", destination_context=CTX)
    with pytest.raises(DecryptionError):
        kms.rewrap(gen.wrapped, source_kek_id="b", source_context=CTX, destination_kek_id="a", destination_context=CTX)


# ----------------------------------------------------------------------------- KEK lifecycle


@pytest.mark.parametrize("mode", ["memory", "file"])
def test_disabled_kek_is_access_denied(mode, kms, file_kms):
    backend = kms if mode == "memory" else file_kms
    gen_a = backend.generate_data_key("a", CTX)
    gen_b = backend.generate_data_key("b", CTX)
    backend.disable_kek("a")
    backend.disable_kek("a")  # idempotent
    assert backend.has_kek("a") and "a" in backend.kek_ids()
    with pytest.raises(KmsAccessDeniedError):
        backend.generate_data_key("a", CTX)
    with pytest.raises(KmsAccessDeniedError):
        backend.decrypt("a", gen_a.wrapped, CTX)
    with pytest.raises(KmsAccessDeniedError):
        backend.rewrap(gen_a.wrapped, source_kek_id="a", source_context=CTX, destination_kek_id="b", destination_context=CTX)
    with pytest.raises(KmsAccessDeniedError):
        backend.rewrap(gen_b.wrapped, source_kek_id="b", source_context=CTX, destination_kek_id="a", destination_context=CTX)
    backend.enable_kek("a")
    assert backend.decrypt("a", gen_a.wrapped, CTX).plaintext.material == gen_a.plaintext.material


def test_unknown_kek_is_not_found(kms):
    gen = kms.generate_data_key("a", CTX)
    with pytest.raises(KmsKeyNotFoundError):
        kms.generate_data_key("nope", CTX)
    with pytest.raises(KmsKeyNotFoundError):
        kms.decrypt("nope", gen.wrapped, CTX)
    with pytest.raises(KmsKeyNotFoundError):
        kms.rewrap(gen.wrapped, source_kek_id="a", source_context=CTX, destination_kek_id="nope", destination_context=CTX)
    with pytest.raises(KmsKeyNotFoundError):
        kms.disable_kek("nope")
    with pytest.raises(KmsKeyNotFoundError):
        kms.enable_kek("nope")
    assert not kms.has_kek("nope")


@pytest.mark.parametrize("mode", ["memory", "file"])
def test_create_kek_ids_and_duplicates(mode, kms, file_kms):
    backend = kms if mode == "memory" else file_kms
    assert backend.create_kek("c") == "c"
    assert backend.kek_ids() == ["a", "b", "c"]
    with pytest.raises(ValueError):
        backend.create_kek("a")
    gen = backend.generate_data_key("c", CTX)
    assert backend.decrypt("c", gen.wrapped, CTX).plaintext.material == gen.plaintext.material


def test_in_memory_rejects_bad_material():
    with pytest.raises(ValueError):
        LocalKms.in_memory({"a": b"short"})
    with pytest.raises(TypeError):
        LocalKms.in_memory({"a": "x" * 32})  # type: ignore[dict-item]


# ----------------------------------------------------------------------------- keystore persistence


def test_passphrase_keystore_persists_across_reopen(tmp_path):
    path = tmp_path / "ks.json"
    kms = LocalKms.create(path, passphrase="correct horse", scrypt_n=FAST_N)
    kms.create_kek("a")
    gen = kms.generate_data_key("a", CTX)
    kms.disable_kek("a")
    kms.create_kek("b")
    doc = json.loads(path.read_text())
    assert doc["warning"] == WARNING and "SINGLE-NODE" in doc["warning"]
    assert doc["root"]["kdf"] == "scrypt" and doc["root"]["n"] == FAST_N
    assert (doc["root"]["r"], doc["root"]["p"]) == (8, 1)
    assert len(base64.b64decode(doc["root"]["salt"])) == 16
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    again = LocalKms.open(path, passphrase="correct horse")
    assert again.kek_ids() == ["a", "b"]
    with pytest.raises(KmsAccessDeniedError):
        again.decrypt("a", gen.wrapped, CTX)
    again.enable_kek("a")
    assert again.decrypt("a", gen.wrapped, CTX).plaintext.material == gen.plaintext.material
    assert LocalKms(path, passphrase=b"correct horse").has_kek("b")


def test_key_file_keystore_persists_across_reopen(tmp_path, key_file):
    path = tmp_path / "ks.json"
    kms = LocalKms.create(path, key_file=key_file)
    kms.create_kek("a")
    gen = kms.generate_data_key("a", CTX)
    again = LocalKms.open(path, key_file=key_file)
    assert again.kek_ids() == ["a"]
    assert again.decrypt("a", gen.wrapped, CTX).plaintext.material == gen.plaintext.material


def test_changes_by_another_instance_are_seen_without_reopen(file_kms, key_file):
    other = LocalKms.open(file_kms.path, key_file=key_file)
    gen = file_kms.generate_data_key("a", CTX)
    other.create_kek("c")
    other.disable_kek("a")
    assert file_kms.kek_ids() == ["a", "b", "c"]
    with pytest.raises(KmsAccessDeniedError):
        file_kms.decrypt("a", gen.wrapped, CTX)


def test_wrong_passphrase_is_keystore_error(tmp_path):
    path = tmp_path / "ks.json"
    LocalKms.create(path, passphrase="right one", scrypt_n=FAST_N).create_kek("a")
    with pytest.raises(KeystoreError) as info:
        LocalKms.open(path, passphrase="wrong one")
    assert str(info.value).startswith("cannot open keystore")
    assert "wrong one" not in str(info.value) and "right one" not in str(info.value)
    with pytest.raises(KeystoreError):
        LocalKms.open(path, key_file=generate_root_key_file(tmp_path / "k"))


def test_wrong_key_file_is_keystore_error(tmp_path, key_file):
    path = tmp_path / "ks.json"
    LocalKms.create(path, key_file=key_file)
    with pytest.raises(KeystoreError) as info:
        LocalKms.open(path, key_file=generate_root_key_file(tmp_path / "other.key"))
    assert str(info.value).startswith("cannot open keystore")
    with pytest.raises(KeystoreError):
        LocalKms.open(path, passphrase="anything")


def test_key_file_mode_and_length_are_checked(tmp_path, key_file):
    os.chmod(key_file, 0o644)
    with pytest.raises(KeystoreError, match="mode 0644"):
        LocalKms.create(tmp_path / "ks.json", key_file=key_file)
    os.chmod(key_file, 0o640)
    with pytest.raises(KeystoreError):
        LocalKms.create(tmp_path / "ks.json", key_file=key_file)
    short = tmp_path / "short.key"
    short.write_bytes(os.urandom(31))
    os.chmod(short, 0o600)
    with pytest.raises(KeystoreError, match="exactly 32 bytes"):
        LocalKms.create(tmp_path / "ks.json", key_file=short)
    short.write_bytes(os.urandom(33))
    with pytest.raises(KeystoreError):
        LocalKms.create(tmp_path / "ks.json", key_file=short)
    with pytest.raises(KeystoreError):
        LocalKms.create(tmp_path / "ks.json", key_file=tmp_path / "missing.key")
    assert not (tmp_path / "ks.json").exists()


def test_symlinked_key_file_is_checked_at_its_target(tmp_path, key_file):
    link = tmp_path / "link.key"
    link.symlink_to(key_file)
    LocalKms.create(tmp_path / "ks.json", key_file=link).create_kek("a")
    assert LocalKms.open(tmp_path / "ks.json", key_file=key_file).kek_ids() == ["a"]
    os.chmod(key_file, 0o604)
    with pytest.raises(KeystoreError):
        LocalKms.open(tmp_path / "ks.json", key_file=link)


def test_generate_root_key_file(tmp_path):
    path = tmp_path / "root.key"
    assert generate_root_key_file(path) == str(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first = path.read_bytes()
    assert len(first) == 32
    with pytest.raises(FileExistsError):
        generate_root_key_file(path)
    assert path.read_bytes() == first
    assert os.listdir(tmp_path) == ["root.key"]  # no temp files left behind


def test_create_refuses_existing_and_bad_arguments(tmp_path, key_file):
    path = tmp_path / "ks.json"
    LocalKms.create(path, key_file=key_file)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        LocalKms.create(path, key_file=key_file)
    assert path.read_bytes() == before
    with pytest.raises(ValueError):
        LocalKms.create(tmp_path / "x.json", passphrase="p", key_file=key_file)
    with pytest.raises(ValueError):
        LocalKms.create(tmp_path / "x.json")
    with pytest.raises(ValueError):
        LocalKms.create(tmp_path / "x.json", passphrase="")
    with pytest.raises(ValueError):
        LocalKms.create(tmp_path / "x.json", passphrase="p", scrypt_n=3000)
    with pytest.raises(ValueError):
        LocalKms.create(tmp_path / "x.json", passphrase="p", scrypt_n=16)
    with pytest.raises(KeystoreError):
        LocalKms.open(tmp_path / "missing.json", key_file=key_file)


def _entries(path):
    return json.loads(path.read_text())


def test_keystore_holds_no_kek_plaintext(tmp_path, key_file):
    path = tmp_path / "ks.json"
    kms = LocalKms.create(path, key_file=key_file)
    kms.create_kek("a")
    kms.create_kek("b")
    kms.disable_kek("b")
    doc = _entries(path)
    root = AESGCM(open(key_file, "rb").read())
    raw = path.read_bytes()
    for kek_id, entry in doc["keks"].items():
        aad = encode_context(
            {
                "keyturn:local-kms": "kek",
                "kek_id": kek_id,
                "created_at": entry["created_at"],
                "enabled": "true" if entry["enabled"] else "false",
            }
        )
        material = root.decrypt(base64.b64decode(entry["nonce"]), base64.b64decode(entry["sealed"]), aad)
        assert len(material) == 32
        # It really is the KEK: an in-memory KMS with that material unwraps what the file KMS wrapped.
        kms.enable_kek(kek_id)
        gen = kms.generate_data_key(kek_id, CTX)
        probe = LocalKms.in_memory({kek_id: material})
        assert probe.decrypt(kek_id, gen.wrapped, CTX).plaintext.material == gen.plaintext.material
        raw = path.read_bytes()
        for needle in (
            material,
            material.hex().encode(),
            material.hex().upper().encode(),
            base64.b64encode(material),
            base64.b64encode(material).rstrip(b"="),
            base64.urlsafe_b64encode(material).rstrip(b"="),
        ):
            assert needle not in raw
    root_key = open(key_file, "rb").read()
    for needle in (root_key, root_key.hex().encode(), base64.b64encode(root_key)):
        assert needle not in raw


def test_moving_sealed_material_between_ids_fails(file_kms):
    path = file_kms.path
    doc = json.loads(open(path).read())
    doc["keks"]["a"]["nonce"], doc["keks"]["b"]["nonce"] = doc["keks"]["b"]["nonce"], doc["keks"]["a"]["nonce"]
    doc["keks"]["a"]["sealed"], doc["keks"]["b"]["sealed"] = doc["keks"]["b"]["sealed"], doc["keks"]["a"]["sealed"]
    with open(path, "w") as fh:
        json.dump(doc, fh)
    with pytest.raises(KeystoreError, match="failed authentication"):
        file_kms.generate_data_key("a", CTX)
    with pytest.raises(KeystoreError):
        file_kms.generate_data_key("b", CTX)


def test_editing_the_enabled_flag_is_detected(file_kms):
    file_kms.disable_kek("a")
    path = file_kms.path
    doc = json.loads(open(path).read())
    doc["keks"]["a"]["enabled"] = True
    with open(path, "w") as fh:
        json.dump(doc, fh)
    with pytest.raises(KeystoreError):
        file_kms.generate_data_key("a", CTX)
    file_kms.generate_data_key("b", CTX)  # other entries stay usable


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],
        lambda raw: raw[:1],
        lambda raw: b"",
        lambda raw: b"\xff\xfe garbage",
        lambda raw: b"[]",
        lambda raw: raw.replace(b'"keyturn-local-kms-keystore"', b'"something-else"'),
        lambda raw: raw.replace(b'"version": 1', b'"version": 99'),
        lambda raw: raw.replace(b'"check": {', b'"check": {"nonce": "AAAA", '),
        lambda raw: raw.replace(b'"enabled": true', b'"enabled": "yes"'),
    ],
)
def test_corrupt_keystore_is_keystore_error(file_kms, key_file, damage):
    path = file_kms.path
    raw = open(path, "rb").read()
    bad = damage(raw)
    assert bad != raw
    with open(path, "wb") as fh:
        fh.write(bad)
    with pytest.raises(KeystoreError):
        LocalKms.open(path, key_file=key_file)
    with pytest.raises(KeystoreError):  # an open instance notices too
        file_kms.generate_data_key("a", CTX)
    assert issubclass(KeystoreError, KmsError)


def test_tampered_check_value_is_keystore_error(file_kms, key_file):
    path = file_kms.path
    doc = json.loads(open(path).read())
    sealed = bytearray(base64.b64decode(doc["check"]["sealed"]))
    sealed[0] ^= 1
    doc["check"]["sealed"] = base64.b64encode(bytes(sealed)).decode()
    with open(path, "w") as fh:
        json.dump(doc, fh)
    with pytest.raises(KeystoreError, match="cannot open keystore"):
        LocalKms.open(path, key_file=key_file)


# ----------------------------------------------------------------------------- object safety


def test_pickling_and_copying_refused(kms, file_kms):
    for obj in (kms, file_kms):
        with pytest.raises(TypeError):
            pickle.dumps(obj)
        with pytest.raises(TypeError):
            copy.copy(obj)
        with pytest.raises(TypeError):
            copy.deepcopy(obj)


def test_repr_shows_no_material(kms, file_kms):
    text = repr(kms) + str(kms) + repr(file_kms)
    assert "keks=2" in repr(kms) and "in-memory" in repr(kms)
    assert file_kms.path in repr(file_kms)
    for material in (KEK_A, KEK_B):
        assert material.hex() not in text and repr(material) not in text
        assert base64.b64encode(material).decode() not in text
    gen = kms.generate_data_key("a", CTX)
    assert gen.plaintext.material.hex() not in repr(gen)


def test_close_drops_keys(kms):
    kms.close()
    kms.close()
    assert "closed" in repr(kms)
    with pytest.raises(ValueError):
        kms.generate_data_key("a", CTX)


# ----------------------------------------------------------------------------- concurrency


def _create_keks(path: str, key_file: str, prefix: str, barrier) -> None:
    kms = LocalKms.open(path, key_file=key_file)
    barrier.wait(timeout=30)
    for i in range(5):
        kms.create_kek(f"{prefix}-{i}")


def test_two_processes_creating_keks_both_land(tmp_path, key_file):
    path = str(tmp_path / "ks.json")
    LocalKms.create(path, key_file=key_file)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_create_keks, args=(path, key_file, p, barrier)) for p in ("p", "q")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    kms = LocalKms.open(path, key_file=key_file)
    expected = sorted(f"{p}-{i}" for p in ("p", "q") for i in range(5))
    assert kms.kek_ids() == expected
    for kek_id in expected:
        gen = kms.generate_data_key(kek_id, CTX)
        assert kms.decrypt(kek_id, gen.wrapped, CTX).plaintext.material == gen.plaintext.material
    assert sorted(os.listdir(tmp_path)) == ["ks.json", "ks.json.lock", "root.key"]
