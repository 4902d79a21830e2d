"""Benchmarks on a Parquet lake: encrypt, rotation (control plane and reencrypt), read path, pyarrow baselines; peak RSS.

**Data.** A synthetic customer table of `rows` rows, deterministic seed,
written as plain Parquet (`SOURCE_FILES` files) under the output directory
(bench-out/ by default), built once per run: `customer_id` (int64),
`region` (int64, `partitions` values, the partition key), three sensitive
strings `email` (16–32 random alphanumerics + "@example.com"), `ssn`
(11 bytes) and `phone` (15 bytes), and two clear columns `note` (32–64
random alphanumerics) and `spend` (float64).

**lake** (`run_lake`). Set-up, untimed: a key home is made and the source
encrypted into the *pristine* lake (key version 1); the home is then copied
aside (`home-v1`: every DEK in its directory wrapped under version 1), and
the same data is written with pyarrow Parquet Modular Encryption (PME) with
EXTERNAL key material (`EncryptionConfiguration(internal_key_material=False)`,
`file_encryption_properties(kms_config, config, path, filesystem)`, so a
`FileSystemKeyMaterialStore` keeps each file's wrapped keys in a
``_KEY_MATERIAL_FOR_<file>.json`` beside it) in the keyturn lake's layout:
same partitions, same number of files, same rows per file. Then, round by
round, each subject on fresh state:

- keyturn encrypt: `keyturn.pipelines.encrypt.run` (source -> encrypted lake,
  partitioned by region), on its own key home, with no Beam options (what
  the CLI does: a worker thread per core from 2,000,000 rows, see
  `keyturn.pipelines.runner.lake_job_args`), and again pinned to one CPU
  (the scaling baseline: every thread of the job, Beam's, pyarrow's and the
  native kernel's, shares that CPU, and the job runs in process). Both run
  in a child process (`python -m benchmarks.bench_lake --child encrypt`)
  and report the job's own time, start-up and imports excluded;
- the machine's scaling ceiling for that job: one child per CPU, started
  together, each pinned to its own CPU and encrypting its share of the
  source files (hard links in a directory of its own) into its own lake
  with its own key home; the slowest child's job time. They share nothing
  but the machine, so the one-CPU time over this one bounds what any split
  of the job across the same CPUs can reach here;
- keyturn `rotate --rewrap`: `home-v1` restored (untimed), then timed
  `keyturn.rotation.rotate` (provisions the version-2 KEK) followed by
  `keyturn.rotation.rewrap` on the home's registry and KMS, as
  `pipelines/cli.py` does for ``keyturn rotate --rewrap`` (the KMS wrapped
  in `CountingKms`; no `RateLimitedKms`, see the params). Around each round
  every file of the pristine lake (and of the home) is snapshotted
  (size, mtime, SHA-256): the lake bytes written must be 0, and the KMS
  calls must equal the DEKs in the directory (`registry.dek_count()`);
- PME `CryptoFactory.rotate_master_keys`: a new version of both master keys
  in the in-memory KMS, then a fresh `CryptoFactory` rotates every file of
  the PME lake (double wrapping, as written). Snapshotted the same way: the
  bytes written are the key-material files (the Parquet files must not
  change). The in-memory KMS counts its wrap and unwrap calls;
- reencrypt: `home-v1` restored and rotated to version 2 WITHOUT rewrap, a
  copy of the pristine lake (both untimed), then
  `keyturn.pipelines.reencrypt.run(mode="reencrypt")`: every file's DEKs are stale
  in the directory, so every cell is decrypted and sealed under a fresh
  DEK, and verified;
- plain pyarrow rewrite: each data file of the encrypted lake read with
  `pq.read_table` and written back with `pq.write_table` (same codec
  defaults), no crypto: the floor for a rotation that rewrites every file;
- PME write: each source file read and written with
  `pq.write_table(..., encryption_properties=...)`, the three sensitive
  columns under a column key and the footer under a footer key, internal
  key material, through `CryptoFactory` with an in-memory KMS client
  (master keys in a dict, wrap = AES-GCM with the master key), double
  wrapping ON (pyarrow's default), a new `CryptoFactory` per run.

**Read path**, after the rounds, on the home left by the last `rotate
--rewrap` round (directory entries on version 2, the rows' birth envelopes
on version 1): `keyturn.arrow_codec.decrypt_batch` over every row group of
the pristine lake, with `DekReader(kms, directory=registry)` and the
dataset's `contract=` against `DekReader(kms)` with neither (the birth
envelope unwrapped as it is). One reader per file (as one read bundle), the
file's row groups read before timing; in each round the two run on each
file back to back, in alternating order; the outputs are compared.

Untimed extra runs count the payload bytes given to AES-GCM decrypt and the
decrypt and encrypt calls (keyturn's cell operations, verification
included) by wrapping the AES-GCM objects keyturn's `DekReader` and
`DekScope` make, on the Python cell path (``KEYTURN_NATIVE=0``), for
`rotate --rewrap` and for reencrypt (per cell of the lake: the target is
2 decrypts, one of them verifying, and 1 encrypt). Storage: the bytes per
encrypted cell beyond its raw plaintext, from the Parquet metadata of the
keyturn lake, of the same lake rewritten with pyarrow's defaults, and of
the PME output. Profiles: a cProfile of one `rotate --rewrap`, and of one
encrypt (one core) and one reencrypt with every thread profiled
(`benchmarks.common.profile_threads`).

**memory** (`run_memory`): peak RSS of a `reencrypt` job (mode
"reencrypt", on a copy of a lake whose home was rotated without rewrap, so
every file is rewritten) in a child process
(`python -m benchmarks.bench_lake --child ...`), sampled every 5 ms with psutil
(not `ru_maxrss`: a forked child keeps the parent's peak across exec), on a lake of `rows` and of
`scale * rows` rows; plus the peak RSS of a child that only imports the same
modules (the interpreter and library floor). Both lakes are encrypted on
one core, so each has one file per partition and the 4x lake's files are
4x larger.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.common import Ratio, Timing, rate, random_strings, time_once
from keyturn.pipelines.runner import available_cores, lake_job_args

__all__ = ["run_lake", "run_memory", "build_source", "REWRAP_TARGET", "PME_ROTATE_TARGET", "READ_PATH_TARGET", "MEMORY_TARGET"]

SEED = 20240603
SENSITIVE = ("email", "ssn", "phone")
SOURCE_FILES = 4
REWRAP_TARGET = 100.0  # reencrypt time over `rotate --rewrap` time: at least
PME_ROTATE_TARGET = 3.0  # `rotate --rewrap` time over PME rotate_master_keys time: at most
READ_PATH_TARGET = 0.95  # decrypt throughput with the directory over without it: at least
MEMORY_TARGET = 1.3  # peak RSS of the 4x lake over the 1x lake
PME_WRITE_TARGET = 4.0  # lake encrypt time over the PME write time of the same data
SCALING_TARGET = 1.7  # lake encrypt on one CPU over the default (a worker thread per core)
STORAGE_TARGET = 18.0  # stored bytes per encrypted cell beyond its raw plaintext
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


# --------------------------------------------------------------------------- snapshots


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _snapshot(directory: str) -> dict[str, tuple[int, int, str]]:
    """Every file under `directory` (hidden ones included): relative path -> (size, mtime_ns, SHA-256)."""
    out: dict[str, tuple[int, int, str]] = {}
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns, _sha256(path))
    return out


def _written(before: dict[str, tuple[int, int, str]], after: dict[str, tuple[int, int, str]]) -> dict[str, Any]:
    """What changed between two snapshots: files added or changed (size, mtime or content) and their bytes."""
    added = sorted(p for p in after if p not in before)
    changed = sorted(p for p in after if p in before and after[p] != before[p])
    removed = sorted(p for p in before if p not in after)
    return {
        "files": len(after),
        "files_added": len(added),
        "files_changed": len(changed),
        "files_removed": len(removed),
        "bytes_written": sum(after[p][0] for p in added + changed),
        "written": added + changed,
    }


def _restore(snapshot: str, path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(snapshot, path)
    return path


# --------------------------------------------------------------------------- keyturn steps


def _home(path: str) -> Any:
    from keyturn.home import KeyHome

    shutil.rmtree(path, ignore_errors=True)
    return KeyHome.init(path, dataset="bench", actor="bench", reason="lake benchmark")


def _open_home(path: str) -> Any:
    from keyturn.home import KeyHome

    return KeyHome.open(path)


def _encrypt(home: Any, source: str, lake: str, beam_args: list[str] | None = None) -> dict[str, Any]:
    """`keyturn encrypt` as the CLI runs it: `beam_args` None is a user who passed no Beam option."""
    from keyturn.pipelines import encrypt

    return encrypt.run(
        home=home, source=source, lake=lake, columns=list(SENSITIVE), partition_by="region", actor="bench", reason="bench",
        beam_args=beam_args,
    )


ONE_CORE = ["--direct_num_workers=1"]  # the in-process runner: Python DoFns on one core


def _start_encrypt_child(home_path: str, source: str, lake: str, *, cpu: int | None) -> subprocess.Popen[str]:
    """`_encrypt` with no Beam options in a child process, started; with `cpu`, the child runs on that CPU only.

    Pinned (the child sets the affinity of each of its threads before the
    job starts; threads started later inherit it), every thread of the job
    shares that CPU: Beam's, pyarrow's and the native kernel's, and the job
    sees one core, so it runs in process. Its report (`_child_report`)
    carries ``seconds``, the job's own time inside the child (start-up and
    imports excluded, the same for every variant).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    pin = "-" if cpu is None else str(cpu)
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_lake", "--child", "encrypt", home_path, source, lake, pin],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _child_report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"encrypt child failed ({proc.returncode}): {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _encrypt_in_child(home_path: str, source: str, lake: str, *, cpu: int | None) -> dict[str, Any]:
    """`_start_encrypt_child`, waited for: its report."""
    return _child_report(_start_encrypt_child(home_path, source, lake, cpu=cpu))


def _encrypt_shares_in_children(homes: Sequence[str], sources: Sequence[str], lakes: Sequence[str], cpus: Sequence[int]) -> dict[str, Any]:
    """The machine's own scaling ceiling for this job: one child per CPU, each pinned to its CPU and encrypting
    its share of the source files into its own lake with its own key home, all started together.

    Nothing is shared but the machine (no GIL, no runner, no registry), so
    the one-CPU job's time over this one's bounds what any split of the job
    across the same CPUs can reach here. ``seconds``: the slowest child's job time.
    """
    procs = [_start_encrypt_child(h, s, lk, cpu=c) for h, s, lk, c in zip(homes, sources, lakes, cpus)]
    reports = [_child_report(p) for p in procs]
    return {
        "rows_written": sum(r["rows_written"] for r in reports),
        "seconds": max(r["seconds"] for r in reports),
        "children_s": [round(r["seconds"], 3) for r in reports],
    }


def _source_shares(source: str, directory: str, shares: int) -> list[str]:
    """`shares` directories under `directory`, each holding every `shares`-th file of `source` (hard links)."""
    files = _parquet_files(source)
    out = []
    for i in range(shares):
        share = os.path.join(directory, f"source-share-{i}")
        shutil.rmtree(share, ignore_errors=True)
        os.makedirs(share)
        for f in files[i::shares]:
            target = os.path.join(share, os.path.relpath(f, source).replace(os.sep, "_"))
            try:
                os.link(f, target)
            except OSError:  # another file system, or no hard links: a copy reads the same
                shutil.copyfile(f, target)
        out.append(share)
    return out


def _pme_decryption() -> Any:
    """Decryption properties for the PME write output (`_pme_write`)."""
    import pyarrow.parquet.encryption as pe

    factory = pe.CryptoFactory(lambda config: _InMemoryKms(config).client)
    return factory.file_decryption_properties(pe.KmsConnectionConfig(custom_kms_conf=_PME_KEYS), pe.DecryptionConfiguration())


def _stored_overhead(lake: str, source: str, *, pme: bool = False) -> dict[str, Any]:
    """Bytes per encrypted cell beyond its raw plaintext, as stored: the sensitive columns' compressed
    column chunks (every file of `lake`) minus the plaintext bytes of the same cells in `source`.
    `pme`: the files are PME output (their footers are decrypted to read the metadata)."""
    stored = dict.fromkeys(SENSITIVE, 0)
    encodings: dict[str, set[str]] = {name: set() for name in SENSITIVE}
    for path in _parquet_files(lake):
        md = pq.ParquetFile(path, decryption_properties=_pme_decryption() if pme else None).metadata
        for g in range(md.num_row_groups):
            for i in range(md.num_columns):
                col = md.row_group(g).column(i)
                if col.path_in_schema in stored:
                    stored[col.path_in_schema] += col.total_compressed_size
                    encodings[col.path_in_schema].update(col.encodings)
    plain = dict.fromkeys(SENSITIVE, 0)
    cells = dict.fromkeys(SENSITIVE, 0)
    for path in _parquet_files(source):
        table = pq.read_table(path, columns=list(SENSITIVE))
        for name in SENSITIVE:
            column = table.column(name)
            plain[name] += pc.sum(pc.binary_length(column)).as_py() or 0
            cells[name] += len(column) - column.null_count
    per_column = {name: (stored[name] - plain[name]) / cells[name] for name in SENSITIVE if cells[name]}
    total_cells = sum(cells.values())
    return {
        "bytes_per_cell_beyond_plaintext": (sum(stored.values()) - sum(plain.values())) / total_cells if total_cells else 0.0,
        "per_column": {k: round(v, 2) for k, v in per_column.items()},
        "stored_bytes": stored,
        "plaintext_bytes": plain,
        "cells": total_cells,
        "encodings": {k: sorted(v) for k, v in encodings.items()},
    }


def _rotate(home: Any) -> int:
    """`keyturn rotate` without `--rewrap`: a new active version; the directory's DEKs stay on the old one."""
    from keyturn.rotation import rotate

    return rotate(home.registry(), home.provision_kek, home.chain(), actor="bench", reason="bench rotation", dataset=home.dataset).version


def _rotate_rewrap(home: Any) -> dict[str, Any]:
    """`keyturn rotate --rewrap` on `home`, as `pipelines/cli.py` runs it: rotate, then the directory rewrap.

    The KMS the rewrap uses is wrapped in `CountingKms`; the report gets its
    counts (the rotation's KEK provisioning is not a DEK call and is not counted).
    """
    from keyturn.kms.base import CountingKms
    from keyturn.rotation import rewrap, rotate

    started = time.perf_counter()
    registry = home.registry()
    new = rotate(registry, home.provisioner(), home.chain(), actor="bench", reason="bench rotation", dataset=home.dataset)
    rotated = time.perf_counter()
    with home.kms() as kms:
        counting = CountingKms(kms)
        report = rewrap(home.registry(), counting, home.chain(), actor="bench", reason="bench rotation", dataset=home.dataset)
    report["rotate_s"] = rotated - started
    report["rewrap_s"] = time.perf_counter() - rotated
    report["version"] = new.version
    report["kms_calls_counted"] = counting.calls.total
    report["kms_rewrap_calls"] = counting.calls.rewrap
    return report


def _reencrypt(home_path: str, lake: str, mode: str) -> dict[str, Any]:
    from keyturn.pipelines import reencrypt

    report = reencrypt.run(lake, home=home_path, mode=mode, actor="bench", reason="bench")
    if report["problems"] or not report["complete"]:
        raise AssertionError(f"{mode}: problems {report['problems'][:3]}, complete={report['complete']}")
    return report


class _CountingAead:
    """AES-GCM that tallies the payload bytes it decrypts (tag excluded), its decrypt calls and its encrypt calls."""

    tally = [0, 0, 0]  # bytes decrypted, decrypt calls, encrypt calls
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
        with self.lock:
            self.tally[2] += 1
        return self._inner.encrypt(nonce, data, aad)


def _count_payload(fn: Any) -> tuple[Any, int, int, int]:
    """Run `fn()` on the Python cell path (``KEYTURN_NATIVE=0``) with the AES-GCM objects keyturn's `DekReader`
    and `DekScope` make wrapped; return (its result, payload bytes decrypted, decrypt calls, encrypt calls)."""
    import keyturn.reader as reader
    import keyturn.scope as scope

    originals = (reader.AESGCM, scope.AESGCM)
    native = os.environ.get("KEYTURN_NATIVE")
    _CountingAead.tally[:] = [0, 0, 0]
    os.environ["KEYTURN_NATIVE"] = "0"
    reader.AESGCM = lambda key: _CountingAead(originals[0](key))  # type: ignore[assignment]
    scope.AESGCM = lambda key: _CountingAead(originals[1](key))  # type: ignore[assignment]
    try:
        result = fn()
    finally:
        reader.AESGCM, scope.AESGCM = originals  # type: ignore[assignment]
        if native is None:
            os.environ.pop("KEYTURN_NATIVE", None)
        else:
            os.environ["KEYTURN_NATIVE"] = native
    return result, _CountingAead.tally[0], _CountingAead.tally[1], _CountingAead.tally[2]


# --------------------------------------------------------------------------- read path


def _read_batches(path: str) -> list[pa.RecordBatch]:
    """Every non-empty row group of a lake file as one record batch each."""
    pf = pq.ParquetFile(path)
    out = []
    for g in range(pf.num_row_groups):
        if pf.metadata.row_group(g).num_rows == 0:
            continue
        table = pf.read_row_group(g).combine_chunks()
        out.extend(table.to_batches()[:1] or [])
    return out


def _decrypt_file(batches: list[pa.RecordBatch], kms: Any, policy: Any, location: Any, *, directory: Any = None, contract: Any = None) -> tuple[list[Any], Any]:
    """`decrypt_batch` over one file's batches with one `DekReader` (with or without the directory); (results, reader stats)."""
    from keyturn.arrow_codec import decrypt_batch
    from keyturn.reader import DekReader

    reader = DekReader(kms, directory=directory) if directory is not None else DekReader(kms)
    with reader:
        results = [decrypt_batch(b, reader, policy, location, contract=contract) for b in batches]
    return results, reader.stats


def _read_path(home: Any, lake: str, rows: int, runs: int) -> dict[str, Any]:
    """Decrypt throughput with the directory (and contract) against without: interleaved, file by file."""
    from keyturn.kms.base import CountingKms
    from keyturn.policy import KeyPolicy
    from keyturn.scope import Location
    from keyturn.home import lake_of

    registry = home.registry()
    contract = registry.get_contract(home.dataset)
    if contract is None:
        raise AssertionError("the key home has no dataset contract")
    policy = KeyPolicy.from_registry(registry)
    files = lake_of(lake, home).data_files()
    timings = {"decrypt_directory": Timing(), "decrypt_no_directory": Timing()}
    stats: dict[str, dict[str, list[int]]] = {name: {"kms_unwraps": [], "directory_lookups": []} for name in timings}
    with home.kms() as kms:
        counting = {name: CountingKms(kms) for name in timings}
        for r in range(runs):
            spent = {name: 0.0 for name in timings}
            done = {name: 0 for name in timings}
            looked = {name: 0 for name in timings}
            calls_before = {name: counting[name].calls.total for name in timings}
            for j, f in enumerate(files):
                batches = _read_batches(f.path)
                location = Location(home.dataset, f.partition)
                subjects = {
                    "decrypt_directory": lambda: _decrypt_file(batches, counting["decrypt_directory"], policy, location, directory=registry, contract=contract),
                    "decrypt_no_directory": lambda: _decrypt_file(batches, counting["decrypt_no_directory"], policy, location),
                }
                order = list(subjects) if (r + j) % 2 == 0 else list(reversed(subjects))
                outputs = {}
                for name in order:
                    elapsed, (results, reader_stats) = time_once(subjects[name])
                    spent[name] += elapsed
                    done[name] += sum(res.plain.num_rows for res in results)
                    looked[name] += reader_stats.lookups
                    outputs[name] = results
                if r == 0:  # the two readers must agree, cell for cell
                    for a, b in zip(outputs["decrypt_directory"], outputs["decrypt_no_directory"]):
                        for name in SENSITIVE:
                            if not a.plain.column(name).equals(b.plain.column(name)):
                                raise AssertionError(f"{f.relpath}: column {name} differs with and without the directory")
                    first = outputs["decrypt_directory"][0].plain.column("email")
                    if not pc.all(pc.ends_with(first, "@example.com")).as_py():
                        raise AssertionError(f"{f.relpath}: email does not decrypt to an address")
                del outputs, batches
            for name in timings:
                if done[name] != rows:
                    raise AssertionError(f"{name}: {done[name]} rows decrypted, expected {rows}")
                timings[name].runs.append(spent[name])
                stats[name]["kms_unwraps"].append(counting[name].calls.total - calls_before[name])
                stats[name]["directory_lookups"].append(looked[name])
    cells = rows * len(SENSITIVE)
    throughput = Ratio([b / a for a, b in zip(timings["decrypt_directory"].runs, timings["decrypt_no_directory"].runs)])
    return {
        "files": len(files),
        "cells": cells,
        "timings": {name: t.to_dict() for name, t in timings.items()},
        "cells_per_s": {name: rate(cells, t) for name, t in timings.items()},
        "throughput_ratio": throughput.to_dict(),
        "time_ratio": Ratio([a / b for a, b in zip(timings["decrypt_directory"].runs, timings["decrypt_no_directory"].runs)]).to_dict(),
        "stats": stats,
        "target": READ_PATH_TARGET,
        "met": throughput.median >= READ_PATH_TARGET,
    }


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


def _pme_config(*, internal: bool) -> Any:
    import pyarrow.parquet.encryption as pe

    return pe.EncryptionConfiguration(
        footer_key="footer_key",
        column_keys={"col_key": list(SENSITIVE)},
        encryption_algorithm="AES_GCM_V1",
        double_wrapping=True,
        data_key_length_bits=256,
        internal_key_material=internal,
    )


def _pme_write(source: str, out: str) -> int:
    import pyarrow.parquet.encryption as pe

    kms_config = pe.KmsConnectionConfig(custom_kms_conf=_PME_KEYS)
    factory = pe.CryptoFactory(lambda config: _InMemoryKms(config).client)
    props = _pme_config(internal=True)
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


class _VersionedKms:
    """An in-memory KMS for PME with versioned master keys; counts its calls.

    `wrap_key` wraps under the newest version of a master key (AES-GCM, the
    version byte in front); `unwrap_key` under the version the wrapped key
    names. `new_versions()` is the KMS-side half of a master key rotation;
    `drop_old_versions()` makes the old versions unusable, so a read after
    it proves the rotation moved every key. Keys derive from the seed.
    """

    KEYS = ("footer_key", "col_key")
    KMS_INSTANCE = "bench-kms"

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.keys: dict[str, list[bytes | None]] = {name: [self._key(name, 0)] for name in self.KEYS}
        self.calls = {"wrap": 0, "unwrap": 0}
        self.lock = threading.Lock()

    def _key(self, name: str, version: int) -> bytes:
        return hashlib.sha256(f"{self.seed}:{name}:{version}".encode()).digest()

    def new_versions(self) -> None:
        for name, versions in self.keys.items():
            versions.append(self._key(name, len(versions)))

    def drop_old_versions(self) -> None:
        for versions in self.keys.values():
            versions[:-1] = [None] * (len(versions) - 1)

    def connection(self) -> Any:
        import pyarrow.parquet.encryption as pe

        return pe.KmsConnectionConfig(kms_instance_id=self.KMS_INSTANCE)

    def factory(self) -> Any:
        """A new `CryptoFactory` whose KMS clients use this KMS (no cache carried over from another factory)."""
        import pyarrow.parquet.encryption as pe
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        kms = self

        class Client(pe.KmsClient):
            def __init__(self) -> None:
                pe.KmsClient.__init__(self)

            def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> bytes:
                versions = kms.keys[master_key_identifier]
                version = len(versions) - 1
                nonce = os.urandom(12)
                sealed = AESGCM(versions[version]).encrypt(nonce, key_bytes, master_key_identifier.encode())  # type: ignore[arg-type]
                with kms.lock:
                    kms.calls["wrap"] += 1
                return base64.b64encode(bytes([version]) + nonce + sealed)

            def unwrap_key(self, wrapped_key: bytes, master_key_identifier: str) -> bytes:
                raw = base64.b64decode(wrapped_key)
                key = kms.keys[master_key_identifier][raw[0]]
                if key is None:
                    raise ValueError(f"master key {master_key_identifier} version {raw[0]} is no longer available")
                with kms.lock:
                    kms.calls["unwrap"] += 1
                return AESGCM(key).decrypt(raw[1:13], raw[13:], master_key_identifier.encode())

        return pe.CryptoFactory(lambda _config: Client())


def _pme_external_lake(source: str, keyturn_lake: str, out: str, kms: _VersionedKms) -> dict[str, Any]:
    """PME files with external key material, in the keyturn lake's layout (same partitions, files, rows per file)."""
    import pyarrow.fs as pafs

    from keyturn.home import lake_of

    shutil.rmtree(out, ignore_errors=True)
    fs = pafs.LocalFileSystem()
    factory = kms.factory()
    config = _pme_config(internal=False)
    layout: dict[str, list[tuple[str, int]]] = {}
    for f in lake_of(keyturn_lake).data_files():
        layout.setdefault(f.partition, []).append((f.relpath, pq.ParquetFile(f.path).metadata.num_rows))
    rows = 0
    for partition, files in sorted(layout.items()):
        key, value = partition.split("=", 1)
        table = pq.read_table(source, filters=[(key, "=", int(value))]).drop_columns([key])
        if table.num_rows != sum(n for _, n in files):
            raise AssertionError(f"partition {partition}: {table.num_rows} source rows, {sum(n for _, n in files)} in the lake")
        offset = 0
        for relpath, n in files:
            path = os.path.join(out, relpath)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            props = factory.file_encryption_properties(kms.connection(), config, path, fs)
            pq.write_table(table.slice(offset, n), path, filesystem=fs, encryption_properties=props)
            offset += n
            rows += n
    material = [p for p in _snapshot(out) if os.path.basename(p).startswith("_KEY_MATERIAL_FOR_")]
    return {"rows": rows, "files": sum(len(v) for v in layout.values()), "key_material_files": len(material), "bytes": _tree_bytes(out)}


def _pme_rotate(lake: str, kms: _VersionedKms) -> dict[str, Any]:
    """A PME master key rotation: new master key versions in the KMS, then `rotate_master_keys` on every file."""
    import pyarrow.fs as pafs

    fs = pafs.LocalFileSystem()
    before = dict(kms.calls)
    kms.new_versions()
    factory = kms.factory()
    connection = kms.connection()
    files = _parquet_files(lake)
    for f in files:
        factory.rotate_master_keys(connection, f, fs, double_wrapping=True, cache_lifetime_seconds=600)
    return {"files": len(files), "kms_wrap_calls": kms.calls["wrap"] - before["wrap"], "kms_unwrap_calls": kms.calls["unwrap"] - before["unwrap"]}


def _pme_external_check(lake: str, kms: _VersionedKms, expected_rows: int) -> None:
    """Read every PME file with only the newest master key versions left in the KMS."""
    import pyarrow.fs as pafs
    import pyarrow.parquet.encryption as pe

    kms.drop_old_versions()
    fs = pafs.LocalFileSystem()
    factory = kms.factory()
    rows = 0
    for f in _parquet_files(lake):
        dec = factory.file_decryption_properties(kms.connection(), pe.DecryptionConfiguration(), f, fs)
        table = pq.read_table(f, filesystem=fs, decryption_properties=dec)
        if not pc.all(pc.ends_with(table.column("email"), "@example.com")).as_py():
            raise AssertionError(f"{f}: email does not decrypt to an address")
        rows += table.num_rows
    if rows != expected_rows:
        raise AssertionError(f"rotated PME lake has {rows} rows, expected {expected_rows}")


def _split_pme(diff: dict[str, Any], after: dict[str, tuple[int, int, str]]) -> dict[str, Any]:
    material = [p for p in diff["written"] if os.path.basename(p).startswith("_KEY_MATERIAL_FOR_")]
    parquet = [p for p in diff["written"] if p.endswith(".parquet")]
    return {
        "key_material_files_written": len(material),
        "key_material_bytes_written": sum(after[p][0] for p in material),
        "parquet_files_written": len(parquet),
        "parquet_bytes_written": sum(after[p][0] for p in parquet),
    }


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
    """Encrypt, `rotate --rewrap`, PME rotation, reencrypt, plain rewrite, PME write and the read path; medians of `runs` rounds."""
    out = os.path.abspath(out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    src = os.path.join(out, "source")
    t0 = time.perf_counter()
    source = build_source(src, rows, partitions, seed)
    build_s = time.perf_counter() - t0

    # set-up: the pristine lake under key version 1, its home kept aside, PME with external key material
    home = _home(os.path.join(out, "home"))
    pristine = os.path.join(out, "pristine")
    enc_report = _encrypt(home, src, pristine)
    lake_bytes = _tree_bytes(pristine)
    lake_files = len(_parquet_files(pristine))
    home_v1 = os.path.join(out, "home-v1")
    _restore(home.path, home_v1)
    enc_home = _open_home(_restore(home_v1, os.path.join(out, "home-encrypt")))
    deks = home.registry().dek_count()
    pme_kms = _VersionedKms(seed)
    pme_ext = os.path.join(out, "pme-external")
    t0 = time.perf_counter()
    pme_ext_info = _pme_external_lake(src, pristine, pme_ext, pme_kms)
    pme_ext_info["write_s"] = round(time.perf_counter() - t0, 2)
    pme_ext_info["kms_calls_at_write"] = dict(pme_kms.calls)

    rot_home_path = os.path.join(out, "home-rotate")
    re_home_path = os.path.join(out, "home-reencrypt")
    work = os.path.join(out, "work")

    def fresh(path: str) -> str:
        shutil.rmtree(path, ignore_errors=True)
        return path

    reports: dict[str, list[dict[str, Any]]] = {"encrypt": [], "rotate_rewrap": [], "pme_rotate": [], "reencrypt": []}

    # each subject: setup() -> state (untimed), run(state) -> rows covered (timed), check(state, result) (untimed)
    def enc_setup() -> Any:
        return fresh(os.path.join(out, "enc"))

    cpus = sorted(os.sched_getaffinity(0))
    shares = min(len(cpus), source["files"])
    share_sources = _source_shares(src, out, shares)
    share_homes = [_restore(home_v1, os.path.join(out, f"home-share-{i}")) for i in range(shares)]

    def enc_run(target: str) -> Any:
        return _encrypt_in_child(enc_home.path, src, target, cpu=None)

    def enc1_run(target: str) -> Any:
        return _encrypt_in_child(enc_home.path, src, target, cpu=cpus[0])

    def shares_setup() -> list[str]:
        return [fresh(os.path.join(out, f"enc-share-{i}")) for i in range(shares)]

    def shares_run(lakes: list[str]) -> Any:
        return _encrypt_shares_in_children(share_homes, share_sources, lakes, cpus[:shares])

    share_children: list[list[float]] = []

    def shares_check(_: Any, r: dict[str, Any]) -> int:
        share_children.append(r["children_s"])
        return r["rows_written"]

    def enc_check(_: Any, r: dict[str, Any]) -> int:
        reports["encrypt"].append({k: r.get(k) for k in ("rows_written", "files_written", "bytes_written", "kms_calls")})
        return r["rows_written"]

    def rot_setup() -> Any:
        h = _open_home(_restore(home_v1, rot_home_path))
        registry = h.registry()
        return {
            "home": h,
            "deks": registry.dek_count(),
            "deks_on_old": registry.dek_count(registry.active().version),
            "lake": _snapshot(pristine),
            "home_files": _snapshot(rot_home_path),
        }

    def rot_check(state: dict[str, Any], r: dict[str, Any]) -> int:
        lake_after = _snapshot(pristine)
        lake_diff, home_diff = _written(state["lake"], lake_after), _written(state["home_files"], _snapshot(rot_home_path))
        if not r["complete"] or r["deks_failed"] or r["deks_moved"] != state["deks_on_old"]:
            raise AssertionError(f"rotate --rewrap: moved {r['deks_moved']} of {state['deks_on_old']} DEKs, complete={r['complete']}")
        reports["rotate_rewrap"].append({
            "deks": state["deks"],
            "deks_on_old_version": state["deks_on_old"],
            "deks_moved": r["deks_moved"],
            "kms_calls": r["kms_calls_counted"],
            "kms_rewrap_calls": r["kms_rewrap_calls"],
            "kms_calls_reported": r["kms_calls"],
            "rotate_s": round(r["rotate_s"], 6),
            "rewrap_s": round(r["rewrap_s"], 6),
            "lake_files": lake_diff["files"],
            "lake_files_written": lake_diff["files_added"] + lake_diff["files_changed"] + lake_diff["files_removed"],
            "lake_bytes_written": lake_diff["bytes_written"],
            "home_files_written": home_diff["files_added"] + home_diff["files_changed"],
            "home_bytes_written": home_diff["bytes_written"],
            "home_written": home_diff["written"],
        })
        return rows

    def pme_rot_setup() -> Any:
        return _snapshot(pme_ext)

    def pme_rot_check(before: Any, r: dict[str, Any]) -> int:
        after = _snapshot(pme_ext)
        diff = _written(before, after)
        split = _split_pme(diff, after)
        if split["parquet_files_written"] or diff["files_removed"] or split["key_material_files_written"] != pme_ext_info["key_material_files"]:
            raise AssertionError(f"PME rotation wrote {diff['written'][:5]}, removed {diff['files_removed']}")
        reports["pme_rotate"].append({**r, "lake_files": diff["files"], "lake_bytes_written": diff["bytes_written"], **split})
        return rows

    def re_setup() -> Any:
        h = _open_home(_restore(home_v1, re_home_path))
        _rotate(h)  # without --rewrap: every DEK of the lake stays on version 1, stale in the directory
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work)
        return h.path

    def re_check(_: Any, r: dict[str, Any]) -> int:
        if r["files_rewritten"] != lake_files:
            raise AssertionError(f"reencrypt rewrote {r['files_rewritten']} of {lake_files} files")
        reports["reencrypt"].append({k: r.get(k) for k in ("files_rewritten", "rows_moved", "bytes_rewritten", "kms_calls")})
        return r["rows_moved"]

    subjects: dict[str, tuple[Any, Any, Any]] = {
        "encrypt": (enc_setup, enc_run, enc_check),
        "encrypt_1_core": (enc_setup, enc1_run, lambda _s, r: r["rows_written"]),
        "encrypt_shares": (shares_setup, shares_run, shares_check),
        "rotate_rewrap": (rot_setup, lambda s: _rotate_rewrap(s["home"]), rot_check),
        "pme_rotate": (pme_rot_setup, lambda _s: _pme_rotate(pme_ext, pme_kms), pme_rot_check),
        "reencrypt": (re_setup, lambda h: _reencrypt(h, work, "reencrypt"), re_check),
        "plain_rewrite": (lambda: fresh(os.path.join(out, "plain")), lambda d: _plain_rewrite(pristine, d), lambda _s, n: n),
        "pme_write": (lambda: fresh(os.path.join(out, "pme")), lambda d: _pme_write(src, d), lambda _s, n: n),
    }
    timings = {name: Timing() for name in subjects}
    for _ in range(runs):
        for name, (setup, fn, check) in subjects.items():
            state = setup()
            elapsed, result = time_once(lambda: fn(state))
            if isinstance(result, dict) and "seconds" in result:  # a child's own time, without its start-up
                elapsed = result["seconds"]
            n = check(state, result)
            if n != rows:
                raise AssertionError(f"{name}: {n} rows, expected {rows}")
            timings[name].runs.append(elapsed)
    _pme_check(os.path.join(out, "pme"), rows)
    pme_bytes = _tree_bytes(os.path.join(out, "pme"))
    # bytes per encrypted cell beyond its plaintext, as stored: the keyturn lake as written, the same lake
    # rewritten with pyarrow's default encodings (the plain rewrite), and PME (encrypts after compression)
    storage = {
        "keyturn": _stored_overhead(pristine, src),
        "keyturn_lake_pyarrow_default_encodings": _stored_overhead(os.path.join(out, "plain"), src),
        "pme": _stored_overhead(os.path.join(out, "pme"), src, pme=True),
    }
    _pme_external_check(pme_ext, pme_kms, rows)
    for d in ("work", "enc", "plain", "pme", "pme-external", *(f"{kind}-share-{i}" for kind in ("enc", "source", "home") for i in range(shares))):
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)

    # the read path, on the home the last rotate --rewrap round left (directory on the new version)
    read = _read_path(_open_home(rot_home_path), pristine, rows, runs)

    # payload bytes decrypted (untimed runs, AES-GCM wrapped)
    payload: dict[str, Any] = {}
    h = _open_home(_restore(home_v1, rot_home_path))
    report, nbytes, cells, _ = _count_payload(lambda: _rotate_rewrap(h))
    payload["rotate_rewrap"] = {"payload_bytes_decrypted": nbytes, "cells_decrypted": cells, "kms_calls": report["kms_calls_counted"], "deks_moved": report["deks_moved"]}
    h = _open_home(_restore(home_v1, re_home_path))
    _rotate(h)
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(pristine, work)
    lake_cells = storage["keyturn"]["cells"]
    report, nbytes, cells, sealed = _count_payload(lambda: _reencrypt(h.path, work, "reencrypt"))
    payload["reencrypt"] = {
        "bytes_rewritten": report["bytes_rewritten"],
        "files_rewritten": report["files_rewritten"],
        "payload_bytes_decrypted": nbytes,
        "cells_decrypted": cells,
        "cells_encrypted": sealed,
        "lake_cells": lake_cells,
        "decrypts_per_cell": cells / lake_cells if lake_cells else None,
        "encrypts_per_cell": sealed / lake_cells if lake_cells else None,
        "kms_calls": report["kms_calls"],
        "how": "KEYTURN_NATIVE=0 (the Python cell path), the AES-GCM objects of DekReader and DekScope wrapped",
    }
    shutil.rmtree(work, ignore_errors=True)

    profiles: dict[str, Any] = {}
    if profile:
        from benchmarks.common import profile_threads, profile_top

        h = _open_home(_restore(home_v1, rot_home_path))
        prof = profile_top(lambda: _rotate_rewrap(h), repeat=1, top=12)
        profiles["rotate_rewrap"] = {"total_s": prof["total_s"], "top": prof["top"]}
        # the lake jobs on the in-process runner, every thread profiled (the runner's workers and the
        # reencrypt thread pool do the work; the calling thread waits for them)
        profiles["encrypt"] = profile_threads(lambda: _encrypt(enc_home, src, fresh(os.path.join(out, "enc")), ONE_CORE), top=12)
        h = _open_home(_restore(home_v1, re_home_path))
        _rotate(h)
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work)
        profiles["reencrypt"] = profile_threads(lambda: _reencrypt(h.path, work, "reencrypt"), top=12)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(os.path.join(out, "enc"), ignore_errors=True)

    rot_reports, pme_reports = reports["rotate_rewrap"], reports["pme_rotate"]
    kms_equal = all(r["kms_calls"] == r["deks_on_old_version"] == r["deks_moved"] for r in rot_reports)
    zero_bytes = all(r["lake_bytes_written"] == 0 and r["lake_files_written"] == 0 for r in rot_reports)
    vs_pme = Ratio([k / p for k, p in zip(timings["rotate_rewrap"].runs, timings["pme_rotate"].runs)])
    speed = Ratio([re / rw for rw, re in zip(timings["rotate_rewrap"].runs, timings["reencrypt"].runs)])
    vs_pme_write = Ratio([a / b for a, b in zip(timings["encrypt"].runs, timings["pme_write"].runs)])
    scaling = Ratio([a / b for a, b in zip(timings["encrypt_1_core"].runs, timings["encrypt"].runs)])
    ceiling = Ratio([a / b for a, b in zip(timings["encrypt_1_core"].runs, timings["encrypt_shares"].runs)])
    reen = payload["reencrypt"]
    per_cell_ok = reen["decrypts_per_cell"] is not None and abs(reen["decrypts_per_cell"] - 2) < 1e-9 and abs(reen["encrypts_per_cell"] - 1) < 1e-9
    overhead = storage["keyturn"]["bytes_per_cell_beyond_plaintext"]
    targets = {
        "encrypt_over_pme_write_time": {"target": f"<= {PME_WRITE_TARGET:g}", "measured": vs_pme_write.median, "met": vs_pme_write.median <= PME_WRITE_TARGET},
        "encrypt_1_core_over_default_time": {"target": f">= {SCALING_TARGET:g}", "measured": scaling.median, "met": scaling.median >= SCALING_TARGET},
        "reencrypt_cell_operations": {
            "target": "1 + 1 + 1 verifying decrypt",
            "measured": f"{reen['decrypts_per_cell']:.3f} decrypts + {reen['encrypts_per_cell']:.3f} encrypts per cell",
            "met": per_cell_ok,
        },
        "stored_bytes_per_cell_beyond_plaintext": {"target": f"<= {STORAGE_TARGET:g}", "measured": overhead, "met": overhead <= STORAGE_TARGET},
        "reencrypt_over_rotate_rewrap_time": {"target": f">= {REWRAP_TARGET:g}", "measured": speed.median, "met": speed.median >= REWRAP_TARGET},
        "rotate_rewrap_over_pme_rotate_time": {"target": f"<= {PME_ROTATE_TARGET:g}", "measured": vs_pme.median, "met": vs_pme.median <= PME_ROTATE_TARGET},
        "rewrap_kms_calls_equal_deks": {"target": "= DEKs", "measured": [r["kms_calls"] for r in rot_reports], "met": kms_equal},
        "rotate_rewrap_lake_bytes_written": {"target": "0", "measured": max(r["lake_bytes_written"] for r in rot_reports), "met": zero_bytes},
        "decrypt_directory_over_no_directory_throughput": {"target": f">= {READ_PATH_TARGET:g}", "measured": read["throughput_ratio"]["median"], "met": read["met"]},
    }
    data_subjects = ("encrypt", "encrypt_1_core", "encrypt_shares", "reencrypt", "plain_rewrite", "pme_write")
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
            "deks": deks,
            "pme_bytes": pme_bytes,
            "pme_external": pme_ext_info,
            "build_source_s": round(build_s, 2),
            "pme": "CryptoFactory, in-memory KmsClient, AES_GCM_V1, double_wrapping=True, 256-bit DEKs, footer encrypted",
            "pme_rotation": "external key material (FileSystemKeyMaterialStore), a new master key version, a fresh CryptoFactory, "
            "rotate_master_keys(double_wrapping=True, cache_lifetime_seconds=600) per file",
            "rotate_rewrap": "keyturn.rotation.rotate then keyturn.rotation.rewrap on a local key home (LocalKms, SQLite registry), "
            "the KMS in CountingKms and not rate-limited",
            "rewrap_rate_limit": "lifecycle.max_kms_requests_per_second (default 50, burst 50) applies to `keyturn rotate --rewrap`; "
            "not applied here, so the time is keyturn's own",
            "first_encrypt": {k: enc_report.get(k) for k in ("rows_written", "files_written", "bytes_written", "kms_calls")},
            "encrypt_default_args": lake_job_args(None, rows=rows, items=source["files"]),
            "encrypt_1_core_args": "no Beam options, the child process pinned to one CPU (sched_setaffinity): in process",
            "encrypt_shares": f"{shares} child processes started together, each pinned to its own CPU, each encrypting "
            f"1/{shares} of the source files into its own lake with its own key home (the slowest child's time)",
            "cores": available_cores(),
        },
        "timings": {name: t.to_dict() for name, t in timings.items()},
        "rows_per_s": {name: rate(rows, timings[name]) for name in data_subjects},
        "mb_per_s": {name: {k: v * lake_bytes / rows / 1e6 for k, v in rate(rows, timings[name]).items()} for name in data_subjects},
        "ratios": {
            "rotate_rewrap_over_pme_rotate_time": vs_pme.to_dict(),
            "reencrypt_over_rotate_rewrap_time": speed.to_dict(),
            "reencrypt_over_plain_time": Ratio([a / b for a, b in zip(timings["reencrypt"].runs, timings["plain_rewrite"].runs)]).to_dict(),
            "encrypt_over_pme_time": vs_pme_write.to_dict(),
            "encrypt_1_core_over_default_time": scaling.to_dict(),
            "encrypt_1_core_over_shares_time": ceiling.to_dict(),
        },
        "encrypt_shares_children_s": share_children,
        "storage": storage,
        "rotation": {
            "rotate_rewrap": {**payload["rotate_rewrap"], "rounds": rot_reports},
            "pme_rotate": {"rounds": pme_reports},
            "reencrypt": payload["reencrypt"],
        },
        "read_path": read,
        "reports": {k: v for k, v in reports.items() if k in ("encrypt", "reencrypt")},
        "targets": targets,
        "target": REWRAP_TARGET,
        "met": all(t["met"] for t in targets.values()),
        "profile": profiles,
    }
    return result


