"""The demo `make demo` runs (also `keyturn demo`): encrypt, rotate, rewrap in the key home, status, decrypt a sample.

    keyturn demo [--rows N] [--partitions P] [--out DIR] [-- beam options]

Everything is local, on the embedded defaults: a key home (LocalKms keystore
file, single node; SQLite key registry with its DEK directory and dataset
contracts; hash-chained audit log), a Parquet lake under `--out` (default
./demo-out, wiped first), Beam's in-process runner. The steps call the same
functions as the CLI verbs:

1. a synthetic customer table with PII (email, ssn, phone), deterministic
   seed, `--rows` rows (default 1,000,000) across `--partitions` regions
   (default 10), written as plain Parquet files;
2. `keyturn init`; 3. `keyturn encrypt --partition-by region` (one DEK per
   partition, each registered in the key home's DEK directory; the first
   write pins the dataset contract);
4. `keyturn status`; 5. `keyturn rotate`; 6. `keyturn status` (0% current);
7. `keyturn rewrap`, batch-lazily: a first run bounded to half the DEKs,
   status, a second run that finishes, and a third that finds nothing to
   do (zero KMS calls). Rotation is a control-plane operation: the lake's
   files are checked byte for byte and by mtime before and after, and not
   one lake byte changes;
8. `keyturn retire 1`: allowed, because the directory holds no DEK under it;
9. `keyturn decrypt` of one partition, checked identical to the source;

and then says in plain words what happened (rows, KMS calls, lake bytes
written, time per step): `run` returns a `DemoReport` (`keyturn.reports`)
whose ``summary`` is that account (`keyturn.pipelines.output` renders it).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from keyturn.audit.events import utc_now
from keyturn.reports import DemoReport, ProgressFn, say

__all__ = ["run", "sample_table", "SENSITIVE"]

SENSITIVE = ("email", "ssn", "phone")
DEFAULT_ROWS = 1_000_000
DEFAULT_PARTITIONS = 10
DEFAULT_OUT = "demo-out"
SOURCE_FILES = 4


def sample_table(rows: int, partitions: int, seed: int = 7) -> pa.Table:
    """Synthetic customers with PII; the same table for the same arguments."""
    rng = np.random.default_rng(seed)
    ids = np.arange(rows, dtype=np.int64)
    a, b, c = rng.integers(100, 900, rows), rng.integers(10, 99, rows), rng.integers(1000, 9999, rows)
    ssn = [f"{x:03d}-{y:02d}-{z:04d}" for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())]
    phone = [f"+1-555-{x:03d}-{z:04d}" for x, z in zip(rng.integers(100, 999, rows).tolist(), rng.integers(0, 9999, rows).tolist())]
    ssn_arr = pa.array(ssn, pa.string())
    ssn_arr = pc.if_else(pa.array(ids % 50 == 0), pa.scalar(None, pa.string()), ssn_arr)  # some unknown
    return pa.table(
        {
            "customer_id": ids,
            "region": pa.array(ids % partitions, pa.int64()),
            "email": pa.array([f"user{i}@example.com" for i in ids.tolist()], pa.string()),
            "ssn": ssn_arr,
            "phone": pa.array(phone, pa.string()),
            "spend": pa.array(rng.normal(100, 30, rows).round(2)),
            "signup": pa.array((np.datetime64("2020-01-01") + rng.integers(0, 1500, rows).astype("timedelta64[D]")), pa.date32()),
        }
    )


def _lake_bytes(lake: str) -> int:
    from keyturn.lake import Lake

    return sum(f.size for f in Lake(lake).data_files())


def _lake_snapshot(lake: str) -> dict[str, tuple[int, int, str]]:
    """Every file under the lake: relative path -> (size, mtime_ns, sha256)."""
    import hashlib

    out = {}
    for root, _dirs, files in os.walk(lake):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            st = os.stat(path)
            out[os.path.relpath(path, lake)] = (st.st_size, st.st_mtime_ns, digest)
    return out


def run(
    *,
    rows: int = DEFAULT_ROWS,
    partitions: int = DEFAULT_PARTITIONS,
    out: str = DEFAULT_OUT,
    beam_args: Sequence[str] | None = None,
    actor: str = "demo",
    clock: Callable[[], datetime] = utc_now,
    progress: ProgressFn | None = None,
) -> DemoReport:
    """Run the whole demo under `out` (wiped first); returns its report, with a plain-words `summary`.

    `actor` and `clock` are the key home's and every step's; `progress`, if
    given, hears each step (and the files and rows of encrypt and decrypt).
    """
    from keyturn.rotation import retire, rewrap, rotate  # the same run() functions the CLI verbs call
    from keyturn.pipelines import decrypt, encrypt, output, status
    from keyturn.home import KeyHome

    if rows < partitions or partitions < 1:
        raise ValueError("--rows must be >= --partitions >= 1")
    out = os.path.abspath(out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    paths = {k: os.path.join(out, k) for k in ("source", "home", "lake", "sample")}
    steps: dict[str, dict[str, Any]] = {}
    started = time.monotonic()

    def step(name: str, label: str, fn: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
        """Run one step; its JSON form, with its own time in ``seconds``, is kept in ``steps``."""
        say(progress, label)
        t0 = time.monotonic()
        result = dict(fn())
        result["seconds"] = round(time.monotonic() - t0, 2)
        steps[name] = result
        return result

    def make_source() -> dict[str, Any]:
        table = sample_table(rows, partitions)
        os.makedirs(paths["source"])
        step_rows = -(-rows // SOURCE_FILES)
        for k in range(SOURCE_FILES):
            pq.write_table(table.slice(k * step_rows, step_rows), os.path.join(paths["source"], f"customers-{k}.parquet"))
        return {"rows": rows, "partitions": partitions, "files": SOURCE_FILES, "sensitive": list(SENSITIVE)}

    step("source", "writing the sample data", make_source)
    home = KeyHome.init(paths["home"], dataset="customers", actor=actor, reason="keyturn demo", clock=clock)
    steps["init"] = {"active_version": home.registry().active().version}
    enc = step("encrypt", "encrypting", lambda: encrypt.run(
        home=home, source=paths["source"], lake=paths["lake"], columns=list(SENSITIVE), partition_by="region",
        beam_args=beam_args, actor=actor, reason="keyturn demo: first load", clock=clock, progress=progress,
    ))
    before = step("status_before", "status", lambda: status.run(home=home, lake=paths["lake"], clock=clock))

    def do_rotate() -> dict[str, Any]:
        new = rotate(home.registry(), home.provision_kek, home.chain(), actor=actor, reason="scheduled rotation",
                     clock=clock, dataset=home.dataset)
        return {"version": new.version}

    step("rotate", "rotating the key", do_rotate)
    rotated = step("status_rotated", "status", lambda: status.run(home=home, lake=paths["lake"], clock=clock))
    lake_before = _lake_snapshot(paths["lake"])
    deks = home.registry().dek_count()
    half = max(1, deks // 2)

    def do_rewrap(reason: str, max_deks: int | None = None) -> dict[str, Any]:
        with home.kms() as kms:
            return rewrap(home.registry(), kms, home.chain(), actor=actor, reason=reason, clock=clock,
                          dataset=home.dataset, max_deks=max_deks)

    first = step("rewrap_1", f"re-wrapping (first {half} of {deks} DEKs)", lambda: do_rewrap("keyturn demo: lazy rewrap", half))
    middle = step("status_middle", "status", lambda: status.run(home=home, lake=paths["lake"], clock=clock))
    second = step("rewrap_2", "re-wrapping the rest", lambda: do_rewrap("keyturn demo: lazy rewrap"))
    third = step("rewrap_3", "checking nothing is left", lambda: do_rewrap("keyturn demo: idempotency check"))
    lake_untouched = _lake_snapshot(paths["lake"]) == lake_before

    def do_retire() -> dict[str, Any]:
        retired = retire(home.registry(), 1, home.chain(), actor=actor, reason="keyturn demo: version 1 unused",
                         clock=clock, dataset=home.dataset)
        return {"version": retired.version, "state": retired.state.value}

    step("retire", "retiring key version 1", do_retire)
    after = step("status_after", "status", lambda: status.run(home=home, lake=paths["lake"], report_path=os.path.join(out, "status.html"), clock=clock))

    sample_partition = "region=0"
    dec = step("decrypt", "decrypting a sample", lambda: decrypt.run(
        home=home, lake=paths["lake"], out=paths["sample"], partitions=[sample_partition], beam_args=beam_args,
        actor=actor, clock=clock, progress=progress,
    ))
    source = pq.read_table(paths["source"]).filter(pc.equal(pc.field("region"), 0)).drop_columns(["region"]).sort_by("customer_id")
    plain = pq.read_table(os.path.join(paths["sample"], sample_partition)).sort_by("customer_id")
    plain = plain.select(source.column_names)
    identical = plain.cast(source.schema).equals(source)
    lake_bytes = _lake_bytes(paths["lake"])
    report = DemoReport(
        out=out,
        rows=rows,
        partitions=partitions,
        sensitive_columns=list(SENSITIVE),
        steps=steps,
        encrypt={"rows": enc["rows_written"], "files": enc["files_written"], "bytes": enc["bytes_written"], "kms_calls": enc["kms_calls"]},
        percent_current={
            "after_encrypt": before["percent_current"],
            "after_rotate": rotated["percent_current"],
            "after_first_rewrap": middle["percent_current"],
            "after_second_rewrap": after["percent_current"],
        },
        rewrap={
            "deks": deks,
            "deks_moved": first["deks_moved"] + second["deks_moved"],
            "kms_calls": first["kms_calls"] + second["kms_calls"],
            "lake_bytes_written": 0 if lake_untouched else None,
            "lake_untouched": lake_untouched,
            "lake_bytes": lake_bytes,
            "third_run_kms_calls": third["kms_calls"],
            "third_run_deks": third["deks_moved"],
        },
        sample={
            "partition": sample_partition,
            "rows": dec["rows_written"],
            "identical_to_source": identical,
            "first_rows": plain.slice(0, 3).to_pylist(),
        },
        status_report=after.get("report"),
        seconds=round(time.monotonic() - started, 2),
        problems=list(after["problems"]) + (
            [] if identical and after["percent_current"] == 100.0 and third["kms_calls"] == 0 and lake_untouched
            else [{"path": None, "partition": None, "reason": "demo_check_failed", "detail": "the demo's own checks failed"}]
        ),
    )
    return dataclasses.replace(report, summary=output.render_text(report))
