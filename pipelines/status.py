"""``keyturn status``: how far a lake is on its way to the current key version.

    keyturn [--home DIR] [--json] status --lake PATH [--report FILE.html]

`run(home=..., lake=...)` takes the lake's inventory (`keyturn.lake.
take_inventory`: Parquet footers only, no data pages) under the home's key
policy and returns a `StatusReport` (`keyturn.reports`), whose JSON form is:

- ``rows``, ``files``, ``active_version``, ``percent_current`` (rows on the
  active version, 100 for an empty lake);
- ``status_rows``: rows per read status (current, stale, retired, unknown,
  missing); ``status_files``: files holding any row of each status, plus
  ``unreadable`` files;
- ``versions``: rows and files per key version, with the registry state;
- ``partitions``: the same per partition (``rows_by_version``,
  ``files_by_version``, ``status_rows``, ``percent_current``);
- ``problems``: files needing a human (unreadable, another dataset,
  retired/unknown/missing rows), and lake-level ones (``path`` None):
  ``no_known_dek`` when the key home's directory knows none of the lake's
  DEKs (a wrong home of the same dataset, or a lost directory), and
  ``no_keyturn_files`` when no file shows a sign of keyturn although the
  home has a contract. Stale rows are not a problem, they are the work
  `keyturn reencrypt` does. When this list is non-empty the CLI exits 3.

Before any counting, a directory of plain Parquet that keyturn never wrote
(and that the home knows nothing of) is refused with
`NotAKeyturnLakeError`, and a lake of another dataset whose DEKs the home
does not know with `WrongKeyHomeError`: one line each, exit code 2 (see
`keyturn.lake.inventory.check_fits_home`).

`write_html(report, path)` writes a self-contained HTML page (inline CSS and
an inline SVG stacked bar per partition; no script, no network asset); it is
the report's one HTML renderer. Its text rendering is the CLI's, in
`keyturn.pipelines.output`.
"""

from __future__ import annotations

import html
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from keyturn.policy import KeyPolicy
from keyturn.reports import STATUSES, ProgressFn, StatusReport, say
from keyturn.lake import Lake, take_inventory
from keyturn.lake.inventory import check_fits_home
from keyturn.home import lake_of

__all__ = ["run", "render_html", "write_html", "STATUSES", "MAX_CHART_PARTITIONS"]

MAX_CHART_PARTITIONS = 200
"""The HTML chart shows at most this many partitions: those furthest behind."""

_COLOURS = {
    "current": "#2e7d32",
    "stale": "#f9a825",
    "retired": "#c62828",
    "unknown": "#6a1b9a",
    "missing": "#757575",
    "corrupt": "#000000",
}


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2) if whole else 100.0


def run(
    *,
    home: Any,
    lake: str | Lake,
    report_path: str | None = None,
    clock: Callable[[], datetime] | None = None,
    progress: ProgressFn | None = None,
    beam_args: Sequence[str] | None = None,
) -> StatusReport:
    """Inventory `lake` under `home`'s key policy; optionally write the HTML report. Reads footers only.

    It writes nothing else and takes no actor; `progress`, if given, hears its one stage.
    """
    if beam_args:
        raise ValueError("status runs no Beam pipeline; it takes no Beam options")
    say(progress, "reading lake footers")
    the_lake = lake_of(lake, home)
    lake = the_lake.uri
    the_lake.require()
    registry = home.registry()
    policy = KeyPolicy.from_registry(registry)
    # rows counted under the key version that wraps their DEK now (the directory's), not the files' birth versions
    contract = registry.get_contract(home.dataset)
    inventory = take_inventory(the_lake, policy, dataset=home.dataset, directory=registry, contract=contract)
    # plain Parquet keyturn never wrote, or another dataset's key home: one clear error, not "100% missing/unknown"
    lake_problems = check_fits_home(
        inventory, home=str(getattr(home, "path", home)), dataset=home.dataset, contract=contract, directory=registry
    )
    now = (clock or (lambda: datetime.now(timezone.utc)))()

    status_files = {s: 0 for s in STATUSES}
    for f in inventory.files:
        for s, n in f.status_rows(policy).items():
            if s in status_files and n:
                status_files[s] += 1
    status_files["unreadable"] = len(inventory.unreadable())

    files_by_version: dict[int, int] = {}
    for f in inventory.files:
        for v, n in f.versions.items():
            if n:
                files_by_version[v] = files_by_version.get(v, 0) + 1
    versions: dict[str, dict[str, Any]] = {}
    rows_by_version = inventory.versions()
    for v in sorted(set(policy.states) | set(rows_by_version)):
        state = policy.states.get(v)
        versions[str(v)] = {
            "state": state.value if state is not None else "unknown",
            "rows": rows_by_version.get(v, 0),
            "files": files_by_version.get(v, 0),
        }

    partitions = {}
    for name, p in inventory.by_partition().items():
        p = dict(p)
        p["percent_current"] = _percent(p["status_rows"]["current"], p["rows"])
        partitions[name] = p

    totals = inventory.totals()
    status_rows = {s: totals["status_rows"].get(s, 0) for s in STATUSES}
    report = StatusReport(
        lake=the_lake.uri,
        dataset=home.dataset,
        taken_at=now.astimezone(timezone.utc).isoformat(),
        active_version=policy.active.version,
        rows=totals["rows"],
        files=totals["files"],
        partition_count=len(partitions),
        percent_current=_percent(status_rows["current"], totals["rows"]),
        status_rows=status_rows,
        status_files=status_files,
        stale_files=totals["stale_files"],
        current_files=totals["current_files"],
        versions=versions,
        partitions=partitions,
        problems=lake_problems + inventory.problems(),
        directory={str(v): n for v, n in registry.deks_by_version().items()},
        contract=_contract_summary(contract),
        report=None if report_path is None else os.path.abspath(report_path),
    )
    if report_path is not None:
        write_html(report, report_path)
    return report


