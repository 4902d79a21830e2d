"""AwsKms against moto's server on loopback: round trips, context binding, key names, error mapping.

Mirrors tests/test_local_kms.py where the two backends share behaviour. moto
does not throttle, refuse disabled keys or fail; those answers are injected
with `FaultInjector` (a botocore before-send hook returning a real AWS error
response), so botocore parses and retries them as it would on the wire.
"""

from __future__ import annotations

import copy
import hashlib
import pickle

import pytest
from aws_support import FaultInjector, client, moto_url, new_kms_key, unique  # noqa: F401  (moto_url is a fixture)

from keyturn.aws.kms import BINDING_KEY, AwsKms, bind_context
from keyturn.context import encode_context
from keyturn.errors import (
    DecryptionError,
    KmsAccessDeniedError,
    KmsClosedError,
    KmsError,
    KmsKeyNotFoundError,
    KmsThrottledError,
    KmsUnavailableError,
)
from keyturn.kms.base import CountingKms, KmsBackend
from keyturn.secret import SecretKey

pytestmark = pytest.mark.aws

CTX = {"keyturn:dataset": "sales", "keyturn:partition": "2024-01-01", "keyturn:dek": "00112233", "keyturn:version": "1"}


@pytest.fixture
def kms_client(moto_url):
    """A fresh client per test, so fault injectors never outlive their test."""
    return client("kms", moto_url, max_attempts=3)


@pytest.fixture(scope="module")
def key_a(moto_url):
    """A key with an alias, shared by the module (tests that disable it enable it again)."""
    return new_kms_key(client("kms", moto_url), alias=unique("alias/keyturn-a"))


@pytest.fixture(scope="module")
def key_b(moto_url):
    return new_kms_key(client("kms", moto_url))


@pytest.fixture
def kms(kms_client):
    backend = AwsKms(client=kms_client)
    yield backend
    backend.close()


def alias_of(kms_client, key) -> str:
    aliases = kms_client.list_aliases(KeyId=key["KeyId"])["Aliases"]
    assert len(aliases) == 1
    return aliases[0]["AliasName"]


# ----------------------------------------------------------------------------- round trips


def test_generate_then_decrypt_round_trips(kms, key_a):
    assert isinstance(kms, KmsBackend)
    gen = kms.generate_data_key(key_a["KeyId"], CTX)
    assert isinstance(gen.plaintext, SecretKey) and len(gen.plaintext) == 32
    assert gen.kek_id == key_a["KeyId"]
    assert 1 <= len(gen.wrapped) <= 6144 and gen.plaintext.material not in gen.wrapped
    assert gen.request_id and not gen.request_id.startswith("aws-kms")  # moto's real request id
    out = kms.decrypt(key_a["KeyId"], gen.wrapped, dict(CTX))
    assert out.plaintext.material == gen.plaintext.material
    assert out.request_id != gen.request_id
    assert kms.generate_data_key(key_a["KeyId"], CTX).plaintext.material != gen.plaintext.material


def test_empty_context_round_trips(kms, key_a):
    gen = kms.generate_data_key(key_a["KeyId"], {})
    assert kms.decrypt(key_a["KeyId"], gen.wrapped, {}).plaintext.material == gen.plaintext.material


def test_counting_wrapper_accepts_aws_kms(kms, key_a, key_b):
    counted = CountingKms(kms)
    gen = counted.generate_data_key(key_a["KeyId"], CTX)
    counted.decrypt(key_a["KeyId"], gen.wrapped, CTX)
    counted.rewrap(
        gen.wrapped,
        source_kek_id=key_a["KeyId"],
        source_context=CTX,
        destination_kek_id=key_b["KeyId"],
        destination_context=CTX,
    )
    assert (counted.calls.generate, counted.calls.decrypt, counted.calls.rewrap) == (1, 1, 1)
    assert len(set(counted.calls.request_ids)) == 3


