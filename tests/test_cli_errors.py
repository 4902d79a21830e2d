"""Every error path of the `keyturn` CLI: its documented exit code and one line on stderr, run as a user runs it.

Each test starts the CLI as a subprocess (``python -m keyturn.pipelines.cli``), so
logging is configured the way a real command line has it (nothing set up
before `main`), and Beam's own output (its logged tracebacks, the traceback
an SDK worker prints) would show on stderr if the CLI let it through.

- A cell over the format's 64 MiB limit and a disabled KEK fail inside a
  Beam step: Beam logs the traceback and re-raises a copy of the error
  (`` [while running 'STEP']`` added); the CLI reports the original, one
  line, with its own code (2, 4), and writes nothing to the lake.
- A damaged Avro source (one flipped byte) is a data error naming the file
  (exit 2), not an internal error.
- ``--debug`` shows the traceback and never says "rerun with --debug".
- Ctrl-C: a ``KeyboardInterrupt`` inside a step (Beam re-raises it as a
  ``RuntimeError``) and a real SIGINT during `encrypt` and `reencrypt` exit
  130 with one line; nothing half-done is visible and a rerun completes.
- ``keyturn --version`` prints `keyturn.__version__`, the one version source.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import keyturn
from keyturn.pipelines import exitcodes

REPO = Path(__file__).resolve().parent.parent


def keyturn_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m keyturn.pipelines.cli ARGS` in a fresh interpreter; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "keyturn.pipelines.cli", *args],
        cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=timeout,
    )


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYTURN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def assert_one_line(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Exit `code`, exactly one line on stderr, `keyturn: error: ...`, no traceback; returns the line."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr[-3000:])
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    line = lines[0]
    assert line.startswith("keyturn: error: "), line
    assert "Traceback" not in result.stderr
    assert "[while running" not in line  # Beam's step annotation is not the user's business
    for word in words:
        assert word in line, line
    return line


def assert_debug_output(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    """With --debug: the traceback, then the error line last; never "rerun with --debug"."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback (most recent call last)" in result.stderr
    assert "rerun with --debug" not in result.stderr
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("keyturn: error: "), last
    for word in words:
        assert word in last, last


def visible_parquet(lake: Path) -> list[Path]:
    """The lake's data files a `**/*.parquet` reader sees (nothing under `_`/`.` names)."""
    if not lake.exists():
        return []
    return sorted(
        p for p in lake.rglob("*.parquet")
        if not any(part.startswith(("_", ".")) for part in p.relative_to(lake).parts)
    )


