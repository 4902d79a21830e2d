"""`AwsKms`: the `KmsBackend` over AWS KMS (GenerateDataKey, Decrypt, ReEncrypt).

KEK ids are anything KMS accepts as a KeyId: a key id, a key ARN, an alias
(``alias/...``) or an alias ARN. The same string must be used for every
version that names the key (keyturn stores it in each DEK envelope and the
registry checks it), so pick one form and keep it.

Encryption context. keyturn passes a str->str context (`format.kms_context`).
AWS KMS binds the context to the ciphertext as a canonical map. keyturn adds
one pair of its own, ``keyturn:ctx`` = SHA-256 hex of
`keyturn.context.encode_context` (sorted, length-prefixed) of the caller's
context, so two contexts that a KMS might serialize alike (``{"ab": "c"}``
and ``{"a": "bc"}``; moto joins pairs without delimiters) still differ. The
key ``keyturn:ctx`` is reserved (`ValueError`).

Rewrap uses ReEncrypt: the plaintext DEK never enters this process. Decrypt
and ReEncrypt pass the expected key (KeyId / SourceKeyId), so a DEK wrapped
under another key is refused.

Errors (see `keyturn.kms.base`):

- InvalidCiphertextException, IncorrectKeyException -> `DecryptionError`;
- NotFoundException -> `KmsKeyNotFoundError`;
- DisabledException, KMSInvalidStateException, AccessDeniedException,
  InvalidKeyUsageException, missing credentials -> `KmsAccessDeniedError`;
- ThrottlingException after the retries -> `KmsThrottledError`;
- connection errors, timeouts and 5xx after the retries -> `KmsUnavailableError`;
- ValidationException or a request botocore refuses -> `ValueError`
  (a bad argument; readers treat arguments taken from data as `DecryptionError`);
- any other AWS error -> `KmsError`.

Retries are botocore's standard mode (see `keyturn.aws.clients`). An
optional `TokenBucket` (`keyturn.kms.decorators`) limits requests per
second: a botocore hook takes one token per HTTP attempt to KMS, retries
and DescribeKey included. `AwsKeySource.open_kms` passes the process's
shared bucket (`process_bucket`), so the limit holds per process, not per
instance; `RateLimitedKms` refuses to wrap an `AwsKms` that has one.

An `AwsKms` holds no secret, but it holds a live client: it refuses pickling.
Beam DoFns build it in ``setup()`` from an `AwsKeySource`.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
)

from keyturn.aws.clients import ClientOwner, ClientSettings, error_code, http_status, make_client, request_id
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
from keyturn.format import DEK_BYTES
from keyturn.kms.base import BoundKek, GeneratedDataKey, KmsBackend, RewrappedDataKey, UnwrappedDataKey, check_context
from keyturn.kms.decorators import TokenBucket
from keyturn.secret import SecretKey

__all__ = ["AwsKms", "KmsKeyInfo", "BINDING_KEY", "bind_context", "MAX_KEY_ID_CHARS", "MAX_CIPHERTEXT_BYTES"]

BINDING_KEY = "keyturn:ctx"
MAX_KEY_ID_CHARS = 2048
MAX_CIPHERTEXT_BYTES = 6144  # the KMS limit on CiphertextBlob
_ALGORITHM = "SYMMETRIC_DEFAULT"

_DECRYPTION_CODES = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
_NOT_FOUND_CODES = frozenset({"NotFoundException"})
_DENIED_CODES = frozenset(
    {"DisabledException", "KMSInvalidStateException", "AccessDeniedException", "InvalidKeyUsageException"}
)
_THROTTLED_CODES = frozenset({"ThrottlingException", "Throttling", "RequestLimitExceeded", "TooManyRequestsException"})
_UNAVAILABLE_CODES = frozenset(
    {"KMSInternalException", "DependencyTimeoutException", "KeyUnavailableException", "ServiceUnavailable", "InternalFailure"}
)
_CALLER_CODES = frozenset({"ValidationException", "InvalidParameterValue", "SerializationException"})

_instances = itertools.count()


@dataclass(frozen=True, slots=True)
class KmsKeyInfo:
    """What DescribeKey says about a KEK (no key material)."""

    key_id: str
    arn: str
    enabled: bool
    state: str
    usage: str
    spec: str


def _check_kek_id(kek_id: object) -> str:
    if not isinstance(kek_id, str):
        raise TypeError(f"kek_id must be str, not {type(kek_id).__name__}")
    if not 1 <= len(kek_id) <= MAX_KEY_ID_CHARS:
        raise ValueError(f"kek_id must be 1..{MAX_KEY_ID_CHARS} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in kek_id):
        raise ValueError("kek_id must be a KMS key id, key ARN, alias or alias ARN, without spaces")
    return kek_id


def bind_context(context: Mapping[str, str]) -> dict[str, str]:
    """The encryption context sent to KMS: `context` plus ``keyturn:ctx`` (its canonical SHA-256).

    `TypeError` unless `context` maps str to str; `ValueError` if it uses the reserved key.
    """
    check_context(context)
    if BINDING_KEY in context:
        raise ValueError(f"context key {BINDING_KEY!r} is reserved for keyturn's context binding")
    digest = hashlib.sha256(encode_context(context)).hexdigest()
    return {**context, BINDING_KEY: digest}


def _check_wrapped(wrapped: object) -> bytes:
    if not isinstance(wrapped, (bytes, bytearray, memoryview)):
        raise TypeError(f"wrapped must be bytes, not {type(wrapped).__name__}")
    data = bytes(wrapped)
    if not 1 <= len(data) <= MAX_CIPHERTEXT_BYTES:
        raise DecryptionError()
    return data


class AwsKms(ClientOwner, KmsBackend):
    """`KmsBackend` over AWS KMS; see the module docstring for contracts and error mapping."""

    def __init__(
        self,
        *,
        client: Any = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_requests_per_second: float | None = None,
        rate_limiter: TokenBucket | None = None,
    ) -> None:
        """Use the injected boto3 KMS `client`, or build one from region/endpoint/retry settings.

        With an injected client its own retry configuration applies, and the
        other connection arguments must be left at their defaults.
        `max_requests_per_second` builds a `TokenBucket` of this instance's
        own; `rate_limiter` injects one (the process's shared bucket, or one
        on a fake clock). Give at most one.
        """
        if max_requests_per_second is not None and rate_limiter is not None:
            raise ValueError("give max_requests_per_second or rate_limiter, not both")
        if client is not None:
            if region is not None or endpoint_url is not None:
                raise ValueError("give an injected client or region/endpoint_url, not both")
            self._settings: ClientSettings | None = None
            self._client = client
            self._owns_client = False
        else:
            self._settings = ClientSettings(region, endpoint_url, max_attempts, connect_timeout, read_timeout)
            try:
                self._client = make_client("kms", self._settings)
            except NoRegionError:
                raise ValueError("no AWS region: pass region= or set AWS_REGION / AWS_DEFAULT_REGION") from None
            self._owns_client = True
        if max_requests_per_second is not None:
            rate_limiter = TokenBucket(max_requests_per_second)
        self._limiter = rate_limiter
        self._hook_id = f"keyturn-aws-kms-rate-limit-{next(_instances)}"
        if rate_limiter is not None:
            self._client.meta.events.register("before-send.kms", self._before_send, unique_id=self._hook_id)
        self._closed = False

    # ----------------------------------------------------------------- plumbing

    @property
    def client(self) -> Any:
        """The boto3 KMS client (for admin calls such as CreateKey in tools and tests)."""
        return self._client

    @property
    def rate_limiter(self) -> TokenBucket | None:
        return self._limiter

    def _before_send(self, **kwargs: Any) -> None:
        if self._limiter is not None:
            self._limiter.acquire()

    def _call(self, operation: str, kek_id: str, **params: Any) -> dict[str, Any]:
        """Call one KMS operation; map every failure to a keyturn error."""
        if self._closed:
            raise KmsClosedError("AwsKms is closed")
        try:
            return getattr(self._client, operation)(**params)
        except ClientError as exc:
            raise _map_client_error(exc, kek_id) from None
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise KmsAccessDeniedError(f"no usable AWS credentials for KMS: {type(exc).__name__}") from None
        except ParamValidationError as exc:
            raise ValueError(f"KMS refused the request arguments: {exc}") from None
        except (BotoConnectionError, HTTPClientError) as exc:
            raise KmsUnavailableError(f"KMS unreachable after retries ({type(exc).__name__}) for key {kek_id!r}") from exc
        except BotoCoreError as exc:
            raise KmsError(f"KMS call {operation} failed: {type(exc).__name__}") from exc

    # ----------------------------------------------------------------- KmsBackend

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> GeneratedDataKey:
        """GenerateDataKey (AES_256) under `kek_id`, bound to `context`."""
        _check_kek_id(kek_id)
        bound = bind_context(context)
        response = self._call("generate_data_key", kek_id, KeyId=kek_id, KeySpec="AES_256", EncryptionContext=bound)
        plaintext = response.pop("Plaintext", None)
        wrapped = response.get("CiphertextBlob")
        if not isinstance(plaintext, bytes) or len(plaintext) != DEK_BYTES or not isinstance(wrapped, bytes) or not wrapped:
            raise KmsError("KMS GenerateDataKey returned a malformed data key")
        dek = SecretKey(plaintext, label="dek")
        del plaintext
        return GeneratedDataKey(plaintext=dek, wrapped=wrapped, kek_id=kek_id, request_id=request_id(response, "aws-kms"))

    def decrypt(self, kek_id: str, wrapped: bytes, context: Mapping[str, str]) -> UnwrappedDataKey:
        """Decrypt with KeyId=`kek_id`; `DecryptionError` for malformed, tampered or wrong-context input."""
        _check_kek_id(kek_id)
        bound = bind_context(context)
        data = _check_wrapped(wrapped)
        response = self._call(
            "decrypt",
            kek_id,
            KeyId=kek_id,
            CiphertextBlob=data,
            EncryptionContext=bound,
            EncryptionAlgorithm=_ALGORITHM,
        )
        plaintext = response.pop("Plaintext", None)
        if not isinstance(plaintext, bytes) or len(plaintext) != DEK_BYTES:
            raise DecryptionError()  # it unwrapped, but not to a DEK keyturn made
        dek = SecretKey(plaintext, label="dek")
        del plaintext
        return UnwrappedDataKey(plaintext=dek, request_id=request_id(response, "aws-kms"))

    def _rewrap(self, wrapped: bytes, source: BoundKek, destination: BoundKek) -> RewrappedDataKey:
        """ReEncrypt inside KMS from the source KEK to the destination KEK; the DEK never leaves KMS."""
        (source_kek_id, source_context), (destination_kek_id, destination_context) = source, destination
        _check_kek_id(source_kek_id)
        _check_kek_id(destination_kek_id)
        source_bound = bind_context(source_context)
        destination_bound = bind_context(destination_context)
        data = _check_wrapped(wrapped)
        response = self._call(
            "re_encrypt",
            source_kek_id,
            CiphertextBlob=data,
            SourceKeyId=source_kek_id,
            SourceEncryptionContext=source_bound,
            SourceEncryptionAlgorithm=_ALGORITHM,
            DestinationKeyId=destination_kek_id,
            DestinationEncryptionContext=destination_bound,
            DestinationEncryptionAlgorithm=_ALGORITHM,
        )
        new = response.get("CiphertextBlob")
        if not isinstance(new, bytes) or not new:
            raise KmsError("KMS ReEncrypt returned no ciphertext")
        return RewrappedDataKey(wrapped=new, kek_id=destination_kek_id, request_id=request_id(response, "aws-kms"))

    # ----------------------------------------------------------------- key admin

    def describe_key(self, kek_id: str) -> KmsKeyInfo:
        """DescribeKey: id, ARN, enabled flag, state, usage and spec of a KEK."""
        _check_kek_id(kek_id)
        meta = self._call("describe_key", kek_id, KeyId=kek_id).get("KeyMetadata", {})
        return KmsKeyInfo(
            key_id=str(meta.get("KeyId", "")),
            arn=str(meta.get("Arn", "")),
            enabled=bool(meta.get("Enabled", False)),
            state=str(meta.get("KeyState", "")),
            usage=str(meta.get("KeyUsage", "")),
            spec=str(meta.get("KeySpec", meta.get("CustomerMasterKeySpec", ""))),
        )

    def check_usable(self, kek_id: str) -> KmsKeyInfo:
        """DescribeKey, then refuse (`KmsAccessDeniedError`) a key that is not an enabled symmetric encryption key.

        A usage or spec KMS leaves out is not held against the key.
        """
        info = self.describe_key(kek_id)
        if not info.enabled or info.state != "Enabled":
            raise KmsAccessDeniedError(f"KMS key {kek_id!r} is not enabled (state {info.state or 'unknown'})")
        if info.usage not in ("ENCRYPT_DECRYPT", "") or info.spec not in ("SYMMETRIC_DEFAULT", ""):
            raise KmsAccessDeniedError(
                f"KMS key {kek_id!r} is not a symmetric encryption key (usage {info.usage}, spec {info.spec})"
            )
        return info

    def rotate_key_material(self, kek_id: str) -> str:
        """RotateKeyOnDemand: new key material under the same key id (the KMS-rotation model).

        Returns the key id KMS reports. Old material stays available to
        Decrypt and ReEncrypt, so the registry's versions may share `kek_id`.
        RotateKeyOnDemand takes no alias, so an alias is resolved first (DescribeKey).
        """
        _check_kek_id(kek_id)
        target = kek_id
        if kek_id.startswith("alias/") or ":alias/" in kek_id:
            target = self.describe_key(kek_id).arn or kek_id
        return str(self._call("rotate_key_on_demand", kek_id, KeyId=target).get("KeyId", target))

    # ----------------------------------------------------------------- lifecycle and safety

    def close(self) -> None:
        """Remove the rate-limit hook and close a client this object built; later calls raise `KmsClosedError`."""
        if self._closed:
            return
        self._closed = True
        if self._limiter is not None:
            self._client.meta.events.unregister("before-send.kms", unique_id=self._hook_id)
        self._close_client()

    def __repr__(self) -> str:
        if self._settings is None:
            where = "injected client"
        else:
            where = f"region={self._settings.region!r}, endpoint={self._settings.endpoint_url!r}, attempts={self._settings.max_attempts}"
        limit = "" if self._limiter is None else f", {self._limiter!r}"
        return f"AwsKms({where}{limit}{', closed' if self._closed else ''})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("AwsKms holds a live boto3 client and is not pickled; ship an AwsKeySource and open it in setup()")

    def __getstate__(self) -> NoReturn:
        raise TypeError("AwsKms holds a live boto3 client and is not pickled; ship an AwsKeySource and open it in setup()")


def _map_client_error(exc: ClientError, kek_id: str) -> Exception:
    """The keyturn error for a KMS `ClientError` (messages name the code and key, never data)."""
    code = error_code(exc)
    status = http_status(exc)
    if code in _DECRYPTION_CODES:
        return DecryptionError()
    if code in _NOT_FOUND_CODES:
        return KmsKeyNotFoundError(f"KMS has no key {kek_id!r} (NotFoundException)")
    if code in _DENIED_CODES:
        return KmsAccessDeniedError(f"KMS refused key {kek_id!r} ({code})")
    if code in _THROTTLED_CODES:
        return KmsThrottledError(f"KMS throttled requests for key {kek_id!r} past the retry budget ({code})")
    if code in _UNAVAILABLE_CODES or status >= 500:
        return KmsUnavailableError(f"KMS unavailable after retries for key {kek_id!r} ({code or status})")
    if code in _CALLER_CODES:
        return ValueError(f"KMS refused the request arguments ({code})")
    return KmsError(f"KMS call failed for key {kek_id!r} ({code or status or 'unknown error'})")
