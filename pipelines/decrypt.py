"""`keyturn decrypt`: an encrypted lake back to plain Parquet, same hive layout.

    python -m pipelines.decrypt --home DIR --lake PATH --out PATH [--columns a,b] [-- beam options]

The pipeline reads every data file of the lake as `(partition, batch)`
(`pipelines.lake_io.ReadLakeFiles`), decrypts with `DecryptBatches`, and
writes the readable rows as plain Parquet under `<out>/<partition>/`
(partition columns stay in the path, as in the lake, so
`pyarrow.dataset(out, partitioning="hive")` gives them back).
`--columns` limits which encrypted columns are decrypted; the others are
left out, non-sensitive columns are always kept.

Nothing is dropped silently; the report counts every row:

- `rows_written`: current and stale rows (stale rows are readable: they are
  written *and* reported as `stale`, the cue for `keyturn reencrypt`);
- `retired`, `unknown`, `missing` rows are not written; each group is a
  version-mismatch event in `<lake>/_keyturn/mismatch/<run-id>.avro`;
- `corrupt` rows (failed authentication) and lake files that are not
  readable Parquet go to `<lake>/_keyturn/quarantine/<run-id>.avro` with
  their original bytes; the lake file stays where it is.

`problems` lists what needs a human, as the other lake reports do
(`{"path", "partition", "reason", "detail"}`, plus `rows`): each unreadable
file, and each of retired / unknown / missing / corrupt with its row count.
A non-empty list makes the CLI exit with code 3. The lake is never modified; its
lock is held shared so a rewrite cannot swap files under the reader.
`--out` must be absent or empty, and outside the lake.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from keyturn.errors import InputError
from keyturn.lake.layout import Lake
from pipelines.lake_io import (
    ReadLakeFiles,
    WriteLakeFiles,
    WriteSideOutput,
    lake_of,
    new_run_id,
    pipeline_options,
    side_output_records,
)
from transforms.arrow import DecryptBatches
from transforms.tags import QUARANTINE

__all__ = ["run", "main", "check_columns"]

DEFAULT_BATCH_ROWS = 262_144
Keyed = Tuple[str, pa.RecordBatch]
_PROBLEM_STATUSES = ("retired", "unknown", "missing", "corrupt")


def check_columns(contract: Any, columns: Sequence[str]) -> list[str]:
    """`columns` if each is an encrypted column of the dataset contract (the key home's), else `InputError`."""
    if contract is None:
        raise InputError("the dataset has no contract in the key home, so it has no encrypted column to pick")
    for column in columns:
        if column not in contract.names:
            known = ", ".join(contract.names) or "none"
            raise InputError(f"column {column!r} is not an encrypted column of dataset {contract.dataset!r} (encrypted: {known})")
    return list(columns)


def _check_out(out: str | Lake, lake: Lake, home: Any = None) -> Lake:
    """The output directory as a `Lake` (local or S3); `InputError` if it overlaps the lake, is a file or not empty."""
    target = lake_of(out, home)
    fs, root = target.fs, target.root
    if target.is_local and lake.is_local:
        lake_root = os.path.realpath(lake.root)
        real = os.path.realpath(root)
        if real == lake_root or real.startswith(lake_root + "/") or lake_root.startswith(real + "/"):
            raise InputError(f"--out {target.uri!r} overlaps the lake; choose a directory outside it")
    elif not target.is_local and not lake.is_local and type(target.fs) is type(lake.fs):
        if root == lake.root or root.startswith(lake.root + "/") or lake.root.startswith(root + "/"):
            raise InputError(f"--out {target.uri!r} overlaps the lake; choose a prefix outside it")
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise InputError(f"--out {target.uri!r} is a file; give a directory")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(root)):
        raise InputError(f"--out {target.uri!r} is not empty; decrypt into a new or empty directory")
    return target


