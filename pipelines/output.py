"""The CLI's one output layer: a `keyturn.reports.Report` as text or JSON, and progress on a terminal.

`emit(report, as_json=...)` is the one place that decides: with ``--json``
the report's JSON form (`Report.to_json`) as one JSON object on stdout,
else `render_text(report)`, the verb's account in a few lines.
`write_json(obj)` writes any JSON-able mapping the same way (the CLI's
error object uses it).

`progress_display(enabled)` yields the ``progress`` callback a job is
given: None when `enabled` is false (stderr is not a terminal, or
``--json``), so nothing is printed; else a `ProgressDisplay`, which shows
each `keyturn.reports.Progress` as a rich progress bar on stderr (stage,
files done of total, rows done, rows per second, time left). Only this
module touches rich.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import date, datetime
from typing import Any, TextIO

from keyturn import reports

__all__ = ["emit", "render_text", "write_json", "progress_display", "ProgressDisplay"]


# --------------------------------------------------------------------------- JSON


def _json_default(value: Any) -> Any:
    if isinstance(value, reports.Report):
        return value.to_json()
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "value") and isinstance(getattr(value, "value"), (str, int)):  # enums
        return value.value
    return str(value)


def write_json(obj: Mapping[str, Any], stream: TextIO | None = None) -> None:
    """`obj` as one indented JSON object with sorted keys, and a newline."""
    out = stream or sys.stdout
    data = obj.to_json() if isinstance(obj, reports.Report) else obj
    out.write(json.dumps(data, sort_keys=True, indent=2, default=_json_default) + "\n")
    out.flush()


def emit(report: reports.Report, *, as_json: bool, stream: TextIO | None = None) -> None:
    """Write `report` to `stream` (default stdout): its JSON form with `as_json`, else its text."""
    if as_json:
        write_json(report, stream)
        return
    out = stream or sys.stdout
    out.write(render_text(report).rstrip("\n") + "\n")
    out.flush()


# --------------------------------------------------------------------------- text


def render_text(report: reports.Report) -> str:
    """`report` as the lines a person reads (one renderer per report type)."""
    for cls in type(report).__mro__:
        render = _RENDERERS.get(cls)
        if render is not None:
            return render(report)
    raise TypeError(f"no text rendering for {type(report).__name__}")


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


def _problem_lines(problems: Any, limit: int = 20) -> list[str]:
    if not isinstance(problems, list) or not problems:
        return []
    lines = [f"Problems ({len(problems)}):"]
    for p in problems[:limit]:
        if isinstance(p, Mapping):
            lines.append(f"  {p.get('path') or 'lake'}: {p.get('reason')}: {p.get('detail') or ''}".rstrip())
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more (see --json)")
    return lines


def _job_text(headline: str, *details: str | None, problems: Any) -> str:
    """A job's headline, its details that are not None, then its problems: one per line."""
    return "\n".join([headline, *(d for d in details if d is not None), *_problem_lines(problems)])


def _encrypt(r: reports.EncryptReport) -> str:
    skipped = f"  Skipped {len(r.partitions_skipped)} partitions already in the lake ({r.rows_skipped:,} source rows)."
    return _job_text(
        f"Encrypted {r.rows_written:,} rows into {r.files_written:,} files in "
        f"{len(r.partitions_written)} partitions of {r.lake} (columns: {', '.join(r.columns)}), "
        f"with {r.kms_calls:,} KMS calls.",
        skipped if r.partitions_skipped else None,
        f"  Audit events: {r.audit_file}" if r.audit_file else None,
        problems=r.problems,
    )


def _decrypt(r: reports.DecryptReport) -> str:
    kms = f"{r.kms_calls:,}" if r.kms_calls is not None else "an unknown number of"
    lines = [
        f"Decrypted {r.rows_written:,} rows from {r.files_read:,} lake files into "
        f"{r.out} ({r.files_written:,} plain Parquet files), with {kms} KMS calls."
    ]
    if r.rows_not_written:
        lines.append(f"  {r.rows_not_written:,} rows were not written (see the side outputs).")
    for path, label in ((r.mismatch_file, "version mismatches"), (r.quarantine_file, "quarantined records")):
        if path:
            lines.append(f"  {label}: {path}")
    lines += _problem_lines(r.problems)
    lines += [  # lake-level problems (a home that knows none of the lake's DEKs...): the summary alone hides them
        f"  lake: {p['reason']}: {p['detail']}" for p in r.problems
        if p.get("path") is None and p.get("reason") not in ("retired", "unknown", "missing", "corrupt")
    ]
    if r.rows_not_written or r.files_unreadable:
        lines.append(f"  Side outputs: {r.side_outputs}")
    return "\n".join(lines)


