"""Helpers for the AWS suite: one moto server on loopback per test process, and fault injection.

`moto_url` (session scope) starts moto's `ThreadedMotoServer` on 127.0.0.1
with a free port, points every AWS client at it and sets fake credentials
through the environment (``AWS_ACCESS_KEY_ID=testing``..., region
us-east-1, ``AWS_ENDPOINT_URL`` = the server, shared config files disabled),
so nothing can reach a real AWS endpoint. Several test modules import the
fixture; they share one server (reference counted), stopped at the end.

Every call goes through boto3 over HTTP to that server; nothing in boto3 is
mocked. What moto does not do (throttle, refuse disabled keys, fail) is
injected with `FaultInjector`, a botocore ``before-send`` hook that answers
chosen attempts with a real AWS error response instead of sending them.
Answering at ``before-send`` (not ``before-call``) keeps botocore's retry
loop in play: the injected error is parsed and retried exactly as one from
the wire would be.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config

__all__ = [
    "moto_url",
    "aws_env",
    "start_moto",
    "client",
    "new_kms_key",
    "unique",
    "FaultInjector",
    "AttemptCounter",
    "FakeClock",
    "shorten_backoff",
    "requests_seen",
    "REQUESTS",
]

HOST = "127.0.0.1"
REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account

_lock = threading.Lock()
_server: Any = None
_url: str | None = None
_refs = 0
_saved_env: dict[str, str | None] = {}


REQUESTS: Counter[str] = Counter()
"""Requests the test servers answered, by JSON target (``TrentService.Decrypt`` for KMS), else the HTTP method."""


def requests_seen(prefix: str = "TrentService.") -> int:
    """How many requests whose target starts with `prefix` (default: every KMS call) the servers answered so far."""
    return sum(n for target, n in REQUESTS.items() if target.startswith(prefix))


class _OneRequestAtATime:
    """WSGI wrapper: runs one request at a time and reads its whole body under the lock; counts requests."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with self.lock:
            REQUESTS[environ.get("HTTP_X_AMZ_TARGET") or environ.get("REQUEST_METHOD", "?")] += 1
            result = self.app(environ, start_response)
            try:
                return [b"".join(result)]
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()


def _serialized_server_class() -> type:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    class SerializedMotoServer(ThreadedMotoServer):
        """moto's `ThreadedMotoServer`, answering one request at a time.

        moto applies a TransactWriteItems by deep-copying the table, writing
        item by item and restoring the copy on failure, with no lock: two
        concurrent transactions can both pass their conditions, and a failed
        one can erase one that already reported success (we measured lost
        rotations and 500s from 'dictionary changed size during iteration').
        Real DynamoDB transactions are serializable. Running requests one at
        a time restores that, so concurrent-writer tests test keyturn, not
        moto's races. Everything else is moto's own server.
        """

        def _server_entry(self) -> None:
            app = _OneRequestAtATime(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    return SerializedMotoServer


def start_moto(port: int = 0) -> tuple[Any, str]:
    """Start moto's threaded server on loopback (a free port when `port` is 0); returns (server, url).

    The server is `ThreadedMotoServer` answering one request at a time (see
    `_serialized_server_class`). moto keeps its state in the process, so
    every server started here sees the same keys, tables and logs.
    """
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = _serialized_server_class()(ip_address=HOST, port=port, verbose=False)
    server.start()
    host, bound = server.get_host_and_port()
    assert host == HOST
    return server, f"http://{HOST}:{bound}"


def _fake_env(url: str) -> dict[str, str | None]:
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_SECURITY_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": url,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_PROFILE": None,
        "AWS_DEFAULT_PROFILE": None,
    }


def _acquire() -> str:
    global _server, _url, _refs
    with _lock:
        if _server is None:
            _server, _url = start_moto()
            for name, value in _fake_env(_url).items():
                _saved_env[name] = os.environ.get(name)
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        _refs += 1
        assert _url is not None
        return _url


def _release() -> None:
    global _server, _url, _refs
    with _lock:
        _refs -= 1
        if _refs == 0 and _server is not None:
            _server.stop()
            _server, _url = None, None
            for name, value in _saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            _saved_env.clear()


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """The loopback URL of the session's moto server, with fake AWS credentials in the environment."""
    url = _acquire()
    try:
        yield url
    finally:
        _release()


@pytest.fixture
def aws_env(moto_url: str) -> str:
    """`moto_url`, for tests that only need the environment in place."""
    return moto_url


_session: Any = None


def client(service: str, url: str, *, max_attempts: int = 3, **config: Any) -> Any:
    """A new boto3 client for `service` at `url` (standard retries, `max_attempts` in all).

    Clients share one boto3 session (it caches the service models), so
    build them from the test's main thread.
    """
    global _session
    if _session is None:
        _session = boto3.session.Session()
    cfg = Config(retries={"mode": "standard", "total_max_attempts": max_attempts}, **config)
    return _session.client(service, region_name=REGION, endpoint_url=url, config=cfg)