def run(
    *,
    home: Any,
    lake: str | Lake,
    out: str | Lake,
    columns: Sequence[str] | str | None = None,
    partitions: Sequence[str] | None = None,
    beam_args: Sequence[str] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    actor: str = "keyturn",
    reason: str = "keyturn decrypt",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Decrypt `lake` into plain Parquet under `out`; returns a JSON-able report.

    `partitions` (hive paths such as ``"region=3"``) limits the run to those
    partitions, e.g. to decrypt a sample.
    """
    started = time.monotonic()
    say = progress or (lambda _msg: None)
    from pipelines.encrypt import _open_home

    home = _open_home(home)
    if isinstance(columns, str):
        columns = [c for c in columns.split(",") if c]
    the_lake = lake_of(lake, home)
    lake = the_lake.uri
    the_lake.require()
    out_lake = _check_out(out, the_lake, home)
    out, out_fs, out_root = out_lake.uri, out_lake.fs, out_lake.root
    contract = home.registry().get_contract(home.dataset)
    if columns is not None:
        columns = check_columns(contract, columns)
    run_id = new_run_id()
    with the_lake.lock(exclusive=False, owner=f"decrypt {run_id}"):
        files = [(f.partition, f.path) for f in the_lake.data_files()]
        if partitions is not None:
            wanted = set(partitions)
            missing = sorted(wanted - {p for p, _ in files})
            if missing:
                raise InputError(f"no data files in partition(s) {', '.join(missing)} of the lake")
            files = [(p, path) for p, path in files if p in wanted]
        out_fs.create_dir(out_root, recursive=True)
        say(f"decrypting {len(files)} file(s)")
        keys = home.key_source()
        dataset = home.dataset
        lake_uri = the_lake
        pipeline = beam.Pipeline(options=pipeline_options(beam_args))
        read = (
            pipeline
            | "Files" >> beam.Create(files)
            | "Spread" >> beam.Reshuffle()
            | "Read"
            >> beam.ParDo(ReadLakeFiles(lake_uri, dataset, batch_rows=batch_rows))
            .with_output_types(Keyed)
            .with_outputs(QUARANTINE, main="main")
        )
        # which columns are ciphertext is the contract's word, not the files': every batch is read against it
        decrypted = [read.main | "Decrypt" >> DecryptBatches(keys, dataset, columns=columns, actor=actor, reason=reason)]
        written = (
            [d.main for d in decrypted]
            | "Plain" >> beam.Flatten()
            | "Write" >> beam.ParDo(WriteLakeFiles(out_lake, footer_dataset=None))
        )
        _ = [d.version_mismatch for d in decrypted] | "Mismatch" >> beam.Flatten() | "WriteMismatch" >> WriteSideOutput(lake_uri, "mismatch", run_id)
        _ = (
            [d.quarantine for d in decrypted] + [read[QUARANTINE]]
            | "Quarantine" >> beam.Flatten()
            | "WriteQuarantine" >> WriteSideOutput(lake_uri, "quarantine", run_id)
        )
        if home.config.audit.log_decrypt:
            _ = [d.audit for d in decrypted] | "Audit" >> beam.Flatten() | "WriteAudit" >> WriteSideOutput(lake_uri, "audit", run_id)
        del written
        result = pipeline.run()
        result.wait_until_finish()

    say("counting")
    rows_written, files_written, per_partition = _count_out(out_fs, out_root)
    mismatch = side_output_records(the_lake, "mismatch", run_id)
    quarantine = side_output_records(the_lake, "quarantine", run_id)
    audit = side_output_records(the_lake, "audit", run_id)
    status = {s: 0 for s in ("current", "stale", "retired", "unknown", "missing", "corrupt")}
    for event in mismatch:
        status[event["reason"]] += int(event["rows"])
    status["corrupt"] = sum(int(q["rows"]) for q in quarantine if q["reason"] == "corrupt")
    status["current"] = rows_written - status["stale"]
    unreadable = [q for q in quarantine if q["reason"] == "unparseable"]
    kms_calls = sum(int(e["counts"].get("unwraps", 0)) for e in audit) if audit else _metric(result, "kms_calls")
    problems: list[dict[str, Any]] = [
        {"path": _unreadable_path(q["detail"]), "partition": q["partition"], "reason": "unreadable", "rows": 0, "detail": q["detail"]}
        for q in unreadable
    ]
    where = {"corrupt": "quarantine", "retired": "mismatch", "unknown": "mismatch", "missing": "mismatch"}
    for s in _PROBLEM_STATUSES:
        if status[s]:
            problems.append({
                "path": None, "partition": None, "reason": s, "rows": status[s],
                "detail": f"{status[s]:,} {s} rows not written; see the {where[s]} side output",
            })
    return {
        "command": "decrypt",
        "run_id": run_id,
        "dataset": home.dataset,
        "lake": lake,
        "out": out,
        "columns": None if columns is None else list(columns),
        "only_partitions": None if partitions is None else sorted(partitions),
        "files_read": len(files),
        "files_unreadable": len(unreadable),
        "unreadable": [q["detail"] for q in unreadable],
        "files_written": files_written,
        "rows_written": rows_written,
        "partitions": per_partition,
        "rows_by_status": status,
        "rows_not_written": sum(status[s] for s in _PROBLEM_STATUSES),
        "mismatch_events": len(mismatch),
        "mismatch_file": the_lake.side_output_path("mismatch", run_id) if mismatch else None,
        "quarantined_records": len(quarantine),
        "quarantine_file": the_lake.side_output_path("quarantine", run_id) if quarantine else None,
        "audit_events": len(audit),
        "kms_calls": kms_calls,
        "seconds": round(time.monotonic() - started, 3),
        "problems": problems,
    }


def _unreadable_path(detail: str) -> str | None:
    """The lake-relative path named by `ReadLakeFiles`' quarantine detail."""
    match = re.match(r"not a readable Parquet file: (.+?) \((\w+)\)", detail)
    return match.group(1) if match else None


def _count_out(fs: pafs.FileSystem, root: str) -> tuple[int, int, dict[str, int]]:
    rows = files = 0
    per_partition: dict[str, int] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        rel = info.path[len(root.rstrip("/")) + 1 :]
        if info.type != pafs.FileType.File or any(p.startswith((".", "_")) for p in rel.split("/")):
            continue
        with fs.open_input_file(info.path) as f:
            n = pq.ParquetFile(f).metadata.num_rows
        rows += n
        files += 1
        partition = rel.rsplit("/", 1)[0] if "/" in rel else ""
        per_partition[partition] = per_partition.get(partition, 0) + n
    return rows, files, dict(sorted(per_partition.items()))


def _metric(result: Any, name: str) -> int | None:
    try:
        from apache_beam.metrics.metric import MetricsFilter

        counters = result.metrics().query(MetricsFilter().with_name(name))["counters"]
        return int(sum(c.committed or 0 for c in counters))
    except Exception:  # noqa: BLE001 - a runner without metrics: the report says "unknown"
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.decrypt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default=None, help="key home (default: $KEYTURN_HOME or ./.keyturn)")
    parser.add_argument("--lake", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--columns", default=None, help="comma-separated encrypted columns to decrypt (default: all)")
    args, beam_args = parser.parse_known_args(argv)
    from pipelines.home import default_home

    report = run(
        home=args.home or default_home(),
        lake=args.lake,
        out=args.out,
        columns=args.columns,
        beam_args=[a for a in beam_args if a != "--"],
    )
    print(json.dumps(report, indent=2, sort_keys=True))
    return 3 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