def _contract_summary(contract: Any) -> dict[str, Any] | None:
    if contract is None:
        return None
    return {
        "revision": contract.revision,
        "codec": contract.codec,
        "columns": {c.name: c.type_descriptor for c in contract.columns},
        "bind": list(contract.bind),
        "partition_by": None if contract.partition_by is None else list(contract.partition_by),
    }


# --------------------------------------------------------------------------- HTML


def _bar(y: int, label: str, counts: Mapping[str, int], total: int, *, x0: int, width: int, title: str) -> list[str]:
    e = html.escape
    out = [f'<text x="{x0 - 8}" y="{y + 15}" text-anchor="end" class="lbl">{e(label)}</text>']
    x = float(x0)
    if total == 0:
        out.append(f'<rect x="{x0}" y="{y}" width="{width}" height="20" fill="#eeeeee"><title>{e(title)}: empty</title></rect>')
    for status in STATUSES:
        n = counts.get(status, 0)
        if not n:
            continue
        w = width * n / total
        out.append(
            f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="20" fill="{_COLOURS[status]}">'
            f"<title>{e(title)}: {e(status)} {n:,} rows ({100 * n / total:.1f}%)</title></rect>"
        )
        x += w
    pct = _percent(counts.get("current", 0), total)
    out.append(f'<text x="{x0 + width + 8}" y="{y + 15}" class="pct">{pct:.1f}%</text>')
    return out


def _svg(report: Mapping[str, Any]) -> str:
    parts = list(report["partitions"].items())
    shown = sorted(parts, key=lambda kv: (kv[1]["percent_current"], kv[0]))[:MAX_CHART_PARTITIONS]
    shown.sort(key=lambda kv: kv[0])
    label_chars = max([len("whole lake")] + [len(name or "(root)") for name, _ in shown])
    x0 = min(20 + 7 * label_chars, 320)
    width = 600
    rows = 1 + len(shown)
    height = 40 + 28 * rows + 30
    body = _bar(10, "whole lake", report["status_rows"], report["rows"], x0=x0, width=width, title="whole lake")
    for i, (name, p) in enumerate(shown):
        body += _bar(48 + 28 * i, name or "(root)", p["status_rows"], p["rows"], x0=x0, width=width, title=name or "(root)")
    legend_y = height - 18
    x = x0
    for status in STATUSES:
        body.append(f'<rect x="{x}" y="{legend_y}" width="12" height="12" fill="{_COLOURS[status]}"/>')
        body.append(f'<text x="{x + 16}" y="{legend_y + 11}" class="lbl">{status}</text>')
        x += 100
    total_width = x0 + width + 70
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_width}" height="{height}" '
        f'viewBox="0 0 {total_width} {height}" role="img" aria-label="rotation progress per partition">'
        + "".join(body)
        + "</svg>"
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page (no script, no external asset)."""
    e = html.escape
    vs = list(report["versions"])
    shown = len(report["partitions"])
    note = ""
    if shown > MAX_CHART_PARTITIONS:
        note = f"<p>The chart shows the {MAX_CHART_PARTITIONS} partitions furthest behind, of {shown}.</p>"
    version_rows = [(f"v{v}", i["state"], f"{i['rows']:,}", f"{i['files']:,}") for v, i in report["versions"].items()]
    partition_rows = [
        (name or "(root)", f"{p['files']:,}", f"{p['rows']:,}", *(f"{p['rows_by_version'].get(v, 0):,}" for v in vs),
         f"{p['percent_current']:.1f}%")
        for name, p in report["partitions"].items()
    ]
    problem_rows = [(p["path"] or "(whole lake)", p["reason"], p.get("detail") or "") for p in report["problems"]]
    sr = report["status_rows"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>keyturn status: {e(str(report['lake']))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.lbl {{ font: 12px monospace; fill: #222; }}
.pct {{ font: 12px sans-serif; fill: #222; }}
</style></head><body>
<h1>keyturn status</h1>
<p>Lake <code>{e(str(report['lake']))}</code>, dataset <code>{e(str(report['dataset']))}</code>,
taken {e(str(report['taken_at']))}.</p>
<p><strong>{report['percent_current']:.1f}%</strong> of {report['rows']:,} rows are on the active key
version {report['active_version']}. Rows: {', '.join(f"{s} {sr[s]:,}" for s in STATUSES)}.
Files: {report['files']:,} ({report['current_files']:,} current, {report['stale_files']:,} with stale rows,
{report['status_files']['unreadable']:,} unreadable).</p>
<h2>Rotation progress per partition</h2>
{note}{_svg(report)}
<h2>Key versions</h2>
{_table(("version", "state", "rows", "files"), version_rows)}
<h2>Partitions</h2>
{_table(("partition", "files", "rows", *(f"rows v{v}" for v in vs), "current"), partition_rows)}
<h2>Problems ({len(problem_rows)})</h2>
{_table(("file", "reason", "detail"), problem_rows) if problem_rows else "<p>None.</p>"}
</body></html>
"""


def write_html(report: Mapping[str, Any], path: str | os.PathLike[str]) -> str:
    """Write `render_html(report)` to `path` atomically; return the absolute path."""
    target = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write the report: directory {directory!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".keyturn-report-", suffix=".html")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(render_html(report))
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target
