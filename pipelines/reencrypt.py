"""`keyturn reencrypt`: the batch-lazy job that brings a lake onto the active key version.

    keyturn [--home DIR] [--json] reencrypt --lake PATH [--mode rewrap|reencrypt|auto]
                                            [--dry-run] [--max-files N] [-- BEAM OPTIONS]

What one run does:

1. takes the lake lock exclusively (a second run fails at once with
   `LakeLockedError`), removes ``.keyturn-tmp-*`` leftovers of crashed runs
   (never data: the file they were to replace is intact until the rename)
   and merges leftover side-output parts;
2. takes the inventory on the driver from file footers only
   (`keyturn.lake.take_inventory`): files already on the active version are
   skipped without reading their data;
3. plans the files with stale rows, partition by partition (at most
   ``--max-files`` of them), and runs a Beam pipeline: one element per
   partition, `RewritePartitionFn` rewrites that partition's files through
   `keyturn.lake.rewrite.rewrite_file` (read by row group, rewrap or
   re-encrypt, write a temp file, verify, atomic rename over the original);
   each file's audit event and quarantine records go to
   ``_keyturn/<kind>/<run-id>.part-<token>.avro`` as soon as the file is
   swapped, then are merged into ``<run-id>.avro``;
4. takes the inventory again and writes a version-mismatch event for every
   non-current group of rows that remains (stale beyond ``--max-files``,
   retired, unknown, missing) to ``_keyturn/mismatch/<run-id>.avro``.

A second run of a finished job finds no stale file, starts no pipeline and
makes no KMS call. ``--dry-run`` stops after the plan and changes nothing
(not even the lock file). `run` returns a `ReencryptReport`
(`keyturn.reports`) and tells its ``progress`` callback each stage, and the
files rewritten and rows moved as the partitions are done.

Concurrency: each partition element rewrites its files in a thread pool of
``lifecycle.max_concurrent_reencryption_workers`` threads (override with
``workers=``). Partitions are processed one after another on the default
DirectRunner, so that is the bound on files in flight and on concurrent KMS
users. (Unlike encrypt, a large reencrypt stays in process by default: a
worker process per core would multiply the files in flight, the memory
they hold and the concurrent KMS users; pass ``--direct_num_workers`` and
``--direct_running_mode=multi_processing`` to choose that.) On a distributed runner each worker processing a partition uses its
own pool: the bound is per worker, so size the runner's worker count (e.g.
``--max_num_workers``) with the KMS request budget in mind. A thread pool
inside the DoFn (rather than runner parallelism) keeps the bound identical
on every runner and needs no runner-specific options. KMS calls are also
held under ``lifecycle.max_kms_requests_per_second`` per process, by the
key source's one token bucket (`keyturn.kms.decorators`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from keyturn.audit.events import build_mismatch, utc_now
from keyturn.config import KeyturnConfig, default_config
from keyturn.errors import KmsError, KmsUnavailableError
from keyturn.keysource import KeySource
from keyturn.lake import DataFile, Lake, as_lake, crashpoint, take_inventory
from keyturn.lake.layout import new_run_id
from keyturn.lake.inventory import Inventory
from keyturn.lake.rewrite import rewrite_file
from keyturn.lake.sideoutputs import SCHEMA_OF, compact_parts, part_name, read_side_outputs, write_side_output
from keyturn.policy import KeyPolicy, ReadStatus
from keyturn.reports import ProgressFn, ProgressRelay, ReencryptReport, say
from keyturn.scope import ScopeLimits
from keyturn.pipelines.runner import pipeline_options

__all__ = ["run", "RewritePartitionFn", "plan_rewrites"]

ACTOR = "keyturn reencrypt"
JOB_MODES = ("reencrypt", "rewrap", "auto")
"""``reencrypt``: fresh DEKs for files whose DEKs are stale or older than
``dek_max_age_days``; ``rewrap``: an alias of `keyturn rewrap` (the directory
only, no lake byte changes); ``auto``: ``rewrap``, then re-encrypt the files
whose DEKs are over age."""
_MAX_LISTED = 1000  # files listed by name in a report


# -- the plan ----------------------------------------------------------------------


def plan_rewrites(
    inventory: Inventory, max_files: int | None, *, aged_before: datetime | None = None
) -> list[tuple[str, list[str]]]:
    """Files to re-encrypt grouped by partition, in path order, at most `max_files` in all.

    A file is due when it holds rows whose DEK is wrapped under a stale
    version (the directory's), or, given `aged_before`, a DEK created
    before that instant (DEK age policy).
    """
    if max_files is not None and max_files < 0:
        raise ValueError("max_files must be >= 0")
    due = {f.relpath: f for f in inventory.stale_files()}
    if aged_before is not None:
        due.update((f.relpath, f) for f in inventory.aged_files(aged_before))
    stale = sorted(due.values(), key=lambda f: (f.partition, f.relpath))
    if max_files is not None:
        stale = stale[:max_files]
    groups: dict[str, list[str]] = {}
    for f in stale:
        groups.setdefault(f.partition, []).append(f.relpath)
    return list(groups.items())


def _plan_report(inventory: Inventory, groups: list[tuple[str, list[str]]]) -> dict[str, Any]:
    chosen = {rel for _, rels in groups for rel in rels}
    files = [f for f in inventory.files if f.relpath in chosen]
    versions: dict[str, int] = {}
    for f in files:
        for v, n in f.versions.items():
            versions[str(v)] = versions.get(str(v), 0) + n
    listed = [f.relpath for f in files][:_MAX_LISTED]
    return {
        "files": len(files),
        "rows": sum(f.rows for f in files),
        "stale_rows": sum(f.stale_rows(inventory.policy) for f in files),
        "bytes": sum(f.size for f in files),
        "rows_by_version": dict(sorted(versions.items(), key=lambda kv: int(kv[0]))),
        "partitions": {p: len(rels) for p, rels in groups},
        "file_list": listed,
        "file_list_truncated": len(files) > len(listed),
    }


# -- the Beam part -----------------------------------------------------------------


class RewritePartitionFn(beam.DoFn):
    """Rewrites one partition's stale files, `workers` at a time; yields one outcome dict per file.

    Holds only configuration when pickled; the KMS client and registry
    are built in `setup()`. The key policy is read per partition, so a
    rotation during a long run is picked up. A KMS failure stops the
    partition (remaining files are reported as skipped) and is reported,
    never retried blindly. Each file done is counted on `relay` (files, and
    rows moved), for the job's progress display.
    """

    def __init__(
        self,
        keys: KeySource,
        lake_uri: str | Lake,
        dataset: str,
        *,
        mode: str,
        workers: int,
        run_id: str,
        limits: ScopeLimits,
        dek_max_age: timedelta,
        actor: str,
        reason: str,
        include_request_ids: bool,
        kms_rate: float | None = None,
        now: datetime | None = None,
        relay: ProgressRelay | None = None,
    ) -> None:
        self.keys = keys
        self.lake_uri = lake_uri
        self.dataset = dataset
        self.mode = mode
        self.workers = workers
        self.run_id = run_id
        self.limits = limits
        self.dek_max_age = dek_max_age
        self.actor = actor
        self.reason = reason
        self.include_request_ids = include_request_ids
        self.kms_rate = kms_rate
        self.now = now  # the job's "now" (the planner's), so plan and rewrite agree on which DEKs are over age
        self.relay = relay or ProgressRelay(None, "")
        self._kms: Any = None
        self._registry: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_kms=None, _registry=None)
        return state

    def setup(self) -> None:
        self._kms = self.keys.open_kms()  # rate-limited by the key source
        self._registry = self.keys.open_registry()  # also the DEK directory and the dataset contracts
        self._files = Metrics.counter("keyturn", "files_rewritten")
        self._rows = Metrics.counter("keyturn", "rows_moved")
        self._calls = Metrics.counter("keyturn", "kms_calls")

    def teardown(self) -> None:
        close = getattr(self._kms, "close", None)
        if close is not None:
            close()
        self._kms = self._registry = None

    def process(self, element: tuple[str, list[str]]):  # type: ignore[no-untyped-def]
        partition, relpaths = element
        policy = KeyPolicy.from_registry(self._registry)
        contract = self._registry.get_contract(self.dataset)
        lake = as_lake(self.lake_uri)
        stop: list[str] = []

        def one(rel: str) -> dict[str, Any]:
            if stop:
                return {"path": rel, "partition": partition, "result": "skipped", "reason": "kms_error", "detail": stop[0]}
            path = lake.path(rel)
            info = lake.fs.get_file_info(path)
            if info.size is None:
                return {"path": rel, "partition": partition, "result": "skipped", "reason": "gone", "detail": "file disappeared"}
            data_file = DataFile(path, rel, partition, info.size, info.mtime_ns)
            try:
                outcome = rewrite_file(
                    lake,
                    data_file,
                    kms=self._kms,
                    policy=policy,
                    dataset=self.dataset,
                    directory=self._registry,
                    contract=contract,
                    limits=self.limits,
                    dek_max_age=self.dek_max_age,
                    actor=self.actor,
                    reason=self.reason,
                    **({} if self.now is None else {"clock": lambda: self.now}),
                )
            except KmsError as exc:
                stop.append(f"{type(exc).__name__}: {exc}")
                return {"path": rel, "partition": partition, "result": "kms_error", "reason": "kms_error", "detail": stop[0]}
            token = hashlib.sha256(rel.encode()).hexdigest()[:16]
            if outcome.audit is not None:
                audit = dict(outcome.audit)
                if not self.include_request_ids:
                    audit["kms_request_ids"] = []
                write_side_output(lake, "audit", part_name(self.run_id, token), [audit])
            write_side_output(lake, "quarantine", part_name(self.run_id, token), outcome.quarantine)
            crashpoint("rewrite:after-side-outputs")
            result = outcome.to_dict()
            self.relay.add(files=1, rows=result.get("rows_moved", 0) or 0)
            return result

        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            results = list(pool.map(one, relpaths))
        for r in results:
            if r["result"] == "rewritten":
                self._files.inc()
                self._rows.inc(r.get("rows_moved", 0))
            self._calls.inc(r.get("kms_calls", 0) or 0)
            yield r



def _write_results(lake_uri: str | Lake, run_id: str):  # type: ignore[no-untyped-def]
    def write(results: list[dict[str, Any]]) -> None:
        from keyturn.lake.atomic import fsync_dir
        from keyturn.lake.layout import temp_name_for

        lake = as_lake(lake_uri)
        directory = lake.keyturn_path("runs")
        lake.fs.create_dir(directory, recursive=True)
        path = lake.keyturn_path("runs", f"{run_id}.json")
        temp = lake.keyturn_path("runs", temp_name_for(f"{run_id}.json"))
        with lake.fs.open_output_stream(temp) as out:
            out.write(json.dumps(sorted(results, key=lambda r: r["path"])).encode())
        lake.fs.move(temp, path)
        fsync_dir(lake, directory)

    return write


def _run_beam(
    groups: list[tuple[str, list[str]]], dofn: Any, lake: Lake, run_id: str, beam_args: list[str] | None
) -> list[dict[str, Any]]:
    options = pipeline_options(beam_args)  # the in-process FnApiRunner unless --runner is given
    with beam.Pipeline(options=options) as p:
        (
            p
            | "Plan" >> beam.Create(groups)
            | "Spread" >> beam.Reshuffle()
            | "Rewrite" >> beam.ParDo(dofn)
            | "Collect" >> beam.combiners.ToList()
            | "Results" >> beam.Map(_write_results(lake, run_id))
        )
    path = lake.keyturn_path("runs", f"{run_id}.json")
    with lake.fs.open_input_file(path) as f:
        return json.loads(f.read())


# -- keys and settings ---------------------------------------------------------------


def _resolve_keys(
    home: Any, keys: KeySource | None, dataset: str | None, config: KeyturnConfig | None,
    clock: Callable[[], datetime] = utc_now,
) -> tuple[KeySource, str, KeyturnConfig, Any]:
    if keys is None:
        if home is None:
            raise ValueError("give a key home (home=) or a key source (keys=) and dataset")
        from keyturn.home import KeyHome

        key_home = home if isinstance(home, KeyHome) else KeyHome.open(home, clock=clock)
        return key_home.key_source(), dataset or key_home.dataset, config or key_home.config, key_home
    cfg = config or default_config()
    return keys, dataset or cfg.dataset, cfg, None


def _mismatch_events(inventory: Inventory, now: Callable[[], datetime]) -> list[dict[str, Any]]:
    """One event per file, reason and version for rows not on the active version (footers and the DEK directory)."""
    policy = inventory.policy
    current = policy.active.version
    dataset = inventory.dataset or "default"
    out = []
    for f in inventory.readable():
        groups: list[tuple[ReadStatus, int | None, int]] = [(policy.classify(v), v, n) for v, n in sorted(f.versions.items())]
        if f.missing_rows:
            groups.append((ReadStatus.MISSING, None, f.missing_rows))
        for version, n in sorted(f.unknown_by_version.items(), key=lambda kv: kv[0] or 0):
            groups.append((ReadStatus.UNKNOWN, version, n))  # DEKs the directory does not know (birth version)
        for status, version, rows in groups:
            if status is ReadStatus.CURRENT or not rows:
                continue
            scope_key = hashlib.sha256(f"{f.relpath}\0{version}\0{rows}".encode()).hexdigest()
            try:
                event = build_mismatch(
                    status.value,
                    dataset=f.dataset or dataset,
                    partition=f.partition,
                    found_version=version,
                    current_version=current,
                    rows=rows,
                    scope_key=scope_key,
                    clock=now,
                )
            except ValueError:  # e.g. a decrypt-only version newer than the active one
                continue
            out.append(event.to_dict())
    return out


# -- run -----------------------------------------------------------------------------


def run(
    lake: str | Lake,
    *,
    home: Any = None,
    keys: KeySource | None = None,
    dataset: str | None = None,
    config: KeyturnConfig | None = None,
    mode: str | None = None,
    dry_run: bool = False,
    max_files: int | None = None,
    workers: int | None = None,
    beam_args: list[str] | None = None,
    actor: str = ACTOR,
    reason: str = "",
    run_id: str | None = None,
    progress: ProgressFn | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> ReencryptReport:
    """Run the reencrypt job on `lake`; returns its report.

    Keys come from the key home `home` (`keyturn.home.KeyHome`), or from
    `keys` plus `dataset` (and optionally `config`, else the defaults).
    `mode` defaults to the config's ``lifecycle.rewrap_mode``; `workers` to
    ``lifecycle.max_concurrent_reencryption_workers``. ``report["problems"]``
    lists data problems (unreadable or failed files, corrupt, retired,
    unknown or missing rows); ``report["complete"]`` says whether any stale
    file is left. Raises `LakeLockedError` if another job holds the lake,
    `LakeError` if there is no lake, `KmsUnavailableError` if the KMS failed
    mid-run (files done so far stay done; run again to finish).
    """
    keys, dataset, cfg, key_home = _resolve_keys(home, keys, dataset, config, clock)
    mode = mode or cfg.lifecycle.rewrap_mode
    if mode not in JOB_MODES:
        raise ValueError(f"mode must be one of {', '.join(JOB_MODES)}, not {mode!r}")
    if max_files is not None and max_files < 0:
        raise ValueError("--max-files must be >= 0")
    workers = workers or cfg.lifecycle.max_concurrent_reencryption_workers
    run_id = run_id or new_run_id(prefix="reencrypt")
    from keyturn.home import lake_of

    the_lake = lake_of(lake, key_home)
    lake = the_lake.uri
    the_lake.require()
    registry = keys.open_registry()
    directory_rewrap: dict[str, Any] | None = None
    if mode in ("rewrap", "auto") and not dry_run:
        # the control-plane half: re-wrap the directory's stale DEKs; no lake byte changes
        say(progress, "re-wrapping stale DEKs in the key registry's directory")
        directory_rewrap = _rewrap_directory(keys, registry, key_home, cfg, actor=actor, reason=reason, clock=clock)
    policy = KeyPolicy.from_registry(registry)
    aged_before = None if mode == "rewrap" else clock() - timedelta(days=cfg.lifecycle.dek_max_age_days)
    report: dict[str, Any] = {
        "run_id": run_id,
        "lake": lake,
        "dataset": dataset,
        "mode": mode,
        "dry_run": dry_run,
        "max_files": max_files,
        "workers": workers,
        "active_version": policy.active.version,
        "directory_rewrap": directory_rewrap,
    }

    if dry_run:
        say(progress, "taking the inventory (footers only)")
        inventory = take_inventory(the_lake, policy, dataset=dataset, directory=registry)
        groups = [] if mode == "rewrap" else plan_rewrites(inventory, max_files, aged_before=aged_before)
        report.update(
            inventory=inventory.to_dict(),
            plan=_plan_report(inventory, groups),
            temp_files=len(the_lake.temp_files()),
            files_rewritten=0,
            kms_calls=0,
            problems=inventory.problems(),
            complete=not groups,
        )
        return ReencryptReport(**report)

    with the_lake.lock(exclusive=True, owner=f"{actor} {run_id}"):
        crashpoint("run:after-lock")
        removed = the_lake.remove_temp_files()
        for kind in SCHEMA_OF:
            compact_parts(the_lake, kind)  # parts of crashed runs
        say(progress, "taking the inventory (footers only)")
        inventory = take_inventory(the_lake, policy, dataset=dataset, directory=registry)
        crashpoint("run:after-inventory")
        groups = [] if mode == "rewrap" else plan_rewrites(inventory, max_files, aged_before=aged_before)
        report.update(inventory_before=inventory.to_dict(), plan=_plan_report(inventory, groups), temp_files_removed=removed)
        results: list[dict[str, Any]] = []
        if groups:
            relay = ProgressRelay(progress, "rewriting", files_total=report["plan"]["files"])
            dofn = RewritePartitionFn(
                keys,
                the_lake,
                dataset,
                mode="reencrypt",
                workers=workers,
                run_id=run_id,
                limits=ScopeLimits(cfg.dek.max_cells, cfg.dek.max_bytes),
                dek_max_age=timedelta(days=cfg.lifecycle.dek_max_age_days),
                actor=actor,
                reason=reason,
                include_request_ids=cfg.audit.include_kms_request_ids,
                kms_rate=cfg.lifecycle.max_kms_requests_per_second,
                now=clock(),
                relay=relay,
            )
            with relay:
                results = _run_beam(groups, dofn, the_lake, run_id, beam_args)
        crashpoint("run:before-report")
        for kind in ("audit", "quarantine"):
            compact_parts(the_lake, kind, run_id=run_id)
        after = take_inventory(the_lake, KeyPolicy.from_registry(registry), dataset=dataset, directory=registry)
        mismatch = _mismatch_events(after, clock)
        write_side_output(the_lake, "mismatch", run_id, mismatch)

    report.update(_summarize(results, after, the_lake, run_id, mismatch))
    if mode != "rewrap":
        # a file whose only due rows cannot be read (a null version, bad cells) is reported, not pending forever
        stuck = {r["path"] for r in results if r.get("reason") in ("nothing_movable", "no_stale_rows", "legacy_plain_column")}
        pending = [rel for _, rels in plan_rewrites(after, None, aged_before=aged_before) for rel in rels if rel not in stuck]
        report["complete"] = not pending
    kms_failures = [r for r in results if r["result"] == "kms_error"]
    if kms_failures:
        raise KmsUnavailableError(
            f"the KMS failed during reencrypt ({kms_failures[0]['detail']}); "
            f"{report['files_rewritten']} files were done, run again to finish"
        )
    return ReencryptReport(**report)


def _rewrap_directory(
    keys: KeySource, registry: Any, key_home: Any, cfg: KeyturnConfig, *, actor: str, reason: str, clock: Callable[[], datetime]
) -> dict[str, Any]:
    """`keyturn.rotation.rewrap` with the home's audit log (or a throwaway log when run without a home)."""
    from keyturn.rotation import rewrap

    kms = keys.open_kms()  # rate-limited by the key source
    try:
        if key_home is not None:
            chain = key_home.chain()
        else:
            import tempfile

            from keyturn.audit.chain import AuditChain

            chain = AuditChain(os.path.join(tempfile.mkdtemp(prefix="keyturn-rewrap-"), "audit.log"))
        return rewrap(
            registry, kms, chain, actor=actor, reason=reason or "re-wrap stale DEKs onto the active version",
            clock=clock, dataset=cfg.dataset,
        )
    finally:
        close = getattr(kms, "close", None)
        if close is not None:
            close()


def _summarize(
    results: list[dict[str, Any]], after: Inventory, lake: Lake, run_id: str, mismatch: list[dict[str, Any]]
) -> dict[str, Any]:
    by_result: dict[str, int] = {}
    for r in results:
        by_result[r["result"]] = by_result.get(r["result"], 0) + 1
    failed = [r for r in results if r["result"] == "failed"]
    quarantine = read_side_outputs(lake, "quarantine", run_id=run_id)
    corrupt_rows = sum(q["rows"] for q in quarantine if q["reason"] == "corrupt")
    problems = [
        {"path": r["path"], "partition": r["partition"], "reason": r["reason"], "detail": r["detail"]} for r in failed
    ]
    problems += [
        {"path": r["path"], "partition": r["partition"],
         "reason": "unmovable_rows" if r["reason"] == "nothing_movable" else r["reason"], "detail": r["detail"]}
        for r in results
        if r.get("reason") in ("nothing_movable", "legacy_plain_column")
    ]
    problems += [  # planned from its footer, but its own key columns show nothing to move: the footer is wrong
        {"path": r["path"], "partition": r["partition"], "reason": "footer_disagrees",
         "detail": "the footer counts rows under a stale DEK that the file's own envelopes do not confirm; left as it is"}
        for r in results
        if r.get("reason") == "no_stale_rows"
    ]
    failed_paths = {r["path"] for r in failed}
    problems += [p for p in after.problems() if p["path"] not in failed_paths or p["reason"] != "unreadable"]
    if corrupt_rows:
        problems.append({"path": None, "partition": None, "reason": "corrupt", "rows": corrupt_rows,
                         "detail": f"{corrupt_rows} rows failed to authenticate; kept in place and copied to quarantine"})
    side = {}
    for kind in SCHEMA_OF:
        path = lake.side_output_path(kind, run_id)
        if lake.fs.get_file_info(path).size is not None:
            side[kind] = lake.relpath(path)
    listed = results[:_MAX_LISTED]
    return {
        "files": listed,
        "files_truncated": len(results) > len(listed),
        "results": by_result,
        "files_rewritten": by_result.get("rewritten", 0),
        "files_failed": len(failed),
        "rows_moved": sum(r.get("rows_moved", 0) for r in results),
        "kms_calls": sum(r.get("kms_calls", 0) or 0 for r in results),
        "bytes_rewritten": sum(r.get("bytes_after", 0) or 0 for r in results if r["result"] == "rewritten"),
        "corrupt_rows": corrupt_rows,
        "mismatch_events": len(mismatch),
        "side_outputs": side,
        "inventory": after.to_dict(),
        "problems": problems,
        "complete": not after.stale_files(),
    }