# --------------------------------------------------------------------------- memory benchmark

_CHILD_IMPORTS = "import apache_beam, pyarrow.parquet, keyturn.pipelines.reencrypt, keyturn.home"


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
        _encrypt(home, src, lake, ONE_CORE)  # one file per partition at both sizes: files grow with the lake
        shutil.rmtree(src)
        lakes[label] = {"rows": n, "pristine": lake, "bytes": _tree_bytes(lake), "files": len(_parquet_files(lake))}
    _rotate(home)  # without --rewrap: the lakes' DEKs stay on version 1 (stale), so each reencrypt run rewrites every file
    work = os.path.join(out, "work")
    rss: dict[str, list[int]] = {"floor": [], **{label: [] for label in lakes}}
    secs: dict[str, Timing] = {label: Timing() for label in lakes}
    for _ in range(runs):
        rss["floor"].append(_child_rss(["imports"])[1])
        for label, info in lakes.items():
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(info["pristine"], work)
            elapsed, peak = _child_rss(["reencrypt", home.path, work, str(info["files"])])
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
            "mode": "reencrypt (home rotated without rewrap: every file rewritten under fresh DEKs)",
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
    if argv[0] == "encrypt":  # encrypt HOME SOURCE LAKE CPU (- for none): one JSON line, the report's counts and the job's seconds
        if argv[4] != "-":
            for tid in os.listdir("/proc/self/task"):  # every thread started so far; later ones inherit
                os.sched_setaffinity(int(tid), {int(argv[4])})
        home = _open_home(argv[1])
        elapsed, report = time_once(lambda: _encrypt(home, argv[2], argv[3]))
        keys = ("rows_written", "files_written", "bytes_written", "kms_calls")
        print(json.dumps({**{k: report.get(k) for k in keys}, "seconds": elapsed, "cores": available_cores()}))
        return 0
    if argv[0] == "reencrypt":  # reencrypt HOME LAKE FILES: every one of the lake's FILES files must be rewritten
        report = _reencrypt(argv[1], argv[2], "reencrypt")
        if report["files_rewritten"] != int(argv[3]):
            raise SystemExit(f"reencrypt rewrote {report['files_rewritten']} of {argv[3]} files: nothing to measure")
        return 0
    raise SystemExit(f"unknown child command {argv[0]!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs="+", required=True)
    sys.exit(_child(parser.parse_args().child))
