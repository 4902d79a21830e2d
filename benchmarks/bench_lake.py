"""Benchmarks on a Parquet lake: encrypt, both rotation modes, plain pyarrow, Parquet Modular Encryption; peak RSS.

**Data.** A synthetic customer table of `rows` rows, deterministic seed,
written as plain Parquet (`SOURCE_FILES` files) under the output directory
(bench-out/ by default), built once per run: `customer_id` (int64),
`region` (int64, `partitions` values, the partition key), three sensitive
strings `email` (16–32 random alphanumerics + "@example.com"), `ssn`
(11 bytes) and `phone` (15 bytes), and two clear columns `note` (32–64
random alphanumerics) and `spend` (float64).

**lake** (`run_lake`), round by round, each subject on fresh output:

- keyturn encrypt: `pipelines.encrypt.run` (source -> encrypted lake,
  partitioned by region, the in-process Beam runner);
- rewrap rotation: a copy of the encrypted lake (made before timing, on key
  version 1) after the key home rotated to version 2, then
  `pipelines.reencrypt.run(mode="rewrap")`: every file rewritten with its
  DEKs re-wrapped under the new KEK; no payload decrypted;
- reencrypt rotation: the same copy, `pipelines.reencrypt.run(mode="reencrypt")`:
  every cell decrypted and sealed under a fresh DEK, then verified;
- plain pyarrow rewrite: each data file of the encrypted lake read with
  `pq.read_table` and written back with `pq.write_table` (same codec
  defaults), no crypto: the floor for a rotation that rewrites every file;
- pyarrow Parquet Modular Encryption (PME): each source file read and written
  with `pq.write_table(..., encryption_properties=...)`, the three sensitive
  columns under a column key and the footer under a footer key, through
  `pyarrow.parquet.encryption.CryptoFactory` with an in-memory KMS client
  (master keys in a dict, wrap = AES-GCM with the master key),
  double wrapping ON (pyarrow's default), a new `CryptoFactory` per run.

For each rotation mode an extra untimed run counts the payload bytes given
to AES-GCM decrypt (keyturn's cell decryptions, verification included) by
wrapping the AES-GCM objects keyturn's `DekReader` makes; bytes rewritten
come from the job's report.

**memory** (`run_memory`): peak RSS of a `reencrypt` job in a child process
(`python -m benchmarks.bench_lake --child ...`), sampled every 5 ms with psutil
(not `ru_maxrss`: a forked child keeps the parent's peak across exec), on a lake of `rows` and of
`scale * rows` rows; plus the peak RSS of a child that only imports the same
modules (the interpreter and library floor).
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.common import Ratio, Timing, rate, random_strings, time_once

__all__ = ["run_lake", "run_memory", "build_source", "REWRAP_TARGET", "MEMORY_TARGET"]

SEED = 20240603
SENSITIVE = ("email", "ssn", "phone")
SOURCE_FILES = 4
REWRAP_TARGET = 20.0  # reencrypt time over rewrap time
MEMORY_TARGET = 1.3  # peak RSS of the 4x lake over the 1x lake
DEFAULT_OUT = os.path.join("bench-out", "lake")


# --------------------------------------------------------------------------- data


def _digits(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    return rng.integers(0, 10**width, size=n)


def source_table(rows: int, partitions: int, seed: int = SEED, start: int = 0) -> pa.Table:
    rng = np.random.default_rng([seed, start])
    ids = np.arange(start, start + rows, dtype=np.int64)
    local = random_strings(rows, rng, 16, 32)
    email = pc.binary_join_element_wise(local, pa.scalar("@example.com"), "")
    a, b, c = _digits(rng, rows, 3), _digits(rng, rows, 2), _digits(rng, rows, 4)
    ssn = pc.binary_join_element_wise(
        pc.utf8_lpad(pa.array(a).cast(pa.string()), 3, "0"),
        pc.utf8_lpad(pa.array(b).cast(pa.string()), 2, "0"),
        pc.utf8_lpad(pa.array(c).cast(pa.string()), 4, "0"),
        "-",
    )
    phone = pc.binary_join_element_wise(
        pa.scalar("+1-555"),
        pc.utf8_lpad(pa.array(_digits(rng, rows, 3)).cast(pa.string()), 3, "0"),
        pc.utf8_lpad(pa.array(_digits(rng, rows, 4)).cast(pa.string()), 4, "0"),
        "-",
    )
    return pa.table(
        {
            "customer_id": ids,
            "region": pa.array(ids % partitions, pa.int64()),
            "email": email,
            "ssn": ssn,
            "phone": phone,
            "note": random_strings(rows, rng, 32, 64),
            "spend": pa.array(rng.normal(100, 30, rows).round(2)),
        }
    )


def build_source(directory: str, rows: int, partitions: int, seed: int = SEED) -> dict[str, Any]:
    """Plain Parquet source files (deterministic); returns their size."""
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    per_file = -(-rows // SOURCE_FILES)
    for k in range(SOURCE_FILES):
        n = min(per_file, rows - k * per_file)
        if n <= 0:
            break
        pq.write_table(source_table(n, partitions, seed, start=k * per_file), os.path.join(directory, f"part-{k}.parquet"))
    return {"rows": rows, "bytes": _tree_bytes(directory), "files": len(_parquet_files(directory))}


def _parquet_files(directory: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith(".parquet")]
    return out


def _tree_bytes(directory: str) -> int:
    return sum(os.path.getsize(f) for f in _parquet_files(directory))


# --------------------------------------------------------------------------- keyturn steps


def _home(path: str) -> Any:
    from pipelines.home import KeyHome

    shutil.rmtree(path, ignore_errors=True)
    return KeyHome.init(path, dataset="bench", actor="bench", reason="lake benchmark")


def _encrypt(home: Any, source: str, lake: str) -> dict[str, Any]:
    from pipelines import encrypt

    return encrypt.run(home=home, source=source, lake=lake, columns=list(SENSITIVE), partition_by="region", actor="bench", reason="bench")


def _rotate(home: Any) -> int:
    from keyturn.rotation import rotate

    return rotate(home.registry(), home.provision_kek, home.chain(), actor="bench", reason="bench rotation", dataset=home.dataset).version


def _reencrypt(home_path: str, lake: str, mode: str) -> dict[str, Any]:
    from pipelines import reencrypt

    report = reencrypt.run(lake, home=home_path, mode=mode, actor="bench", reason="bench")
    if report["problems"] or not report["complete"]:
        raise AssertionError(f"{mode}: problems {report['problems'][:3]}, complete={report['complete']}")
    return report


class _CountingAead:
    """AES-GCM that tallies the ciphertext bytes it decrypts (tag excluded)."""

    tally = [0, 0]  # bytes, calls
    lock = threading.Lock()

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        out = self._inner.decrypt(nonce, data, aad)
        with self.lock:
            self.tally[0] += len(out)
            self.tally[1] += 1
        return out

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        return self._inner.encrypt(nonce, data, aad)


def _count_payload(home_path: str, lake: str, mode: str) -> tuple[dict[str, Any], int, int]:
    """Run a rotation with keyturn's reader AES-GCM wrapped; return (report, payload bytes, cells) decrypted."""
    import keyturn.reader as reader

    original = reader.AESGCM
    _CountingAead.tally[:] = [0, 0]
    reader.AESGCM = lambda key: _CountingAead(original(key))  # type: ignore[assignment]
    try:
        report = _reencrypt(home_path, lake, mode)
    finally:
        reader.AESGCM = original  # type: ignore[assignment]
    return report, _CountingAead.tally[0], _CountingAead.tally[1]