def unique(prefix: str) -> str:
    """A fresh name, so tests sharing one server never collide."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def new_kms_key(kms_client: Any, *, alias: str | None = None) -> dict[str, Any]:
    """CreateKey (symmetric, encrypt/decrypt) and optionally an alias; returns the KeyMetadata."""
    meta = kms_client.create_key(Description="keyturn test KEK")["KeyMetadata"]
    if alias is not None:
        kms_client.create_alias(AliasName=alias, TargetKeyId=meta["KeyId"])
    return meta


class _Body:
    """The raw body of a synthetic response (what `AWSResponse.content` reads)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


class FaultInjector:
    """Answers some attempts of a client's calls with an AWS error instead of sending them.

    Registered on ``before-send.<service>``, so it sees every HTTP attempt,
    retries included. `decide(operation, attempt_index)` chooses; the
    helpers `rate` (a seeded fraction of attempts) and `always` cover the
    usual cases. Counts: `attempts` (all), `injected`, and per operation.
    """

    def __init__(
        self,
        boto_client: Any,
        *,
        code: str,
        status: int = 400,
        decide: Callable[[str, int], bool],
        message: str = "injected by the keyturn test suite",
        protocol: str = "json",
    ) -> None:
        self.client = boto_client
        self.code = code
        self.status = status
        self.message = message
        self.decide = decide
        self.protocol = protocol
        self.attempts = 0
        self.injected = 0
        self.by_operation: Counter[str] = Counter()
        self.injected_by_operation: Counter[str] = Counter()
        self.enabled = True
        self._lock = threading.Lock()
        self._service = boto_client.meta.service_model.service_id.hyphenize()
        self._id = f"fault-{uuid.uuid4().hex}"
        boto_client.meta.events.register(f"before-send.{self._service}", self._before_send, unique_id=self._id)

    @classmethod
    def rate(cls, boto_client: Any, *, code: str, fraction: float, seed: int = 0, status: int = 400, operations: set[str] | None = None) -> FaultInjector:
        """Inject on a seeded-random `fraction` of the attempts (of `operations`, if given)."""
        rng = random.Random(seed)

        def decide(operation: str, _: int) -> bool:
            return (operations is None or operation in operations) and rng.random() < fraction

        return cls(boto_client, code=code, status=status, decide=decide)

    @classmethod
    def always(cls, boto_client: Any, *, code: str, status: int = 400, operations: set[str] | None = None) -> FaultInjector:
        """Inject on every attempt (of `operations`, if given)."""
        return cls(boto_client, code=code, status=status, decide=lambda op, _: operations is None or op in operations)

    def remove(self) -> None:
        self.client.meta.events.unregister(f"before-send.{self._service}", unique_id=self._id)

    def _before_send(self, request: Any, event_name: str, **_: Any) -> AWSResponse | None:
        operation = event_name.rsplit(".", 1)[-1]
        with self._lock:
            index = self.attempts
            self.attempts += 1
            self.by_operation[operation] += 1
            if not (self.enabled and self.decide(operation, index)):
                return None
            self.injected += 1
            self.injected_by_operation[operation] += 1
        body = json.dumps({"__type": self.code, "message": self.message}).encode()
        headers = {
            "x-amzn-RequestId": f"injected-{uuid.uuid4().hex}",
            "Content-Type": "application/x-amz-json-1.1",
            "Content-Length": str(len(body)),
        }
        return AWSResponse(request.url, self.status, headers, _Body(body))


class AttemptCounter:
    """Counts HTTP attempts per operation on a client (a ``before-send`` hook that never answers)."""

    def __init__(self, boto_client: Any) -> None:
        self.by_operation: Counter[str] = Counter()
        self.times: list[float] = []
        self.clock: Callable[[], float] | None = None
        self._lock = threading.Lock()
        service = boto_client.meta.service_model.service_id.hyphenize()
        boto_client.meta.events.register_last(f"before-send.{service}", self._before_send)

    @property
    def total(self) -> int:
        return sum(self.by_operation.values())

    def _before_send(self, event_name: str, **_: Any) -> None:
        with self._lock:
            self.by_operation[event_name.rsplit(".", 1)[-1]] += 1
            if self.clock is not None:
                self.times.append(self.clock())


class FakeClock:
    """A monotonic clock that only moves when `sleep` is called (for rate-limit tests)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.slept: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.slept.append(seconds)
            self.now += seconds


def shorten_backoff(boto_client: Any, scale: float = 0.01) -> bool:
    """Shrink the jitter of botocore's standard retry backoff on `boto_client` to `scale` of its range.

    Whether and how often to retry is untouched; only the sleep between
    attempts shrinks (``rand() * min(base * 2**i, 20)`` with rand() = `scale`),
    so throttling tests finish in seconds. Reaches into botocore's handler
    registry; returns False (and changes nothing) if that layout changes.
    """
    service = boto_client.meta.service_model.service_id.hyphenize()
    emitter = getattr(boto_client.meta.events, "_emitter", boto_client.meta.events)
    entry = getattr(emitter, "_unique_id_handlers", {}).get(f"retry-config-{service}")
    handler = getattr(entry.get("handler") if entry else None, "__self__", None)
    backoff = getattr(getattr(handler, "_retry_policy", None), "_retry_backoff", None)
    if backoff is None or not hasattr(backoff, "_random"):
        return False
    backoff._random = lambda: scale
    return True