def test_kms_sees_the_binding_pair(kms, kms_client, key_a):
    """What goes over the wire: the caller's pairs plus keyturn:ctx = sha256(encode_context(context))."""
    gen = kms.generate_data_key(key_a["KeyId"], CTX)
    expected = {**CTX, BINDING_KEY: hashlib.sha256(encode_context(CTX)).hexdigest()}
    assert bind_context(CTX) == expected
    # A raw KMS Decrypt with exactly that map succeeds; without the extra pair it fails.
    raw = kms_client.decrypt(CiphertextBlob=gen.wrapped, EncryptionContext=expected, KeyId=key_a["KeyId"])
    assert raw["Plaintext"] == gen.plaintext.material
    with pytest.raises(kms_client.exceptions.InvalidCiphertextException):
        kms_client.decrypt(CiphertextBlob=gen.wrapped, EncryptionContext=dict(CTX), KeyId=key_a["KeyId"])


# ----------------------------------------------------------------------------- binding


@pytest.mark.parametrize(
    "other",
    [
        {**CTX, "keyturn:partition": "2024-01-02"},
        {k: v for k, v in CTX.items() if k != "keyturn:dek"},
        {**CTX, "extra": ""},
        {**CTX, "keyturn:version": "2"},
        {},
    ],
)
def test_wrong_context_is_decryption_error(kms, key_a, other):
    gen = kms.generate_data_key(key_a["KeyId"], CTX)
    with pytest.raises(DecryptionError):
        kms.decrypt(key_a["KeyId"], gen.wrapped, other)


def test_moto_joins_context_pairs_and_the_binding_catches_it(kms, kms_client, key_a):
    """{"ab": "c"} and {"a": "bc"}: moto alone cannot tell them apart; keyturn's binding can."""
    raw = kms_client.generate_data_key(KeyId=key_a["KeyId"], KeySpec="AES_256", EncryptionContext={"ab": "c"})
    # moto's known difference: the raw KMS call accepts the other context.
    assert kms_client.decrypt(CiphertextBlob=raw["CiphertextBlob"], EncryptionContext={"a": "bc"})["Plaintext"] == (
        raw["Plaintext"]
    )
    # Through AwsKms the two contexts differ.
    gen = kms.generate_data_key(key_a["KeyId"], {"ab": "c"})
    with pytest.raises(DecryptionError):
        kms.decrypt(key_a["KeyId"], gen.wrapped, {"a": "bc"})
    assert kms.decrypt(key_a["KeyId"], gen.wrapped, {"ab": "c"}).plaintext.material == gen.plaintext.material
    assert bind_context({"ab": "c"})[BINDING_KEY] != bind_context({"a": "bc"})[BINDING_KEY]


@pytest.mark.parametrize(
    "ctx, error",
    [
        ([("dataset", "x")], TypeError),
        ({"dataset": b"x"}, TypeError),
        ({"dataset": 1}, TypeError),
        ({1: "x"}, TypeError),
        ({BINDING_KEY: "forged"}, ValueError),
    ],
)
def test_bad_context_is_caller_error(kms, key_a, ctx, error):
    with pytest.raises(error):
        kms.generate_data_key(key_a["KeyId"], ctx)
    wrapped = kms.generate_data_key(key_a["KeyId"], CTX).wrapped
    with pytest.raises(error):
        kms.decrypt(key_a["KeyId"], wrapped, ctx)


def test_bad_kek_id_and_wrapped_types(kms, key_a):
    with pytest.raises(TypeError):
        kms.generate_data_key(1, CTX)  # type: ignore[arg-type]
    for bad in ("", "has space", "x" * 2049, "line\nbreak"):
        with pytest.raises(ValueError):
            kms.generate_data_key(bad, CTX)
    with pytest.raises(TypeError):
        kms.decrypt(key_a["KeyId"], "not bytes", CTX)  # type: ignore[arg-type]
    for bad_len in (b"", b"\x00" * 6145):
        with pytest.raises(DecryptionError):
            kms.decrypt(key_a["KeyId"], bad_len, CTX)


def test_tampered_ciphertext_is_decryption_error(kms, key_a):
    gen = kms.generate_data_key(key_a["KeyId"], CTX)
    # Flip bits in the sealed part (the tail); moto reads its key reference from the head.
    for i in (len(gen.wrapped) - 1, len(gen.wrapped) - 20, len(gen.wrapped) - 40):
        bad = bytearray(gen.wrapped)
        bad[i] ^= 0x01
        with pytest.raises(DecryptionError):
            kms.decrypt(key_a["KeyId"], bytes(bad), CTX)
    with pytest.raises(DecryptionError):
        kms.decrypt(key_a["KeyId"], gen.wrapped[:-1], CTX)


