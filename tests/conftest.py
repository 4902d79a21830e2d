"""Shared fixtures for the core suite: a counting in-memory KMS, key policies, a location.

Fixtures that other test modules define under the same name (for example a
module-level ``kms``) take precedence over these, so nothing here is autouse.

Cell paths: every test in the modules of `BOTH_PATHS` runs twice, once on
the pure-Python cell path (``[python]``, ``KEYTURN_NATIVE=0``) and once on
the native kernel (``[native]``, ``KEYTURN_NATIVE=1``), through the
`cell_path` fixture (`keyturn.native` reads the variable on every call).
The native run is skipped, saying why, only where there is no cargo to
build the kernel; where cargo is present, a kernel that is not loaded fails
it. A test in any module may also request `cell_path` itself. The tests of
`PYTHON_PATH_ONLY` count the Python path's AES-GCM calls, so they run on it
alone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone

import pytest

from keyturn import native
from keyturn.kms.base import CountingKms
from keyturn.kms.local import LocalKms
from keyturn.policy import KeyPolicy
from keyturn.registry.base import KeyState, KeyVersion
from keyturn.scope import DekScope, KekRef, Location, ScopeLimits

KEK_IDS = ("kek-1", "kek-2", "kek-3")
_T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def kek_id_for(version: int) -> str:
    """The KEK id the fixtures use for a key version: version n is ``kek-n``."""
    return f"kek-{version}"


@pytest.fixture
def kek_materials() -> dict[str, bytes]:
    """Fresh random 32-byte material for kek-1..kek-3."""
    return {kek_id: os.urandom(32) for kek_id in KEK_IDS}


@pytest.fixture
def local_kms(kek_materials) -> LocalKms:
    """An in-memory LocalKms holding kek-1..kek-3."""
    return LocalKms.in_memory(kek_materials)


@pytest.fixture
def kms(local_kms) -> CountingKms:
    """The in-memory LocalKms wrapped in CountingKms (`kms.calls.generate/decrypt/rewrap`)."""
    return CountingKms(local_kms)


@pytest.fixture
def location() -> Location:
    return Location("sales", "2024-01-01")


def _make_policy(
    active: int = 1,
    decrypt_only: Iterable[int] = (),
    retired: Iterable[int] = (),
    pending_deletion: Iterable[int] = (),
) -> KeyPolicy:
    states: dict[int, KeyState] = {active: KeyState.ACTIVE}
    for versions, state in (
        (decrypt_only, KeyState.DECRYPT_ONLY),
        (retired, KeyState.RETIRED),
        (pending_deletion, KeyState.PENDING_DELETION),
    ):
        for v in versions:
            if v in states:
                raise ValueError(f"version {v} given two states")
            states[v] = state
    versions = [
        KeyVersion(
            version=v,
            kek_id=kek_id_for(v),
            state=state,
            created_at=_T0 + timedelta(days=90 * v),
            actor="tests",
            reason="fixture",
            state_changed_at=_T0 + timedelta(days=90 * v),
            delete_after=_T0 + timedelta(days=400) if state is KeyState.PENDING_DELETION else None,
        )
        for v, state in sorted(states.items())
    ]
    return KeyPolicy.from_versions(versions)


@pytest.fixture
def make_policy() -> Callable[..., KeyPolicy]:
    """Factory: ``make_policy(active=2, decrypt_only=[1], retired=[], pending_deletion=[])``.

    Version n is implemented by KEK ``kek-n``.
    """
    return _make_policy


@pytest.fixture
def policy() -> KeyPolicy:
    """Version 1 (kek-1) active, nothing else."""
    return _make_policy(active=1)


@pytest.fixture
def make_scope(kms, location) -> Callable[..., DekScope]:
    """Factory: ``make_scope(version=1, limits=None, at=None)``: a DekScope on the counting KMS (at `location` unless `at`)."""

    def make(version: int = 1, *, limits: ScopeLimits | None = None, at: Location | None = None) -> DekScope:
        return DekScope(
            kms,
            KekRef(version, kek_id_for(version)),
            at or location,
            limits=limits or ScopeLimits(),
        )

    return make


# -- cell paths ---------------------------------------------------------------------

BOTH_PATHS = ("test_arrow_codec", "test_vectors", "test_tampering", "test_key_leaks", "test_scope", "test_type_binding")
BOTH_PATHS_PREFIXES = ("test_cell_path_",)
CELL_PATHS = ("python", "native")
# Tests that count the Python path's AES-GCM calls (by wrapping `AESGCM` in keyturn.scope/keyturn.reader): on the
# native kernel there are none to count, so they run on the Python path only.
PYTHON_PATH_ONLY = ("test_lake_speed_reencrypt", "test_benchmarks_smoke.test_lake_structure")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rpartition(".")[2]
    python_only = module in PYTHON_PATH_ONLY or f"{module}.{metafunc.function.__name__}" in PYTHON_PATH_ONLY
    wanted = module in BOTH_PATHS or module.startswith(BOTH_PATHS_PREFIXES) or "cell_path" in metafunc.fixturenames
    if wanted or python_only:
        if "cell_path" not in metafunc.fixturenames:
            metafunc.fixturenames.append("cell_path")
        metafunc.parametrize("cell_path", ("python",) if python_only else CELL_PATHS, indirect=True, scope="module")


@pytest.fixture(scope="module")
def cell_path(request: pytest.FixtureRequest) -> Iterable[str]:
    """The cell path this test runs on, "python" or "native", set through ``KEYTURN_NATIVE`` for the test's module."""
    path = request.param
    if path == "native" and not native.kernel_loaded():
        if shutil.which("cargo") is None:
            pytest.skip("no cargo on this machine, so no native kernel: the native cell path is not tested here")
        pytest.fail(
            "cargo is on this machine but the native kernel is not loaded; build it with "
            "`sh native/build-dev.sh .venv/bin/python` (make does it)",
            pytrace=False,
        )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(native.ENV_VAR, "1" if path == "native" else "0")
        yield path