def _ingest(r: reports.IngestReport) -> str:
    quarantined = [f"  {r.files_quarantined:,} files were quarantined (unreadable or missing a column):"]
    quarantined += [f"    {path}" for path in r.quarantined[:20]]
    return _job_text(
        f"Ingested {r.files_ingested:,} files from {r.watch} in {r.batches:,} batches: "
        f"{r.rows_written:,} rows appended to {r.lake} as {r.files_written:,} files, "
        f"with {r.kms_calls:,} KMS calls ({r.stopped or 'stopped'} after {r.seconds} s).",
        *(quarantined if r.files_quarantined else ()),
        problems=r.problems,
    )


def _reencrypt(r: reports.ReencryptReport) -> str:
    inv = r.inventory or r.inventory_before or {}
    plan = r.plan
    lines = [f"lake {r.lake} (dataset {r.dataset}), active key version {r.active_version}"]
    if r.dry_run:
        lines.append(
            f"dry run: would rewrite {plan.get('files', 0)} files ({plan.get('stale_rows', 0):,} stale rows) "
            f"in {len(plan.get('partitions', {}))} partitions ({r.mode}); nothing was changed"
        )
    else:
        lines.append(
            f"rewrote {r.files_rewritten} files ({r.rows_moved or 0:,} rows moved, "
            f"{r.bytes_rewritten or 0:,} bytes written) with {r.kms_calls} KMS calls ({r.mode})"
        )
    lines.append(
        f"{inv.get('current_fraction', 1.0):.1%} of {inv.get('rows', 0):,} rows on the active version; "
        f"{inv.get('stale_files', 0)} files still stale"
    )
    for p in r.problems:
        lines.append(f"problem: {p.get('path') or 'lake'}: {p['reason']}: {p.get('detail') or ''}")
    return "\n".join(lines)


def _n(value: int) -> str:
    return f"{value:,}"


def _status(r: reports.StatusReport) -> str:
    lines = [
        f"Lake {r.lake} (dataset {r.dataset!r}): {_n(r.rows)} rows in {_n(r.files)} files, {r.partition_count} partitions.",
        f"Active key version {r.active_version}: {r.percent_current:.1f}% of rows are on it.",
        "  rows:  " + ", ".join(f"{s} {_n(r.status_rows[s])}" for s in reports.STATUSES),
        f"  files: {_n(r.current_files)} current, {_n(r.stale_files)} with stale rows, "
        f"{_n(r.status_files['unreadable'])} unreadable",
    ]
    if r.versions:
        lines.append("Key versions:")
        for v, info in r.versions.items():
            lines.append(f"  v{v:<4} {info['state']:<17} {_n(info['rows']):>14} rows {_n(info['files']):>8} files")
    parts = r.partitions
    if parts:
        vs = list(r.versions)
        width = max(9, *(len(p) for p in parts))
        header = f"  {'partition':<{width}} {'files':>7} {'rows':>12} " + " ".join(f"{'v' + v:>12}" for v in vs)
        lines.append("Partitions (rows per key version):")
        lines.append(header + f" {'current':>8}")
        for name, p in parts.items():
            per_version = " ".join(f"{_n(p['rows_by_version'].get(v, 0)):>12}" for v in vs)
            lines.append(
                f"  {name or '(root)':<{width}} {_n(p['files']):>7} {_n(p['rows']):>12} {per_version} "
                f"{p['percent_current']:>7.1f}%"
            )
    lines += _problem_lines(r.problems, limit=50)
    if r.report:
        lines.append(f"HTML report written to {r.report}")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _demo(r: reports.DemoReport) -> str:
    s = r.steps
    enc, rw, pct, sample = r.encrypt, r.rewrap, r.percent_current, r.sample
    cols = ", ".join(r.sensitive_columns)
    lines = [
        f"keyturn demo: {r.rows:,} synthetic customers with PII ({cols}) in {r.partitions} partitions, under {r.out}",
        "1. init: a local key home (keystore file, SQLite key registry, audit log); key version 1 is active.",
        f"2. encrypt: {enc['rows']:,} rows became {enc['files']} encrypted Parquet files ({_mb(enc['bytes'])}) in "
        f"{s['encrypt']['seconds']} s, with {enc['kms_calls']} KMS calls: one data key per partition, not per row.",
        f"3. status: {pct['after_encrypt']:.0f}% of rows are on the current key version.",
        f"4. rotate: version {s['rotate']['version']} is now active and version 1 decrypt-only. "
        f"No data was touched, so {pct['after_rotate']:.0f}% of rows are current and all of it still reads.",
        f"5. rewrap (batch-lazy, in the key home): a first run limited to {s['rewrap_1']['deks_moved']} of {rw['deks']} data keys "
        f"brought the lake to {pct['after_first_rewrap']:.0f}% current; a second run finished it: "
        f"{pct['after_second_rewrap']:.0f}% current.",
        f"   Both runs re-wrapped {rw['deks_moved']:,} wrapped data keys in the key registry's DEK directory with "
        f"{rw['kms_calls']} KMS calls (one per data key, none per row) in "
        f"{s['rewrap_1']['seconds'] + s['rewrap_2']['seconds']:.2f} s. "
        + (f"Lake bytes written: 0 (every file of the {_mb(rw['lake_bytes'])} lake is byte-identical, same mtime)."
           if rw["lake_untouched"] else "The lake CHANGED, which a rewrap must never do!"),
        f"   A third run found nothing to do: {rw['third_run_deks']} data keys moved, {rw['third_run_kms_calls']} KMS calls.",
        "   Retiring version 1 was then allowed: the directory holds no data key under it, whatever the lake files say.",
        f"6. decrypt: partition {sample['partition']} ({sample['rows']:,} rows) decrypted "
        + ("and is identical to the source." if sample["identical_to_source"] else "but DIFFERS from the source!"),
    ]
    for row in sample["first_rows"]:
        shown = {k: row[k] for k in ("customer_id", "email", "ssn", "phone") if k in row}
        lines.append(f"   {shown}")
    if r.status_report:
        lines.append(f"HTML status report: {r.status_report}")
    lines.append(f"Done in {r.seconds:.1f} s.")
    return "\n".join(lines)