def test_decryption_error_is_opaque(kms, key_a):
    gen = kms.generate_data_key(key_a["KeyId"], CTX)
    messages = set()
    for bad_wrapped, ctx in ((gen.wrapped[:-1], CTX), (gen.wrapped, {}), (b"", CTX)):
        with pytest.raises(DecryptionError) as info:
            kms.decrypt(key_a["KeyId"], bad_wrapped, ctx)
        messages.add(str(info.value))
        assert info.value.__cause__ is None
    assert len(messages) == 1


# ----------------------------------------------------------------------------- key names


def test_key_id_arn_alias_and_alias_arn_all_work(kms, kms_client, key_a):
    alias = alias_of(kms_client, key_a)
    alias_arn = key_a["Arn"].split(":key/")[0] + ":" + alias
    names = [key_a["KeyId"], key_a["Arn"], alias, alias_arn]
    for made_with in names:
        gen = kms.generate_data_key(made_with, CTX)
        for read_with in names:
            assert kms.decrypt(read_with, gen.wrapped, CTX).plaintext.material == gen.plaintext.material


def test_decrypt_names_the_key_so_another_key_is_refused(kms, key_a, key_b):
    """KeyId is always sent. Real KMS answers IncorrectKeyException (-> DecryptionError);
    moto answers AccessDeniedException (-> KmsAccessDeniedError). Either way nothing decrypts."""
    gen = kms.generate_data_key(key_a["KeyId"], CTX)
    with pytest.raises(KmsAccessDeniedError):
        kms.decrypt(key_b["KeyId"], gen.wrapped, CTX)


def test_incorrect_key_from_real_kms_is_decryption_error(kms, kms_client, key_a, key_b):
    gen = kms.generate_data_key(key_a["KeyId"], CTX)
    injector = FaultInjector.always(kms_client, code="IncorrectKeyException", operations={"Decrypt", "ReEncrypt"})
    with pytest.raises(DecryptionError):
        kms.decrypt(key_b["KeyId"], gen.wrapped, CTX)
    with pytest.raises(DecryptionError):
        kms.rewrap(
            gen.wrapped, source_kek_id=key_b["KeyId"], source_context=CTX, destination_kek_id=key_a["KeyId"], destination_context=CTX
        )
    assert injector.injected == 2  # not retried: data errors are final


@pytest.mark.parametrize("kek", ["alias/keyturn-does-not-exist", "00000000-0000-0000-0000-000000000000", "not-a-key"])
def test_unknown_key_is_not_found(kms, key_a, kek):
    gen = kms.generate_data_key(key_a["KeyId"], CTX)
    with pytest.raises(KmsKeyNotFoundError) as info:
        kms.generate_data_key(kek, CTX)
    assert kek in str(info.value)
    with pytest.raises(KmsKeyNotFoundError):
        kms.decrypt(kek, gen.wrapped, CTX)
    with pytest.raises(KmsKeyNotFoundError):
        kms.rewrap(gen.wrapped, source_kek_id=key_a["KeyId"], source_context=CTX, destination_kek_id=kek, destination_context=CTX)


# ----------------------------------------------------------------------------- rewrap


def test_rewrap_moves_dek_to_other_key_inside_kms(kms, kms_client, key_a, key_b):
    gen = kms.generate_data_key(key_a["KeyId"], CTX)
    sent: list[dict] = []
    kms_client.meta.events.register("provide-client-params.kms.ReEncrypt", lambda params, **_: sent.append(dict(params)))
    new_ctx = {**CTX, "keyturn:version": "2"}
    out = kms.rewrap(
        gen.wrapped, source_kek_id=key_a["KeyId"], source_context=CTX, destination_kek_id=key_b["Arn"], destination_context=new_ctx
    )
    assert out.kek_id == key_b["Arn"] and out.request_id and out.wrapped != gen.wrapped
    # One ReEncrypt call naming both keys; no Decrypt, so the plaintext DEK never came back.
    assert [p["SourceKeyId"] for p in sent] == [key_a["KeyId"]] and sent[0]["DestinationKeyId"] == key_b["Arn"]
    assert "Plaintext" not in str(sent)
    assert kms.decrypt(key_b["KeyId"], out.wrapped, new_ctx).plaintext.material == gen.plaintext.material
    with pytest.raises(KmsAccessDeniedError):  # moto's answer for "another key" (real KMS: IncorrectKey)
        kms.decrypt(key_a["KeyId"], out.wrapped, new_ctx)
    with pytest.raises(DecryptionError):
        kms.decrypt(key_b["KeyId"], out.wrapped, CTX)
    assert kms.decrypt(key_a["KeyId"], gen.wrapped, CTX).plaintext.material == gen.plaintext.material


