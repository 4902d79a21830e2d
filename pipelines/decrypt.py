"""`keyturn decrypt`: an encrypted lake back to plain Parquet, same hive layout.

    keyturn [--home DIR] decrypt --lake PATH --out PATH [--columns a,b] [--side-outputs PATH] [-- beam options]

The pipeline reads every data file of the lake as `(partition, batch)`
(`keyturn.transforms.lakefiles.ReadLakeFiles`), decrypts with `DecryptBatches`, and
writes the readable rows as plain Parquet under `<out>/<partition>/`
(partition columns stay in the path, as in the lake, so
`pyarrow.dataset(out, partitioning="hive")` gives them back).
`--columns` limits which encrypted columns are decrypted; the others are
left out, non-sensitive columns are always kept.

Nothing is dropped silently; the report counts every row:

- `rows_written`: current and stale rows (stale rows are readable: they are
  written *and* reported as `stale`, the cue for `keyturn reencrypt`);
- `retired`, `unknown`, `missing` rows are not written; each group is a
  version-mismatch event in `<side>/mismatch/<run-id>.avro`;
- `corrupt` rows (failed authentication) and lake files that are not
  readable Parquet go to `<side>/quarantine/<run-id>.avro` with their
  original bytes; the lake file stays where it is;
- audit events (with `audit.log_decrypt`) go to `<side>/audit/<run-id>.avro`.

`<side>` is `<out>/_keyturn` by default (a hidden directory: `pyarrow.dataset`,
Spark and `out/**/*.parquet` globs do not take it for data), or the directory
given as `side_outputs` (`--side-outputs PATH`), outside the lake.

A read writes nothing into the lake it reads. The one exception is the
lake lock (`keyturn.lake.lock`), held shared so a rewrite cannot swap files
under the reader: the run adds its entry to `<lake>/_keyturn/lock` and
removes it at the end (the file is created if no keyturn job made it
before; on S3 the lease object is written the same way). A data file that
lacks the key columns is read as it is, so its rows are counted `missing`.

Before anything runs, the lake is checked against the key home from its
footers (`keyturn.lake.inventory.check_fits_home`): plain Parquet keyturn
never wrote is refused (`NotAKeyturnLakeError`), and so is another
dataset's lake whose DEKs the home does not know (`WrongKeyHomeError`),
both exit code 2; a lake none of whose DEKs the home knows (same dataset)
is reported as the `no_known_dek` problem.

`problems` lists what needs a human, as the other lake reports do
(`{"path", "partition", "reason", "detail"}`, plus `rows`): each unreadable
file, each of retired / unknown / missing / corrupt with its row count, and
the lake-level problems of the check above (`path` None). A non-empty list
makes the CLI exit with code 3. `--out` must be absent or empty, and
outside the lake.

`run` returns a `DecryptReport` (`keyturn.reports`) and tells its
``progress`` callback the lake files and rows read as it reads them.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from keyturn.audit.events import utc_now
from keyturn.errors import InputError
from keyturn.lake.inventory import check_fits_home, take_inventory
from keyturn.lake.layout import Lake, is_hidden
from keyturn.lake.sideoutputs import SideOutputDir
from keyturn.policy import KeyPolicy, VersionRules
from keyturn.reports import DecryptReport, ProgressFn, ProgressRelay, say
from keyturn.transforms.lakefiles import ReadLakeFiles, WriteLakeFiles, WriteSideOutput, add_key_columns
from keyturn.home import lake_of
from keyturn.lake.layout import new_run_id
from keyturn.pipelines.runner import pipeline_options
from keyturn.lake.sideoutputs import read_side_outputs
from keyturn.transforms.arrow import DecryptBatches
from keyturn.transforms.tags import QUARANTINE

__all__ = ["run", "check_columns", "SIDE_DIR"]

DEFAULT_BATCH_ROWS = 262_144
Keyed = Tuple[str, pa.RecordBatch]
_PROBLEM_STATUSES = ("retired", "unknown", "missing", "corrupt")
SIDE_DIR = "_keyturn"
"""The side outputs' directory under `--out` when `--side-outputs` is not given."""


def check_columns(contract: Any, columns: Sequence[str]) -> list[str]:
    """`columns` if each is an encrypted column of the dataset contract (the key home's), else `InputError`."""
    if contract is None:
        raise InputError("the dataset has no contract in the key home, so it has no encrypted column to pick")
    for column in columns:
        if column not in contract.names:
            known = ", ".join(contract.names) or "none"
            raise InputError(f"column {column!r} is not an encrypted column of dataset {contract.dataset!r} (encrypted: {known})")
    return list(columns)


def _overlaps(a: Lake, b: Lake) -> bool:
    """True if one of the two trees contains the other (same filesystem kind)."""
    if a.is_local and b.is_local:
        x, y = os.path.realpath(a.root), os.path.realpath(b.root)
    elif not a.is_local and not b.is_local and type(a.fs) is type(b.fs):
        x, y = a.root, b.root
    else:
        return False
    return x == y or x.startswith(y.rstrip("/") + "/") or y.startswith(x.rstrip("/") + "/")