def _init(r: reports.InitReport) -> str:
    if r.provider == "aws_kms":
        where = f"DynamoDB table {r.registry_table}" if r.registry == "dynamodb" else "registry.sqlite"
        return (
            f"Created key home {r.home} on AWS KMS\n"
            f"  dataset {r.dataset!r}; key version {r.active_version} is active (KMS key {r.kek_id}); "
            f"registry in {where}.\n"
            f"  No key material is stored in the home; audit.log keeps the control-plane events"
            + (f" (also sent to CloudWatch Logs {r.log_group})." if r.audit_sink == "cloudwatch" else ".")
        )
    return (
        f"Created key home {r.home}\n"
        f"  dataset {r.dataset!r}; key version {r.active_version} is active (KEK {r.kek_id}).\n"
        f"  The keystore is a local single-node file; keep root.key (mode 0600) secret and backed up."
    )


def _rewrap(r: reports.RewrapReport) -> str:
    left = sum(r.remaining.values())
    text = (
        f"Re-wrapped {r.deks_moved:,} DEK(s) onto key version {r.active_version} with {r.kms_calls} KMS "
        f"call(s); 0 lake bytes written. "
    )
    text += "Every DEK is on the active version." if r.complete else f"{left:,} DEK(s) still on older versions."
    if r.deks_failed:
        text += f" {len(r.deks_failed)} DEK(s) could not be re-wrapped (their envelopes did not authenticate)."
    return text


def _rotate(r: reports.RotateReport) -> str:
    text = (
        f"Rotated: key version {r.version_to} (KEK {r.kek_id}) is now active; "
        f"version {r.version_from} is decrypt-only.\n"
    )
    if r.rewrap is None and r.reencryption_strategy == "lazy":
        text += (
            f"  Existing data is untouched; readers re-wrap the DEKs they read onto version {r.version_to} "
            "(lifecycle.reencryption_strategy: lazy); `keyturn rewrap` moves the rest at once."
        )
    elif r.rewrap is None:
        text += f"  Existing data is untouched; run `keyturn rewrap` to move its DEKs onto version {r.version_to}."
    else:
        text += "  " + _rewrap(r.rewrap)
    return text


def _not_due(r: reports.RotationNotDueReport) -> str:
    due = r.next_due
    when = f"{due:%Y-%m-%d %H:%M}" if isinstance(due, datetime) else str(due)
    return (
        f"Rotation not due: key version {r.active_version} is active until {when} UTC "
        f"(every {r.rotation_interval_days} days). Nothing changed."
    )


def _directory(r: reports.DirectoryReport) -> str:
    lines = [f"DEK directory: {sum(r.deks_by_version.values()):,} DEK(s)."]
    lines += [f"  version {v} ({r.states.get(v, 'unknown')}): {n:,} DEK(s)" for v, n in r.deks_by_version.items()]
    return "\n".join(lines)


def _rebuild(r: reports.RebuildReport) -> str:
    text = (
        f"Directory rebuild of {r.lake}: {r.deks_in_lake:,} DEK(s) in {r.files} file(s), "
        f"{r.deks_already_known:,} already known, {r.deks_registered:,} registered."
    )
    return text + "".join("\n" + _one_line(f"problem: {p['reason']}: {p.get('detail', '')}") for p in r.problems[:20])