def test_rewrap_with_wrong_source_context_fails(kms, key_a, key_b):
    gen = kms.generate_data_key(key_a["KeyId"], CTX)
    with pytest.raises(DecryptionError):
        kms.rewrap(gen.wrapped, source_kek_id=key_a["KeyId"], source_context={}, destination_kek_id=key_b["KeyId"], destination_context=CTX)
    with pytest.raises(DecryptionError):
        kms.rewrap(
            gen.wrapped,
            source_kek_id=key_a["KeyId"],
            source_context={"keyturn:dataset": "sales2024-01-01"},
            destination_kek_id=key_b["KeyId"],
            destination_context=CTX,
        )


def test_kms_rotation_keeps_key_id_and_old_ciphertexts(kms, key_a):
    """The KMS-rotation model: new material under the same key id; old wrapped DEKs still open and rewrap."""
    before = kms.generate_data_key(key_a["KeyId"], CTX)
    assert kms.rotate_key_material(key_a["KeyId"]) in (key_a["KeyId"], key_a["Arn"])
    v2 = {**CTX, "keyturn:version": "2"}
    after = kms.generate_data_key(key_a["KeyId"], v2)
    assert kms.decrypt(key_a["KeyId"], before.wrapped, CTX).plaintext.material == before.plaintext.material
    assert kms.decrypt(key_a["KeyId"], after.wrapped, v2).plaintext.material == after.plaintext.material
    moved = kms.rewrap(
        before.wrapped, source_kek_id=key_a["KeyId"], source_context=CTX, destination_kek_id=key_a["KeyId"], destination_context=v2
    )
    assert kms.decrypt(key_a["KeyId"], moved.wrapped, v2).plaintext.material == before.plaintext.material


# ----------------------------------------------------------------------------- error mapping (injected)


@pytest.mark.parametrize(
    "code, status, error",
    [
        ("DisabledException", 400, KmsAccessDeniedError),
        ("KMSInvalidStateException", 400, KmsAccessDeniedError),
        ("AccessDeniedException", 400, KmsAccessDeniedError),
        ("InvalidCiphertextException", 400, DecryptionError),
        ("NotFoundException", 400, KmsKeyNotFoundError),
        ("ValidationException", 400, ValueError),
        ("UnsupportedOperationException", 400, KmsError),
    ],
)
def test_error_codes_map_without_retry(kms, kms_client, key_a, code, status, error):
    gen = kms.generate_data_key(key_a["KeyId"], CTX)
    injector = FaultInjector.always(kms_client, code=code, status=status)
    for call in (
        lambda: kms.generate_data_key(key_a["KeyId"], CTX),
        lambda: kms.decrypt(key_a["KeyId"], gen.wrapped, CTX),
        lambda: kms.rewrap(
            gen.wrapped, source_kek_id=key_a["KeyId"], source_context=CTX, destination_kek_id=key_a["KeyId"], destination_context=CTX
        ),
    ):
        with pytest.raises(error):
            call()
    assert injector.attempts == 3  # one attempt each: none of these is retried


@pytest.mark.parametrize(
    "code, status, error",
    [
        ("ThrottlingException", 400, KmsThrottledError),
        ("KMSInternalException", 500, KmsUnavailableError),
        ("DependencyTimeoutException", 503, KmsUnavailableError),
        ("InternalFailure", 500, KmsUnavailableError),
    ],
)
def test_transient_errors_are_retried_then_mapped(kms_client, key_a, code, status, error):
    from aws_support import shorten_backoff

    kms = AwsKms(client=kms_client)
    shorten_backoff(kms_client)
    injector = FaultInjector.always(kms_client, code=code, status=status, operations={"GenerateDataKey"})
    with pytest.raises(error) as info:
        kms.generate_data_key(key_a["KeyId"], CTX)
    assert injector.injected == 3  # the client's max_attempts: the first try and two retries
    assert key_a["KeyId"] in str(info.value)
    injector.enabled = False
    assert len(kms.generate_data_key(key_a["KeyId"], CTX).plaintext) == 32