# --------------------------------------------------------------------------- pyarrow baselines


def _plain_rewrite(lake: str, out: str) -> int:
    rows = 0
    for f in _parquet_files(lake):
        table = pq.read_table(f)
        target = os.path.join(out, os.path.relpath(f, lake))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        pq.write_table(table, target)
        rows += table.num_rows
    return rows


class _InMemoryKms:
    """A pyarrow KmsClient with master keys in a dict; wrap = AES-GCM under the master key (pyarrow's test pattern)."""

    def __init__(self, config: Any) -> None:
        import pyarrow.parquet.encryption as pe
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        class Client(pe.KmsClient):
            def __init__(self, keys: dict[str, bytes]) -> None:
                pe.KmsClient.__init__(self)
                self.keys = keys

            def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> bytes:
                nonce = os.urandom(12)
                return base64.b64encode(nonce + AESGCM(self.keys[master_key_identifier]).encrypt(nonce, key_bytes, None))

            def unwrap_key(self, wrapped_key: bytes, master_key_identifier: str) -> bytes:
                raw = base64.b64decode(wrapped_key)
                return AESGCM(self.keys[master_key_identifier]).decrypt(raw[:12], raw[12:], None)

        self.client = Client({k: base64.b64decode(v) for k, v in config.custom_kms_conf.items()})