def _check_out(out: str | Lake, lake: Lake, home: Any = None) -> Lake:
    """The output directory as a `Lake` (local or S3); `InputError` if it overlaps the lake, is a file or not empty."""
    target = lake_of(out, home)
    fs, root = target.fs, target.root
    if _overlaps(target, lake):
        where = "directory" if target.is_local else "prefix"
        raise InputError(f"--out {target.uri!r} overlaps the lake; choose a {where} outside it")
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise InputError(f"--out {target.uri!r} is a file; give a directory")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(root)):
        raise InputError(f"--out {target.uri!r} is not empty; decrypt into a new or empty directory")
    return target


def _check_side_outputs(side_outputs: str | Lake | None, out: Lake, lake: Lake, home: Any = None) -> SideOutputDir:
    """Where the run's side outputs go: `<out>/_keyturn/`, or `side_outputs` (outside the lake, hidden if under --out)."""
    if side_outputs is None:
        return SideOutputDir.of(out.sub(out.path(SIDE_DIR), uri=out.uri.rstrip("/") + "/" + SIDE_DIR))
    target = lake_of(side_outputs, home)
    if _overlaps(target, lake):
        raise InputError(f"--side-outputs {target.uri!r} overlaps the lake; a read writes nothing into the lake it reads")
    if _overlaps(target, out):
        inside = target.root[len(out.root.rstrip("/")) + 1 :] if target.root.startswith(out.root.rstrip("/") + "/") else ""
        if not inside or not any(is_hidden(part) for part in inside.split("/")):
            raise InputError(
                f"--side-outputs {target.uri!r} is --out or a visible directory in it, where readers of the output "
                "would take it for data; choose a directory outside --out, or one whose name starts with '_'"
            )
    if target.fs.get_file_info(target.root).type == pafs.FileType.File:
        raise InputError(f"--side-outputs {target.uri!r} is a file; give a directory")
    return SideOutputDir.of(target)


def _with_key_columns(element: Keyed) -> Keyed:
    """`keyturn.transforms.lakefiles.add_key_columns` on a keyed whole-file batch."""
    partition, batch = element
    return partition, add_key_columns(batch)


class _KeyColumns(beam.DoFn):
    """`_with_key_columns` on each whole lake file's batch, counting the file and its rows on `relay`."""

    def __init__(self, relay: ProgressRelay) -> None:
        self.relay = relay

    def process(self, element: Keyed):  # type: ignore[no-untyped-def]
        self.relay.add(files=1, rows=element[1].num_rows)
        yield _with_key_columns(element)