def test_disabled_key_moto_still_decrypts_so_it_is_injected(kms, kms_client, key_a):
    """moto's known difference: a disabled key still decrypts. Real KMS says DisabledException."""
    gen = kms.generate_data_key(key_a["KeyId"], CTX)
    kms_client.disable_key(KeyId=key_a["KeyId"])
    try:
        assert kms.decrypt(key_a["KeyId"], gen.wrapped, CTX).plaintext.material == gen.plaintext.material  # moto
        FaultInjector.always(kms_client, code="DisabledException", operations={"GenerateDataKey", "Decrypt", "ReEncrypt"})
        with pytest.raises(KmsAccessDeniedError, match="DisabledException"):
            kms.decrypt(key_a["KeyId"], gen.wrapped, CTX)
        with pytest.raises(KmsAccessDeniedError):
            kms.generate_data_key(key_a["KeyId"], CTX)
    finally:
        kms_client.enable_key(KeyId=key_a["KeyId"])


def test_describe_and_check_usable(kms, kms_client, key_a):
    info = kms.check_usable(alias_of(kms_client, key_a))
    assert (info.key_id, info.arn, info.enabled, info.state) == (key_a["KeyId"], key_a["Arn"], True, "Enabled")
    kms_client.disable_key(KeyId=key_a["KeyId"])
    try:
        assert kms.describe_key(key_a["KeyId"]).enabled is False
        with pytest.raises(KmsAccessDeniedError, match="not enabled"):
            kms.check_usable(key_a["KeyId"])
    finally:
        kms_client.enable_key(KeyId=key_a["KeyId"])
    signing = kms_client.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")["KeyMetadata"]
    with pytest.raises(KmsAccessDeniedError, match="not a symmetric"):
        kms.check_usable(signing["KeyId"])


# ----------------------------------------------------------------------------- construction and safety


def test_builds_its_own_client_from_endpoint(moto_url, key_a):
    with AwsKms(region="us-east-1", endpoint_url=moto_url, max_attempts=2, connect_timeout=1, read_timeout=5) as kms:
        gen = kms.generate_data_key(key_a["Arn"], CTX)
        assert kms.decrypt(key_a["Arn"], gen.wrapped, CTX).plaintext.material == gen.plaintext.material
        assert moto_url in repr(kms) and "attempts=2" in repr(kms)
        assert kms.client.meta.endpoint_url == moto_url
    with pytest.raises(KmsClosedError):
        kms.generate_data_key(key_a["Arn"], CTX)
    assert issubclass(KmsClosedError, ValueError)


def test_constructor_arguments(kms_client):
    with pytest.raises(ValueError):
        AwsKms(client=kms_client, endpoint_url="http://127.0.0.1:1")
    with pytest.raises(ValueError):
        AwsKms(endpoint_url="ftp://x")
    with pytest.raises(ValueError):
        AwsKms(endpoint_url="http://127.0.0.1:1", max_attempts=0)
    with pytest.raises(ValueError):
        AwsKms(endpoint_url="http://127.0.0.1:1", connect_timeout=0)
    with pytest.raises(ValueError):
        AwsKms(client=kms_client, max_requests_per_second=0)


def test_pickling_and_copying_refused(kms):
    for action in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="AwsKeySource"):
            action(kms)


def test_repr_and_errors_show_no_material(kms, key_a):
    gen = kms.generate_data_key(key_a["KeyId"], CTX)
    texts = [repr(kms), repr(gen), str(gen)]
    with pytest.raises(DecryptionError) as info:
        kms.decrypt(key_a["KeyId"], gen.wrapped, {})
    texts.append(str(info.value))
    material = gen.plaintext.material
    for text in texts:
        assert material.hex() not in text and repr(material) not in text


def test_unreachable_endpoint_is_unavailable_quickly(moto_url):
    """A closed loopback port: connection refused, retried max_attempts times, then KmsUnavailableError."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    kms = AwsKms(region="us-east-1", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2, connect_timeout=0.5, read_timeout=1)
    from aws_support import AttemptCounter

    counter = AttemptCounter(kms.client)
    with pytest.raises(KmsUnavailableError) as info:
        kms.generate_data_key("alias/anything", CTX)
    assert counter.total == 2
    assert isinstance(info.value.__cause__, Exception)
    assert not isinstance(info.value, KmsThrottledError)