def _contract(r: reports.ContractReport) -> str:
    if r.added_column is not None and r.contract is not None:
        return (
            f"Dataset {r.dataset!r}: column {r.added_column!r} is encrypted from contract revision "
            f"{r.contract['revision']} on. "
            f"Rows under DEKs made before it read the column as null (clear values stored there are never returned)."
        )
    if r.contract is None:
        return f"Dataset {r.dataset!r} has no contract yet: its first write pins one."
    return r.described or f"dataset {r.dataset!r}, revision {r.contract.get('revision')}"


def _retire(r: reports.RetireReport) -> str:
    checked = f" and in {len(r.lakes)} lake(s)" if r.lakes else ""
    return (
        f"Retired key version {r.version}: no DEK of the directory is wrapped under it{checked}; "
        f"policy now refuses to decrypt with it."
    )


def _schedule_deletion(r: reports.ScheduleDeletionReport) -> str:
    return (
        f"Key version {r.version} is pending deletion after {r.delete_after} "
        f"({r.pending_days} days); `keyturn` never destroys key material before then."
    )


def _audit(r: reports.AuditReport) -> str:
    text = f"Audit log OK: {r.entries} entries, hash chain intact (head {r.head or '-'})"
    if r.anchor is None:
        text += (f"; {r.anchored_in} holds no anchor for it yet (a home from before anchors), so a deleted tail "
                 "cannot be detected until the next control-plane change anchors the log.")
    else:
        text += f"; it reaches the entry anchored in {r.anchored_in} (seq {r.anchor['seq']})"
        later = r.unanchored_entries
        text += (f", and {later} later entr{'y is' if later == 1 else 'ies are'} not anchored." if later else ".")
    return text


_RENDERERS: dict[type, Callable[[Any], str]] = {
    reports.EncryptReport: _encrypt,
    reports.DecryptReport: _decrypt,
    reports.IngestReport: _ingest,
    reports.ReencryptReport: _reencrypt,
    reports.StatusReport: _status,
    reports.DemoReport: _demo,
    reports.InitReport: _init,
    reports.RewrapReport: _rewrap,
    reports.RotateReport: _rotate,
    reports.RotationNotDueReport: _not_due,
    reports.DirectoryReport: _directory,
    reports.RebuildReport: _rebuild,
    reports.ContractReport: _contract,
    reports.RetireReport: _retire,
    reports.ScheduleDeletionReport: _schedule_deletion,
    reports.AuditReport: _audit,
}


# --------------------------------------------------------------------------- progress


class ProgressDisplay:
    """A `progress` callback that draws rich progress bars on a console: one bar per stage.

    Columns: the stage, a bar (pulsing while the stage's file total is
    unknown), files done (of the total), rows done, rows per second, time
    left (from the files' rate). A stage that ends stays on screen, filled,
    with its final counts; `placeholder` is the first bar's text until the
    job names its first stage. Use it as a context manager; rich redraws a
    few times a second, so a callback per file is cheap.
    """

    def __init__(self, console: Any = None, placeholder: str = "") -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

        self.console = console or Console(stderr=True)
        self._bars = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[files]}"),
            TextColumn("{task.fields[rows]}"),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._stage: str | None = None
        self._task: Any = None
        self._last: reports.Progress | None = None
        self._started = 0.0
        if placeholder:
            self._task = self._bars.add_task(placeholder, total=None, files="", rows="", rate="")

    def __enter__(self) -> ProgressDisplay:
        self._bars.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bars.stop()

    def __call__(self, event: reports.Progress) -> None:
        if event.stage != self._stage:
            self._new_stage(event.stage)
        elapsed = max(time.monotonic() - self._started, 1e-6)
        total = event.files_total
        self._bars.update(
            self._task,
            completed=event.files_done,
            total=total,
            files=f"{event.files_done:,}/{total:,} files" if total is not None else f"{event.files_done:,} files",
            rows=f"{event.rows_done:,} rows",
            rate=f"{event.rows_done / elapsed:,.0f} rows/s" if event.rows_done else "",
        )
        self._last = event

    def _new_stage(self, stage: str) -> None:
        if self._stage is None and self._task is not None:  # the placeholder becomes the first stage
            self._bars.update(self._task, description=stage)
        else:
            if self._task is not None and self._last is not None:  # the stage that ended: shown filled
                done = max(self._last.files_done, 1)
                self._bars.update(self._task, total=done, completed=done)
            self._task = self._bars.add_task(stage, total=None, files="", rows="", rate="")
        self._stage = stage
        self._started = time.monotonic()


@contextlib.contextmanager
def progress_display(enabled: bool, label: str = "", *, console: Any = None) -> Iterator[ProgressDisplay | None]:
    """The `progress` callback for a run: a `ProgressDisplay` showing `label` first, or None when not `enabled`."""
    if not enabled:
        yield None
        return
    with ProgressDisplay(console, placeholder=label) as display:
        yield display