def init_home(tmp_path: Path, name: str = "home") -> Path:
    home = tmp_path / name
    result = keyturn_cli("--home", str(home), "init", "--dataset", "customers", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return home


def write_source(directory: Path, files: int, rows: int, partitions: int = 3, start: int = 0) -> int:
    """`files` plain Parquet files of `rows` rows (ids from `start`, region r0..); returns the row count."""
    directory.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        ids = list(range(start + f * rows, start + (f + 1) * rows))
        pq.write_table(
            pa.table({
                "id": pa.array(ids, pa.int64()),
                "email": [f"user{i}@example.com" for i in ids],
                "region": [f"r{i % partitions}" for i in ids],
            }),
            directory / f"part-{f}.parquet",
        )
    return files * rows


# --------------------------------------------------------------------------- errors inside Beam steps


def test_oversized_cell_is_one_line_exit_2_and_writes_nothing(tmp_path):
    home = init_home(tmp_path)
    source = tmp_path / "big"
    source.mkdir()
    pq.write_table(pa.table({"id": [1, 2], "email": ["a" * ((64 << 20) + 1), "b"]}), source / "a.parquet")
    lake = tmp_path / "lake"
    result = keyturn_cli("--home", str(home), "encrypt", "--source", str(source), "--lake", str(lake),
                         "--columns", "email", cwd=tmp_path)
    assert_one_line(result, exitcodes.USAGE, "exceeds 67108864 bytes")
    assert visible_parquet(lake) == []
    debug = keyturn_cli("--home", str(home), "--debug", "encrypt", "--source", str(source), "--lake", str(lake),
                        "--columns", "email", cwd=tmp_path)
    assert_debug_output(debug, exitcodes.USAGE, "exceeds 67108864 bytes")


def _disable_kek(home: Path, kek_id: str = "kek-0001") -> None:
    from keyturn.home import KeyHome

    with KeyHome.open(str(home), check_keys=False).kms() as kms:
        kms.disable_kek(kek_id)


def test_disabled_kek_is_one_line_exit_4_and_json_names_the_kms_error(tmp_path):
    home = init_home(tmp_path)
    write_source(tmp_path / "src", 1, 50)
    _disable_kek(home)
    lake = tmp_path / "lake"
    args = ("encrypt", "--source", str(tmp_path / "src"), "--lake", str(lake), "--columns", "email")
    result = keyturn_cli("--home", str(home), *args, cwd=tmp_path)
    assert_one_line(result, exitcodes.UNAVAILABLE, "KEK 'kek-0001' is disabled")
    assert visible_parquet(lake) == []
    debug = keyturn_cli("--home", str(home), "--debug", "--json", *args, cwd=tmp_path)
    assert_debug_output(debug, exitcodes.UNAVAILABLE, "KEK 'kek-0001' is disabled")
    error = json.loads(debug.stdout)
    assert error == {"error": "KEK 'kek-0001' is disabled", "exit_code": 4, "error_type": "KmsAccessDeniedError"}


def test_damaged_avro_source_is_a_data_error_naming_the_file(tmp_path):
    import fastavro

    home = init_home(tmp_path)
    source = tmp_path / "avro"
    source.mkdir()
    schema = {"type": "record", "name": "C", "fields": [
        {"name": "id", "type": "long"},
        {"name": "email", "type": ["null", "string"]},
        {"name": "tier", "type": {"type": "enum", "name": "T", "symbols": ["a", "b", "c"]}},
    ]}
    path = source / "landed.avro"
    with open(path, "wb") as f:
        fastavro.writer(f, schema, [{"id": i, "email": f"u{i}@x", "tier": "abc"[i % 3]} for i in range(300)])
    path.write_bytes(_flip_to_index_error(path.read_bytes()))
    lake = tmp_path / "lake"
    result = keyturn_cli("--home", str(home), "encrypt", "--source", str(source), "--lake", str(lake),
                         "--columns", "email", cwd=tmp_path)
    assert_one_line(result, exitcodes.USAGE, "landed.avro")
    assert "internal error" not in result.stderr
    assert visible_parquet(lake) == []


def _flip_to_index_error(raw: bytes) -> bytes:
    """`raw` with the first one-byte flip that makes fastavro raise IndexError (as the issue saw)."""
    import io

    import fastavro

    for pos in range(len(raw)):
        flipped = bytearray(raw)
        flipped[pos] ^= 0x80
        try:
            for _ in fastavro.reader(io.BytesIO(bytes(flipped))):
                pass
        except IndexError:
            return bytes(flipped)
        except Exception:  # noqa: BLE001 - another kind of damage; look further
            continue
    raise AssertionError("no single flip gives IndexError")


def _patched_cli(tmp_path: Path, home: Path, patch: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI in a subprocess whose source reader (run inside the Beam step ReadSplit) is replaced by `patch`.

    Patched in `keyturn.sources`, which imports no Beam: the CLI imports
    Beam itself, after it set up logging, as a real run does.
    """
    code = (
        "import sys\n"
        "import keyturn.sources as sources\n"
        f"{patch}\n"
        "sources.read_batches = broken\n"
        "assert 'apache_beam' not in sys.modules and 'keyturn.pipelines.encrypt' not in sys.modules\n"
        "from keyturn.pipelines.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    write_source(tmp_path / "src", 1, 20)
    return subprocess.run(
        [sys.executable, "-c", code, "--home", str(home), *args, "encrypt", "--source", str(tmp_path / "src"),
         "--lake", str(tmp_path / "lake"), "--columns", "email"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )


def test_internal_error_in_a_step_is_one_line_and_debug_drops_the_rerun_hint(tmp_path):
    home = init_home(tmp_path)
    patch = "def broken(*a, **k):\n    raise ZeroDivisionError('boom')"
    result = _patched_cli(tmp_path, home, patch)
    line = assert_one_line(result, exitcodes.INTERNAL)
    assert line == "keyturn: error: internal error (ZeroDivisionError: boom); rerun with --debug for the traceback"
    debug = _patched_cli(tmp_path, home, patch, "--debug")
    assert_debug_output(debug, exitcodes.INTERNAL)
    assert debug.stderr.rstrip("\n").splitlines()[-1] == "keyturn: error: internal error (ZeroDivisionError: boom)"
    assert "ZeroDivisionError: boom" in debug.stderr.split("keyturn: error:")[0]  # the original traceback is shown


def test_keyboard_interrupt_inside_a_step_exits_130(tmp_path):
    """Beam re-raises a KeyboardInterrupt from a step as RuntimeError('KeyboardInterrupt [while running ...]')."""
    home = init_home(tmp_path)
    result = _patched_cli(tmp_path, home, "def broken(*a, **k):\n    raise KeyboardInterrupt")
    assert_one_line(result, exitcodes.INTERRUPTED)
    assert result.stderr == "keyturn: error: interrupted\n"
    assert visible_parquet(tmp_path / "lake") == []


# --------------------------------------------------------------------------- a real Ctrl-C


def _start(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "keyturn.pipelines.cli", *args],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _interrupt_when(proc: subprocess.Popen, started, timeout: float = 240) -> tuple[str, str]:
    """Send SIGINT once `started()` is true (work under way); return (stdout, stderr) after the process ends."""
    deadline = time.monotonic() + timeout
    while not started():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the job ended (exit {proc.returncode}) before it could be interrupted:\n{err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the job never started work")
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=timeout)


def _lake_ids(lake: Path) -> list[int]:
    """The `id` of every row a `**/*.parquet` reader of the lake sees."""
    ids: list[int] = []
    for path in visible_parquet(lake):
        ids.extend(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return sorted(ids)


def _staged_files(lake: Path) -> bool:
    staging = lake / "_keyturn" / "staging"
    return staging.exists() and any(p.is_file() and "part-" in p.name for p in staging.rglob("*"))


@pytest.mark.slow
def test_ctrl_c_during_encrypt_exits_130_and_leaves_nothing_visible(tmp_path):
    home = init_home(tmp_path)
    total = write_source(tmp_path / "src", 4, 60_000, partitions=6)
    lake = tmp_path / "lake"
    args = ("--home", str(home), "encrypt", "--source", str(tmp_path / "src"), "--lake", str(lake),
            "--columns", "email", "--partition-by", "region")
    proc = _start(tmp_path, *args)
    out, err = _interrupt_when(proc, lambda: _staged_files(lake))  # the pipeline is writing files
    assert proc.returncode == exitcodes.INTERRUPTED, (proc.returncode, err[-3000:])
    assert err == "keyturn: error: interrupted\n", err[-3000:]
    assert out == ""
    assert _lake_ids(lake) == []  # nothing was committed: no partition shows half of its rows
    rerun = keyturn_cli(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert _lake_ids(lake) == list(range(total))


def _file_identities(lake: Path) -> dict[str, int]:
    return {str(p): p.stat().st_ino for p in visible_parquet(lake)}


@pytest.mark.slow
def test_ctrl_c_during_reencrypt_exits_130_and_a_rerun_completes(tmp_path):
    home = init_home(tmp_path)
    total = write_source(tmp_path / "src", 4, 60_000, partitions=6)
    lake = tmp_path / "lake"
    setup = keyturn_cli("--home", str(home), "encrypt", "--source", str(tmp_path / "src"), "--lake", str(lake),
                        "--columns", "email", "--partition-by", "region", cwd=tmp_path)
    assert setup.returncode == 0, setup.stderr
    assert keyturn_cli("--home", str(home), "rotate", cwd=tmp_path).returncode == 0
    before = _file_identities(lake)
    assert len(before) >= 4
    args = ("--home", str(home), "reencrypt", "--lake", str(lake), "--mode", "reencrypt")
    proc = _start(tmp_path, *args)
    # interrupted once the first file has been swapped for its rewrite: the others are still to do
    out, err = _interrupt_when(proc, lambda: _file_identities(lake) != before)
    assert proc.returncode == exitcodes.INTERRUPTED, (proc.returncode, err[-3000:])
    assert err == "keyturn: error: interrupted\n", err[-3000:]
    assert _lake_ids(lake) == list(range(total))  # every row once: old file or new file, never both, never neither
    rerun = keyturn_cli("--json", *args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert _lake_ids(lake) == list(range(total))
    out_dir = tmp_path / "plain"
    dec = keyturn_cli("--home", str(home), "decrypt", "--lake", str(lake), "--out", str(out_dir), cwd=tmp_path)
    assert dec.returncode == 0, dec.stderr
    plain = sorted(
        (r["id"], r["email"])
        for p in visible_parquet(out_dir) for r in pq.read_table(p, columns=["id", "email"]).to_pylist()
    )
    assert plain == [(i, f"user{i}@example.com") for i in range(total)]


# --------------------------------------------------------------------------- --version


def test_version_option_prints_the_package_version(tmp_path):
    result = keyturn_cli("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"keyturn {keyturn.__version__}\n"
    assert result.stderr == ""


def test_version_has_one_source():
    assert isinstance(keyturn.__version__, str) and keyturn.__version__.count(".") >= 2
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"]  # not written twice
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "keyturn.__version__"}