_PME_KEYS = {"footer_key": base64.b64encode(bytes(range(32))).decode(), "col_key": base64.b64encode(bytes(range(32, 64))).decode()}


def _pme_write(source: str, out: str) -> int:
    import pyarrow.parquet.encryption as pe

    kms_config = pe.KmsConnectionConfig(custom_kms_conf=_PME_KEYS)
    factory = pe.CryptoFactory(lambda config: _InMemoryKms(config).client)
    props = pe.EncryptionConfiguration(
        footer_key="footer_key", column_keys={"col_key": list(SENSITIVE)}, encryption_algorithm="AES_GCM_V1", double_wrapping=True, data_key_length_bits=256
    )
    os.makedirs(out, exist_ok=True)
    rows = 0
    for f in _parquet_files(source):
        table = pq.read_table(f)
        enc = factory.file_encryption_properties(kms_config, props)
        pq.write_table(table, os.path.join(out, os.path.basename(f)), encryption_properties=enc)
        rows += table.num_rows
    return rows


def _pme_check(out: str, expected_rows: int) -> None:
    import pyarrow.parquet.encryption as pe

    kms_config = pe.KmsConnectionConfig(custom_kms_conf=_PME_KEYS)
    factory = pe.CryptoFactory(lambda config: _InMemoryKms(config).client)
    rows = 0
    for f in _parquet_files(out):
        dec = factory.file_decryption_properties(kms_config, pe.DecryptionConfiguration())
        rows += pq.read_table(f, decryption_properties=dec).num_rows
    if rows != expected_rows:
        raise AssertionError(f"PME output has {rows} rows, expected {expected_rows}")


# --------------------------------------------------------------------------- lake benchmark