def run(
    *,
    home: Any,
    lake: str | Lake,
    out: str | Lake,
    columns: Sequence[str] | str | None = None,
    partitions: Sequence[str] | None = None,
    side_outputs: str | Lake | None = None,
    beam_args: Sequence[str] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    actor: str = "keyturn",
    reason: str = "keyturn decrypt",
    clock: Callable[[], datetime] = utc_now,
    progress: ProgressFn | None = None,
) -> DecryptReport:
    """Decrypt `lake` into plain Parquet under `out`; returns its report.

    `partitions` (hive paths such as ``"region=3"``) limits the run to those
    partitions, e.g. to decrypt a sample. `side_outputs` is the directory
    for the side outputs (default `<out>/_keyturn`). `home` is a `KeyHome`
    or its path (opened with `clock`); `progress`, if given, hears each
    stage, and the lake files and rows read while decrypting.
    """
    started = time.monotonic()
    from keyturn.pipelines.encrypt import _open_home

    home = _open_home(home, clock)
    if isinstance(columns, str):
        columns = [c for c in columns.split(",") if c]
    the_lake = lake_of(lake, home)
    lake = the_lake.uri
    the_lake.require()
    out_lake = _check_out(out, the_lake, home)
    out, out_fs, out_root = out_lake.uri, out_lake.fs, out_lake.root
    side = _check_side_outputs(side_outputs, out_lake, the_lake, home)
    registry = home.registry()
    contract = registry.get_contract(home.dataset)

    def select(all_files: Sequence[Any]) -> list[Any]:
        if partitions is None:
            return list(all_files)
        wanted = set(partitions)
        missing = sorted(wanted - {f.partition for f in all_files})
        if missing:
            raise InputError(f"no data files in partition(s) {', '.join(missing)} of the lake")
        return [f for f in all_files if f.partition in wanted]

    # footers only, before the lock (which may create its file): is this a keyturn lake this home can read?
    inventory = take_inventory(
        the_lake, KeyPolicy.from_registry(registry), dataset=home.dataset, directory=registry, contract=contract,
        data_files=select(the_lake.data_files()),
    )
    lake_problems = check_fits_home(
        inventory, home=str(getattr(home, "path", home)), dataset=home.dataset, contract=contract, directory=registry
    )
    if columns is not None:
        columns = check_columns(contract, columns)
    run_id = new_run_id()
    with the_lake.lock(exclusive=False, owner=f"decrypt {run_id}"):
        files = [(f.partition, f.path) for f in select(the_lake.data_files())]
        out_fs.create_dir(out_root, recursive=True)
        relay = ProgressRelay(progress, "decrypting", files_total=len(files))
        keys = home.key_source()
        dataset = home.dataset
        lake_uri = the_lake
        # lifecycle.reencryption_strategy lazy: the stale DEKs this run reads are re-wrapped in the directory
        lazy = home.config.lifecycle.reencryption_strategy == "lazy"
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
        whole = read.main | "KeyColumns" >> beam.ParDo(_KeyColumns(relay)).with_output_types(Keyed)
        # which columns are ciphertext is the contract's word, not the files': every batch is read against it
        decrypted = [
            whole
            | "Decrypt" >> DecryptBatches(keys, dataset, columns=columns, actor=actor, reason=reason, rewrap_stale=lazy)
        ]
        written = (
            [d.main for d in decrypted]
            | "Plain" >> beam.Flatten()
            | "Write" >> beam.ParDo(WriteLakeFiles(out_lake, footer_dataset=None))
        )
        # side outputs of a read go under the output (or --side-outputs), never into the lake
        _ = [d.version_mismatch for d in decrypted] | "Mismatch" >> beam.Flatten() | "WriteMismatch" >> WriteSideOutput(side, "mismatch", run_id)
        _ = (
            [d.quarantine for d in decrypted] + [read[QUARANTINE]]
            | "Quarantine" >> beam.Flatten()
            | "WriteQuarantine" >> WriteSideOutput(side, "quarantine", run_id)
        )
        if home.config.audit.log_decrypt:
            _ = [d.audit for d in decrypted] | "Audit" >> beam.Flatten() | "WriteAudit" >> WriteSideOutput(side, "audit", run_id)
        del written
        with relay:
            result = pipeline.run()
            result.wait_until_finish()

    say(progress, "counting")
    rows_written, files_written, per_partition = _count_out(out_fs, out_root)
    mismatch = read_side_outputs(side, "mismatch", run_id=run_id)
    quarantine = read_side_outputs(side, "quarantine", run_id=run_id)
    audit = read_side_outputs(side, "audit", run_id=run_id)
    status = {s: 0 for s in ("current", "stale", "retired", "unknown", "missing", "corrupt")}
    for event in mismatch:
        status[event["reason"]] += int(event["rows"])
    status["corrupt"] = sum(int(q["rows"]) for q in quarantine if q["reason"] == "corrupt")
    status["current"] = rows_written - status["stale"]
    unreadable = [q for q in quarantine if q["reason"] == "unparseable"]
    kms_calls = sum(int(e["counts"].get("unwraps", 0)) for e in audit) if audit else _metric(result, "kms_calls")
    deks_rewrapped = sum(int(e["counts"].get("rewrapped_deks", 0)) for e in audit) if audit else _metric(result, "deks_rewrapped")
    # version_tracking.on_missing_version / on_unknown_version: reject fails the run, once every row is counted
    rejected = VersionRules.from_config(home.config).violation(status, dataset=home.dataset)
    if rejected is not None:
        _remove_plain_output(out_fs, out_root)  # a rejected run leaves no partial plaintext behind (side outputs stay)
        raise rejected
    problems: list[dict[str, Any]] = lake_problems + [
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
    return DecryptReport(
        run_id=run_id,
        dataset=home.dataset,
        lake=lake,
        out=out,
        columns=None if columns is None else list(columns),
        only_partitions=None if partitions is None else sorted(partitions),
        files_read=len(files),
        files_unreadable=len(unreadable),
        unreadable=[q["detail"] for q in unreadable],
        files_written=files_written,
        rows_written=rows_written,
        partitions=per_partition,
        rows_by_status=status,
        rows_not_written=sum(status[s] for s in _PROBLEM_STATUSES),
        mismatch_events=len(mismatch),
        side_outputs=side.uri,
        mismatch_file=side.side_output_path("mismatch", run_id) if mismatch else None,
        quarantined_records=len(quarantine),
        quarantine_file=side.side_output_path("quarantine", run_id) if quarantine else None,
        audit_events=len(audit),
        audit_file=side.side_output_path("audit", run_id) if audit else None,
        kms_calls=kms_calls,
        reencryption_strategy=home.config.lifecycle.reencryption_strategy,
        deks_rewrapped=deks_rewrapped,
        seconds=round(time.monotonic() - started, 3),
        problems=problems,
    )


def _remove_plain_output(fs: pafs.FileSystem, root: str) -> None:
    """Delete the plain data a run wrote under `root`: every entry whose name does not start with ``_`` or ``.``."""
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if is_hidden(info.base_name):
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        else:
            fs.delete_file(info.path)


def _unreadable_path(detail: str) -> str | None:
    """The lake-relative path named by `ReadLakeFiles`' quarantine detail."""
    match = re.match(r"not a readable Parquet file: (.+?) \((\w+)\)", detail)
    return match.group(1) if match else None


def _count_out(fs: pafs.FileSystem, root: str) -> tuple[int, int, dict[str, int]]:
    rows = files = 0
    per_partition: dict[str, int] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        rel = info.path[len(root.rstrip("/")) + 1 :]
        if info.type != pafs.FileType.File or not rel.endswith(".parquet") or any(is_hidden(p) for p in rel.split("/")):
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
