"""The one atomic small-file writer (`keyturn.fsutil.write_file_atomically`) and the writers built on it.

A crash is a real one: a child process is SIGKILLed at the moment it would
rename (or link) the finished temp file into place, so no cleanup code
runs. The old file must then be exactly as it was.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from keyturn.audit.chain import AuditChain
from keyturn.audit.events import AuditAction, build_event
from keyturn.fsutil import is_temp_name, write_file_atomically
from keyturn.home import KeyHome
from keyturn.kms.local import LocalKms, generate_root_key_file
from keyturn.lake.atomic import write_bytes_atomically, write_json_atomically
from keyturn.lake.layout import Lake


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if is_temp_name(n))


def crash_at_rename(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a child whose os.replace and os.link SIGKILL it (the crash between write and rename)."""
    prelude = textwrap.dedent(
        """
        import os, signal
        def _die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace = _die
        os.link = _die
        """
    )
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, timeout=120)


# --------------------------------------------------------------------------- the writer


def test_replaces_the_file_with_exactly_the_given_mode(tmp_path):
    path = tmp_path / "f.json"
    path.write_bytes(b"old")
    old_umask = os.umask(0o077)  # the mode is set explicitly: the umask does not narrow or widen it
    try:
        write_file_atomically(path, b"new", mode=0o644)
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"new" and mode_of(path) == 0o644
    write_file_atomically(path, bytearray(b"newer"), mode=0o600)
    assert path.read_bytes() == b"newer" and mode_of(path) == 0o600
    assert leftovers(tmp_path) == []


def test_exclusive_never_overwrites(tmp_path):
    path = tmp_path / "config.yaml"
    write_file_atomically(path, b"first", mode=0o640, exclusive=True)
    assert mode_of(path) == 0o640
    with pytest.raises(FileExistsError):
        write_file_atomically(path, b"second", exclusive=True)
    assert path.read_bytes() == b"first" and leftovers(tmp_path) == []


def test_a_failed_write_leaves_no_temp_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_file_atomically(tmp_path / "missing-dir" / "f", b"x")
    with pytest.raises(IsADirectoryError):
        (tmp_path / "d").mkdir()
        write_file_atomically(tmp_path / "d", b"x")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("exclusive", [False, True])
def test_a_crash_between_write_and_rename_leaves_the_old_file(tmp_path, exclusive):
    path = tmp_path / "state.json"
    if not exclusive:
        path.write_bytes(b"old state")
    done = crash_at_rename(
        f"""
        from keyturn.fsutil import write_file_atomically
        write_file_atomically({str(path)!r}, b"new state", exclusive={exclusive})
        """
    )
    assert done.returncode == -9, done.stderr
    if exclusive:
        assert not path.exists()  # nothing half-made at the final name
    else:
        assert path.read_bytes() == b"old state"
    (temp,) = leftovers(tmp_path)  # the finished temp file stays behind, hidden and recognisable
    assert (tmp_path / temp).read_bytes() == b"new state" and mode_of(tmp_path / temp) == 0o644


# --------------------------------------------------------------------------- its callers


def test_keystore_updates_survive_a_crash_at_rename(tmp_path):
    key_file = generate_root_key_file(str(tmp_path / "root.key"))
    assert mode_of(key_file) == 0o600
    store = str(tmp_path / "keystore.json")
    with LocalKms.create(store, key_file=key_file) as kms:
        kms.create_kek("kek-1")
    assert mode_of(store) == 0o600
    before = open(store, "rb").read()
    done = crash_at_rename(
        f"""
        from keyturn.kms.local import LocalKms
        with LocalKms.open({store!r}, key_file={key_file!r}) as kms:
            kms.create_kek("kek-2")
        """
    )
    assert done.returncode == -9, done.stderr
    assert open(store, "rb").read() == before
    with LocalKms.open(store, key_file=key_file) as kms:
        assert kms.has_kek("kek-1") and not kms.has_kek("kek-2")


def test_audit_head_sidecar_survives_a_crash_at_rename(tmp_path):
    log = str(tmp_path / "audit.log")
    chain = AuditChain(log)

    def event(n: int):
        return build_event(AuditAction.ROTATE, actor="t", reason="r", dataset="d", partition="_", version_from=n,
                           version_to=n + 1, counts={}, scope_key=f"s{n}")

    chain.append(event(1))
    head = open(chain.head_path, "rb").read()
    assert mode_of(chain.head_path) == 0o600
    done = crash_at_rename(
        f"""
        from keyturn.audit.chain import AuditChain
        from keyturn.audit.events import AuditAction, build_event
        AuditChain({log!r}).append(build_event(AuditAction.ROTATE, actor="t", reason="r", dataset="d", partition="_",
                                               version_from=2, version_to=3, counts={{}}, scope_key="s2"))
        """
    )
    assert done.returncode == -9, done.stderr
    assert open(chain.head_path, "rb").read() == head  # the old sidecar, one entry behind the durable line
    assert len(AuditChain(log).entries()) == 2  # which the chain accepts (a crash between line and sidecar)


def test_home_config_is_written_whole_and_never_overwritten(tmp_path):
    home = KeyHome.init(tmp_path / "home")
    config = tmp_path / "home" / "config.yaml"
    assert mode_of(config) == 0o644 and leftovers(tmp_path / "home") == []
    assert home.config.dataset == "default"


def test_local_lake_small_files_use_the_same_writer(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    path = lake.path("_keyturn", "ledger.json")
    write_json_atomically(lake, path, {"b": 1, "a": 2})
    assert json.loads(open(path).read()) == {"a": 2, "b": 1} and mode_of(path) == 0o644
    done = crash_at_rename(
        f"""
        from keyturn.lake.atomic import write_bytes_atomically
        from keyturn.lake.layout import Lake
        lake = Lake({lake.uri!r})
        write_bytes_atomically(lake, {path!r}, b"half a ledger")
        """
    )
    assert done.returncode == -9, done.stderr
    assert json.loads(open(path).read()) == {"a": 2, "b": 1}
    assert [os.path.basename(p) for p in lake.temp_files()] == leftovers(os.path.dirname(path))  # the lake sees the temp
    assert len(lake.remove_temp_files()) == 1 and leftovers(os.path.dirname(path)) == []
    write_bytes_atomically(lake, path, b"{}")
    assert open(path, "rb").read() == b"{}"