def run_lake(
    *,
    rows: int = 2_000_000,
    partitions: int = 10,
    runs: int = 5,
    out: str = DEFAULT_OUT,
    seed: int = SEED,
    profile: bool = True,
) -> dict[str, Any]:
    """Encrypt, rewrap, reencrypt, plain rewrite and PME on the same lake; medians of `runs` rounds (no warm-up)."""
    out = os.path.abspath(out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    src = os.path.join(out, "source")
    t0 = time.perf_counter()
    source = build_source(src, rows, partitions, seed)
    build_s = time.perf_counter() - t0
    home = _home(os.path.join(out, "home"))
    pristine = os.path.join(out, "pristine")
    enc_report = _encrypt(home, src, pristine)
    lake_bytes = _tree_bytes(pristine)
    lake_files = len(_parquet_files(pristine))
    new_version = _rotate(home)
    work = os.path.join(out, "work")

    def fresh(path: str) -> str:
        shutil.rmtree(path, ignore_errors=True)
        return path

    def copy_pristine() -> str:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work)
        return work

    reports: dict[str, list[dict[str, Any]]] = {"encrypt": [], "rewrap": [], "reencrypt": []}

    def do_encrypt() -> int:
        r = _encrypt(home, src, fresh(os.path.join(out, "enc")))
        reports["encrypt"].append({k: r.get(k) for k in ("rows_written", "files_written", "bytes_written", "kms_calls")})
        return r["rows_written"]

    def do_rotation(mode: str) -> int:
        r = _reencrypt(home.path, work, mode)
        reports[mode].append({k: r.get(k) for k in ("files_rewritten", "rows_moved", "bytes_rewritten", "kms_calls")})
        return r["rows_moved"]

    subjects = {
        "encrypt": (None, do_encrypt),
        "rewrap": (copy_pristine, lambda: do_rotation("rewrap")),
        "reencrypt": (copy_pristine, lambda: do_rotation("reencrypt")),
        "plain_rewrite": (None, lambda: _plain_rewrite(pristine, fresh(os.path.join(out, "plain")))),
        "pme_write": (None, lambda: _pme_write(src, fresh(os.path.join(out, "pme")))),
    }
    timings = {name: Timing() for name in subjects}
    for _ in range(runs):
        for name, (setup, fn) in subjects.items():
            if setup is not None:
                setup()
            elapsed, n = time_once(fn)
            if n != rows:
                raise AssertionError(f"{name}: {n} rows, expected {rows}")
            timings[name].runs.append(elapsed)
    _pme_check(os.path.join(out, "pme"), rows)
    pme_bytes = _tree_bytes(os.path.join(out, "pme"))

    # payload bytes decrypted per rotation mode (untimed runs, AES-GCM wrapped)
    payload: dict[str, Any] = {}
    for mode in ("rewrap", "reencrypt"):
        copy_pristine()
        report, nbytes, cells = _count_payload(home.path, work, mode)
        payload[mode] = {
            "bytes_rewritten": report["bytes_rewritten"],
            "files_rewritten": report["files_rewritten"],
            "payload_bytes_decrypted": nbytes,
            "cells_decrypted": cells,
            "kms_calls": report["kms_calls"],
        }

    profiles: dict[str, Any] = {}
    if profile:
        from benchmarks.common import profile_top

        for mode in ("rewrap", "reencrypt"):
            copy_pristine()
            prof = profile_top(lambda m=mode: _reencrypt(home.path, work, m), repeat=1, top=12)
            profiles[mode] = {"total_s": prof["total_s"], "top": prof["top"]}

    for d in ("work", "enc", "plain", "pme"):
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)

    speed = Ratio([re / rw for rw, re in zip(timings["rewrap"].runs, timings["reencrypt"].runs)])
    result: dict[str, Any] = {
        "name": "lake",
        "params": {
            "rows": rows,
            "partitions": partitions,
            "seed": seed,
            "runs": runs,
            "warmup": 0,
            "sensitive": list(SENSITIVE),
            "source_bytes": source["bytes"],
            "source_files": source["files"],
            "lake_bytes": lake_bytes,
            "lake_files": lake_files,
            "pme_bytes": pme_bytes,
            "build_source_s": round(build_s, 2),
            "rotated_to_version": new_version,
            "pme": "CryptoFactory, in-memory KmsClient, AES_GCM_V1, double_wrapping=True, 256-bit DEKs, footer encrypted",
            "first_encrypt": {k: enc_report.get(k) for k in ("rows_written", "files_written", "bytes_written", "kms_calls")},
        },
        "timings": {name: t.to_dict() for name, t in timings.items()},
        "rows_per_s": {name: rate(rows, t) for name, t in timings.items()},
        "mb_per_s": {name: {k: v * lake_bytes / rows / 1e6 for k, v in rate(rows, t).items()} for name, t in timings.items()},
        "ratios": {
            "reencrypt_over_rewrap_time": speed.to_dict(),
            "rewrap_over_plain_time": Ratio([a / b for a, b in zip(timings["rewrap"].runs, timings["plain_rewrite"].runs)]).to_dict(),
            "encrypt_over_pme_time": Ratio([a / b for a, b in zip(timings["encrypt"].runs, timings["pme_write"].runs)]).to_dict(),
        },
        "rotation": payload,
        "reports": reports,
        "target": REWRAP_TARGET,
        "met": speed.median >= REWRAP_TARGET,
        "profile": profiles,
    }
    return result


# --------------------------------------------------------------------------- memory benchmark

_CHILD_IMPORTS = "import apache_beam, pyarrow.parquet, pipelines.reencrypt, pipelines.home"


def _child_rss(args: list[str]) -> tuple[float, int]:
    """Run `python -m benchmarks.bench_lake --child ...`; (seconds, peak RSS in bytes) of that child.

    The peak is sampled with psutil every 5 ms (the child's RSS plus its own
    children's). Not `ru_maxrss`: on Linux a forked child's `ru_maxrss` keeps
    the parent's RSS at fork time across exec, so it reports the benchmark
    process's size, not the job's.
    """
    import psutil

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_lake", "--child", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {err[-2000:]}")
    return elapsed, peak


def run_memory(*, rows: int = 250_000, scale: int = 4, partitions: int = 10, runs: int = 5, out: str = os.path.join("bench-out", "memory"), seed: int = SEED) -> dict[str, Any]:
    """Peak RSS of a reencrypt job (child process) on a lake of `rows` and of `scale * rows` rows."""
    out = os.path.abspath(out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    home = _home(os.path.join(out, "home"))
    lakes: dict[str, dict[str, Any]] = {}
    for label, n in (("1x", rows), (f"{scale}x", rows * scale)):
        src = os.path.join(out, f"source-{label}")
        build_source(src, n, partitions, seed)
        lake = os.path.join(out, f"pristine-{label}")
        _encrypt(home, src, lake)
        shutil.rmtree(src)
        lakes[label] = {"rows": n, "pristine": lake, "bytes": _tree_bytes(lake), "files": len(_parquet_files(lake))}
    _rotate(home)
    work = os.path.join(out, "work")
    rss: dict[str, list[int]] = {"floor": [], **{label: [] for label in lakes}}
    secs: dict[str, Timing] = {label: Timing() for label in lakes}
    for _ in range(runs):
        rss["floor"].append(_child_rss(["imports"])[1])
        for label, info in lakes.items():
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(info["pristine"], work)
            elapsed, peak = _child_rss(["reencrypt", home.path, work])
            rss[label].append(peak)
            secs[label].runs.append(elapsed)
    shutil.rmtree(out, ignore_errors=True)
    big = f"{scale}x"
    med = {k: float(np.median(v)) for k, v in rss.items()}
    growth = Ratio([b / s for s, b in zip(rss["1x"], rss[big])])
    above = {k: med[k] - med["floor"] for k in lakes}
    return {
        "name": "memory",
        "params": {
            "rows_1x": rows,
            "scale": scale,
            "partitions": partitions,
            "runs": runs,
            "seed": seed,
            "lakes": {k: {kk: vv for kk, vv in v.items() if kk != "pristine"} for k, v in lakes.items()},
            "mode": "reencrypt",
            "how": "child process, RSS (with its children) sampled every 5 ms with psutil",
            "floor": f"a child that only runs `{_CHILD_IMPORTS}`",
        },
        "peak_rss_bytes": rss,
        "median_peak_rss_bytes": med,
        "above_floor_bytes": above,
        "seconds": {k: t.to_dict() for k, t in secs.items()},
        "ratio": growth.to_dict(),
        "ratio_above_floor": (above[big] / above["1x"]) if above["1x"] > 0 else None,
        "target": MEMORY_TARGET,
        "met": growth.median <= MEMORY_TARGET,
    }


def _child(argv: list[str]) -> int:
    if argv[0] == "imports":
        exec(_CHILD_IMPORTS)  # noqa: S102 - a fixed string
        return 0
    if argv[0] == "reencrypt":
        _reencrypt(argv[1], argv[2], "reencrypt")
        return 0
    raise SystemExit(f"unknown child command {argv[0]!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs="+", required=True)
    sys.exit(_child(parser.parse_args().child))
