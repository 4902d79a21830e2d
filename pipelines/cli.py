"""The `keyturn` command line: a thin layer over the key home and the lake pipelines.

    keyturn [--home DIR] [--json] [--debug] VERB [options] [-- BEAM_OPTIONS...]

Verbs: init, encrypt, rotate, reencrypt, decrypt, status, retire,
schedule-deletion, audit verify, ingest, demo. The pipeline verbs call the
``run(...)`` function of their module in `pipelines`; every verb returns a
typed report (`keyturn.reports`), which `keyturn.pipelines.output` renders
once, as text or (``--json``) as one JSON object on stdout.
Everything after a bare ``--`` is passed to Beam's ``PipelineOptions``.

Errors print one line, ``keyturn: error: <message>``, on stderr (plus, with
``--json``, an ``{"error": ..., "exit_code": ...}`` object on stdout) and
exit with a code from `keyturn.pipelines.exitcodes`; ``--debug`` adds the
traceback. Long runs show rich progress bars on stderr (stage, files and
rows done, rate, time left) when it is a terminal and ``--json`` is off.

Lakes: every ``--lake`` (and decrypt's ``--out``) is a local path or
``s3://bucket/prefix``; ``--s3-endpoint-url`` (any verb) or the home
config's ``lake.s3_endpoint_url`` names the S3 endpoint, which travels with
the `keyturn.lake.Lake` to the Beam workers.

Testing aid: ``KEYTURN_NOW`` (ISO-8601; naive means UTC) replaces the
current time: it is the clock every verb hands the key home and the jobs,
so ``rotate --if-due`` can be tested without waiting. Only this CLI layer
reads it; the core takes an injected clock.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from typing import Any, NoReturn

from keyturn.reports import (
    AuditReport,
    ContractReport,
    DirectoryReport,
    InitReport,
    ProgressFn,
    RebuildReport,
    Report,
    RetireReport,
    RewrapReport,
    RotateReport,
    RotationNotDueReport,
    ScheduleDeletionReport,
)
from keyturn.pipelines import exitcodes, output

__all__ = ["main", "build_parser", "NOW_ENV"]

NOW_ENV = "KEYTURN_NOW"
PROG = "keyturn"
BEAM_VERBS = frozenset({"encrypt", "reencrypt", "decrypt", "ingest", "demo"})


class UsageError(Exception):
    """A bad command line; exits with `exitcodes.USAGE`."""

    exit_code = exitcodes.USAGE


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one line instead of usage text plus exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# --------------------------------------------------------------------------- parsing


def _columns(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated column names, got {text!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a column is named twice in {text!r}")
    return names


def _int_at_least(minimum: int):  # type: ignore[no-untyped-def]
    """An argparse type: a whole number >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _endpoint_url(text: str) -> str:
    if not text.startswith(("http://", "https://")) or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--home, --json, --debug: accepted before the verb and after it."""
    default: Any = argparse.SUPPRESS
    parser.add_argument(
        "--home",
        metavar="DIR",
        default=None if top else default,
        help="key home: keystore, registry, config, audit log (default: $KEYTURN_HOME or ./.keyturn)",
    )
    parser.add_argument(
        "--json", action="store_true", default=False if top else default, help="print one JSON object on stdout"
    )
    parser.add_argument(
        "--debug", action="store_true", default=False if top else default, help="show tracebacks on errors"
    )
    parser.add_argument(
        "--s3-endpoint-url",
        metavar="URL",
        type=_endpoint_url,
        default=None if top else default,
        help="S3 endpoint for s3:// lakes, e.g. http://127.0.0.1:9000 (default: the config's lake.s3_endpoint_url, "
        "else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS)",
    )


def _version() -> str:
    from keyturn import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every verb (also what `keyturn --help` prints)."""
    parser = _Parser(
        prog=PROG,
        description="Envelope encryption and lazy key rotation for Parquet lakes, on Apache Beam.",
        epilog="Beam pipeline options go after a bare `--`, e.g. `keyturn encrypt ... -- --runner=DirectRunner`. "
        "Exit codes: " + ", ".join(f"{code} {name}" for code, name in exitcodes.CODES.items()) + ".",
    )
    _common(parser, top=True)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the version and exit")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        _common(sub, top=False)
        return sub

    def actions(name: str, help_text: str) -> Callable[[str, str], argparse.ArgumentParser]:
        """A verb with ACTIONs under it (dest ``<name>_verb``); returns a function adding one action."""
        group = verb(name, help_text).add_subparsers(dest=f"{name}_verb", metavar="ACTION", required=True)

        def action(action_name: str, action_help: str) -> argparse.ArgumentParser:
            sub = group.add_parser(action_name, help=action_help)
            _common(sub, top=False)
            return sub

        return action

    p = verb("init", "create a key home: a KMS key registered as version 1 (active), registry, config file")
    p.add_argument("--dataset", default="default", help="dataset name bound into every ciphertext (default: default)")
    p.add_argument("--rotation-interval-days", type=_positive_int, default=None, metavar="N",
                   help="rotation cadence that `rotate --if-due` follows (default: 90)")
    p.add_argument("--provider", choices=("local", "aws_kms"), default="local",
                   help="local: a keystore file in the home (single node); aws_kms: an AWS KMS key (--key-id)")
    p.add_argument("--key-id", metavar="KEY", default=None, help="aws_kms: key id, key ARN, alias or alias ARN (version 1)")
    p.add_argument("--region", metavar="REGION", default=None, help="aws_kms: region of the key, table and log group")
    p.add_argument("--endpoint-url", metavar="URL", type=_endpoint_url, default=None, help="aws_kms: KMS endpoint")
    p.add_argument("--registry-table", metavar="TABLE", default=None,
                   help="aws_kms: DynamoDB registry table, created if missing (default: registry.sqlite in the home)")
    p.add_argument("--log-group", metavar="GROUP", default=None,
                   help="also send audit events to this CloudWatch Logs group (audit.log stays in the home)")
    p.add_argument("--log-stream", metavar="STREAM", default=None, help="CloudWatch log stream (with --log-group)")

    p = verb("encrypt", "encrypt plain Parquet or Avro into an encrypted, hive-partitioned Parquet lake")
    p.add_argument("--source", required=True, metavar="PATH", help="plain Parquet or Avro file, or a directory of them")
    p.add_argument("--lake", required=True, metavar="PATH", help="the encrypted lake (created if absent)")
    p.add_argument("--columns", required=True, type=_columns, metavar="A,B", help="columns to encrypt")
    p.add_argument("--partition-by", metavar="COL", default=None, help="hive partition column")
    p.add_argument("--bind", type=_columns, default=None, metavar="COL[,COL]",
                   help="row-key columns bound into every encrypted cell, so a cell swapped between rows fails "
                   "authentication (default: encryption.bind_columns, else the dataset contract's)")

    p = verb("rotate", "make a new KEK version active; the previous one becomes decrypt-only")
    p.add_argument("--reason", default="scheduled rotation", help="why (recorded in the registry and the audit log)")
    p.add_argument("--rewrap", action="store_true",
                   help="then re-wrap every DEK of the directory onto the new version (`keyturn rewrap`); no lake byte "
                   "changes (always done with lifecycle.reencryption_strategy: eager)")
    p.add_argument("--if-due", action="store_true", help="rotate only when rotation_interval_days have passed")
    p.add_argument("--new-key", metavar="KEY", default=None,
                   help="aws_kms: the KMS key of the new version (default: rotate the active key's material "
                   "on demand and keep its id)")

    p = verb("rewrap", "re-wrap the DEK directory's stale DEKs onto the active key version; no lake byte changes")
    p.add_argument("--reason", default="re-wrap stale DEKs onto the active version",
                   help="why (recorded in the audit log)")
    p.add_argument("--max-deks", type=_nonneg_int, default=None, metavar="N",
                   help="re-wrap at most N DEKs this run (a later run goes on)")

    p = verb("reencrypt", "give lake files fresh DEKs (stale or over-age DEKs), lazily and crash-safely")
    p.add_argument("--lake", required=True, metavar="PATH")
    p.add_argument("--mode", choices=("rewrap", "reencrypt", "auto"), default=None,
                   help="reencrypt: fresh DEKs for files whose DEKs are stale or older than lifecycle.dek_max_age_days; "
                   "rewrap: the same as `keyturn rewrap` (no lake byte changes); auto: rewrap, then re-encrypt "
                   "over-age files; default: lifecycle.rewrap_mode")
    p.add_argument("--dry-run", action="store_true", help="take the inventory and report; change nothing")
    p.add_argument("--max-files", type=_positive_int, default=None, metavar="N", help="rewrite at most N files this run")

    p = verb("decrypt", "decrypt a lake back to plain Parquet")
    p.add_argument("--lake", required=True, metavar="PATH")
    p.add_argument("--out", required=True, metavar="PATH", help="directory for the plain Parquet output")
    p.add_argument("--columns", type=_columns, default=None, metavar="A,B",
                   help="encrypted columns to decrypt (default: all); other encrypted columns are left out")
    p.add_argument("--side-outputs", default=None, metavar="PATH",
                   help="directory for the run's mismatch, quarantine and audit files (default: OUT/_keyturn); "
                   "never inside the lake: decrypt writes nothing into the lake it reads")

    p = verb("status", "rows and files per key version per partition, and rotation progress")
    p.add_argument("--lake", required=True, metavar="PATH")
    p.add_argument("--report", metavar="FILE.html", default=None, help="also write an HTML report with a chart")

    for name, text in (
        ("retire", "retire a decrypt-only key version (refused while the DEK directory holds a DEK under it, "
         "and for key_hierarchy.transition_window_days after it left the active state)"),
        ("schedule-deletion", "schedule a retired key version for deletion (refused while a DEK is under it)"),
    ):
        p = verb(name, text)
        p.add_argument("version", type=_positive_int, metavar="VERSION")
        p.add_argument("--lake", action="append", default=[], metavar="PATH",
                       help="also check this lake: refused while it holds rows under VERSION or rows whose DEK "
                       "the directory does not know (repeatable; the directory decides either way)")
        p.add_argument("--reason", default=f"keyturn {name}", help="why (recorded in the registry and the audit log)")
        if name == "schedule-deletion":
            p.add_argument("--days", type=_nonneg_int, default=None, metavar="N",
                           help="pending period before deletion (default: key_hierarchy.pending_deletion_days)")

    directory = actions("directory", "the key registry's DEK directory")
    directory("show", "DEKs per key version")
    directory("rebuild", "recreate missing directory entries from a lake's birth envelopes").add_argument(
        "--lake", required=True, metavar="PATH"
    )

    dataset = actions("dataset", "the dataset contract: which columns are ciphertext, as what")
    dataset("show", "the dataset's contract and its revisions")
    sub = dataset("add-column", "encrypt one more column from now on (audited)")
    sub.add_argument("column", metavar="COLUMN")
    sub.add_argument("--source", required=True, metavar="PATH",
                     help="a plain Parquet or Avro file (or directory) to take the column's type from")
    sub.add_argument("--reason", default="keyturn dataset add-column", help="why (recorded in the registry and audit log)")

    actions("audit", "control-plane audit log")("verify", "verify the hash chain of the home's audit log")

    p = verb("ingest", "watch a directory and encrypt new Avro/Parquet files into the lake")
    p.add_argument("--watch", required=True, metavar="DIR")
    p.add_argument("--lake", required=True, metavar="PATH")
    p.add_argument("--columns", type=_columns, default=None, metavar="A,B", help="columns to encrypt")
    p.add_argument("--partition-by", metavar="COL", default=None)
    p.add_argument("--bind", type=_columns, default=None, metavar="COL[,COL]",
                   help="row-key columns bound into every cell (default: encryption.bind_columns, else the contract's)")
    p.add_argument("--until-idle", type=_seconds, default=None, metavar="SECONDS",
                   help="stop after no new file arrived for this long (default: run until stopped)")
    p.add_argument("--poll-interval", type=_seconds, default=None, metavar="SECONDS",
                   help="how often to look for new files (default: the ingest pipeline's)")

    p = verb("demo", "the `make demo` walk-through: encrypt, rotate, lazily rewrap, status, decrypt a sample")
    p.add_argument("--rows", type=_positive_int, default=None, help="rows to generate (default: 1,000,000)")
    p.add_argument("--partitions", type=_positive_int, default=None, help="partitions (default: 10)")
    p.add_argument("--out", metavar="DIR", default=None, help="working directory (default: ./demo-out)")
    return parser


def split_beam_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split at the first bare ``--``: (keyturn arguments, Beam pipeline options)."""
    args = list(argv)
    if "--" in args:
        i = args.index("--")
        return args[:i], args[i + 1 :]
    return args, []


# --------------------------------------------------------------------------- context


def _now_from_env() -> Callable[[], datetime]:
    """The clock: the real time, or the fixed instant in $KEYTURN_NOW (a testing aid)."""
    text = os.environ.get(NOW_ENV)
    if not text:
        return lambda: datetime.now(timezone.utc)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{NOW_ENV} must be an ISO-8601 time such as 2025-01-31T12:00:00Z, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    moment = moment.astimezone(timezone.utc)
    return lambda: moment


def _actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment
        user = "unknown"
    return f"cli:{user}"


class _Context:
    """What a handler needs: parsed args, Beam args, the clock, the actor, and the progress display."""

    def __init__(self, args: argparse.Namespace, beam_args: list[str]) -> None:
        self.args = args
        self.beam_args = beam_args
        self.clock = _now_from_env()
        self.home_path = args.home or _default_home()
        self.actor = _actor()

    def home(self, *, check_keys: bool = True):  # -> KeyHome
        from keyturn.home import KeyHome

        return KeyHome.open(self.home_path, clock=self.clock, check_keys=check_keys)

    def lake(self, home: Any, uri: str) -> Any:
        """The lake at `uri` (a local path or s3://...), with --s3-endpoint-url or the home's lake config."""
        return home.lake(uri, s3_endpoint_url=getattr(self.args, "s3_endpoint_url", None))

    @property
    def show_progress(self) -> bool:
        return not self.args.json and sys.stderr.isatty()

    def progress(self, label: str) -> AbstractContextManager[ProgressFn | None]:
        """The `progress` callback for a long run: rich bars on stderr starting at `label`, or None (no display)."""
        return output.progress_display(self.show_progress, label)


def _default_home() -> str:
    from keyturn.home import default_home

    return default_home()


# --------------------------------------------------------------------------- verbs


def _cmd_init(ctx: _Context) -> InitReport:
    from keyturn.home import KeyHome

    a = ctx.args
    if a.provider == "aws_kms" and not a.key_id:
        raise UsageError("init --provider aws_kms needs --key-id (a KMS key id, ARN or alias)")
    if a.log_stream and not a.log_group:
        raise UsageError("--log-stream needs --log-group")
    home = KeyHome.init(
        ctx.home_path,
        dataset=a.dataset,
        rotation_interval_days=a.rotation_interval_days,
        provider=a.provider,
        key_id=a.key_id,
        region=a.region,
        endpoint_url=a.endpoint_url,
        registry_table=a.registry_table,
        log_group=a.log_group,
        log_stream=a.log_stream,
        s3_endpoint_url=getattr(a, "s3_endpoint_url", None),
        actor=ctx.actor,
        clock=ctx.clock,
    )
    active = home.registry().active()
    cfg = home.config
    return InitReport(
        home=home.path,
        dataset=home.dataset,
        provider=cfg.key_hierarchy.cmk.provider,
        registry=cfg.version_tracking.storage,
        registry_table=cfg.version_tracking.table,
        audit_sink=cfg.audit.sink,
        active_version=active.version,
        kek_id=active.kek_id,
        rotation_interval_days=cfg.key_hierarchy.rotation_interval_days,
        log_group=cfg.audit.log_group,
    )


def _cmd_rotate(ctx: _Context) -> RotateReport | RotationNotDueReport:
    from keyturn.rotation import next_rotation_due, rotate

    home = ctx.home()
    registry = home.registry()
    interval = home.config.key_hierarchy.rotation_interval_days
    now = ctx.clock()
    before = registry.active()
    if ctx.args.if_due:
        due_at = next_rotation_due(registry, interval)
        if now < due_at:
            return RotationNotDueReport(
                active_version=before.version, next_due=due_at, rotation_interval_days=interval
            )
    new = rotate(
        registry,
        home.provisioner(ctx.args.new_key),
        home.chain(),
        actor=ctx.actor,
        reason=ctx.args.reason,
        clock=ctx.clock,
        dataset=home.dataset,
    )
    # lifecycle.reencryption_strategy: eager re-wraps the whole directory now; lazy and batch_lazy move nothing here
    strategy = home.config.lifecycle.reencryption_strategy
    rewrapped = _rewrap(ctx, home, ctx.args.reason) if ctx.args.rewrap or strategy == "eager" else None
    model = None
    if home.is_aws:
        model = "new_key" if ctx.args.new_key else "kms_rotation"
    return RotateReport(
        version_from=new.version - 1,
        version_to=new.version,
        kek_id=new.kek_id,
        rotation_model=model,
        reason=ctx.args.reason,
        next_due=next_rotation_due(registry, interval),
        reencryption_strategy=strategy,
        rewrap=rewrapped,
    )


def _rewrap(ctx: _Context, home: Any, reason: str) -> RewrapReport:
    """`keyturn.rotation.rewrap` on the home: its registry, KMS (rate-limited) and audit log."""
    from keyturn.rotation import rewrap

    with home.kms() as limited:  # the key source applies lifecycle.max_kms_requests_per_second, once
        with ctx.progress("re-wrapping DEKs"):
            return RewrapReport(**rewrap(
                home.registry(), limited, home.chain(), actor=ctx.actor, reason=reason, clock=ctx.clock,
                dataset=home.dataset, max_deks=getattr(ctx.args, "max_deks", None),
            ))


def _cmd_rewrap(ctx: _Context) -> RewrapReport:
    report = _rewrap(ctx, ctx.home(), ctx.args.reason)
    return dataclasses.replace(report, problems=[
        {"path": None, "partition": None, "reason": "corrupt", "detail": f"DEK {d}: its envelope did not re-wrap"}
        for d in report.deks_failed
    ])


def _cmd_directory(ctx: _Context) -> DirectoryReport | RebuildReport:
    home = ctx.home()
    registry = home.registry()
    if ctx.args.directory_verb == "show":
        states = {str(v.version): v.state.value for v in registry.versions()}
        return DirectoryReport({str(v): n for v, n in registry.deks_by_version().items()}, states)
    from keyturn.lake.rebuild import rebuild_directory

    lake = ctx.lake(home, ctx.args.lake)
    with home.kms() as kms, ctx.progress("reading the lake's birth envelopes"):
        return RebuildReport(**rebuild_directory(lake, registry, kms, home.dataset, actor=ctx.actor, clock=ctx.clock))


def _cmd_dataset(ctx: _Context) -> ContractReport:
    from keyturn.contract import add_column
    from keyturn.errors import ContractError

    home = ctx.home()
    registry = home.registry()
    contract = registry.get_contract(home.dataset)
    if ctx.args.dataset_verb == "show":
        if contract is None:
            return ContractReport(home.dataset, None)
        history = [{"revision": h["revision"], "at": h["at"].isoformat(), "actor": h["actor"], "reason": h["reason"]}
                   for h in registry.contract_history(home.dataset)]
        return ContractReport(home.dataset, contract.to_json(), history, described=contract.describe())
    if contract is None:
        raise ContractError(f"dataset {home.dataset!r} has no contract yet; its first write pins one")
    column = _column_from_source(ctx.args.source, ctx.args.column, contract)
    new = registry.evolve_contract(
        add_column(contract, column), expected_revision=contract.revision, actor=ctx.actor, reason=ctx.args.reason
    )
    _log_contract_change(home, ctx, new, ctx.args.reason)
    return ContractReport(home.dataset, new.to_json(), added_column=ctx.args.column)


def _column_from_source(source: str, name: str, contract: Any) -> Any:
    """The contract column for `name`, typed from the first source file's schema."""
    from keyturn.contract import arrow_contract
    from keyturn.errors import InputError
    from keyturn.sources import file_schema, list_source_files

    files = list_source_files(source)
    schema = file_schema(files[0])
    if name not in schema.names:
        raise InputError(f"column {name!r} is not in {files[0].path!r} (columns: {', '.join(schema.names)})")
    return arrow_contract(contract.dataset, schema, [name]).columns[0]


def _log_contract_change(home: Any, ctx: _Context, contract: Any, reason: str) -> None:
    from keyturn.audit.events import build_event
    from keyturn.rotation import CONTROL_PLANE_PARTITION

    event = build_event(
        "contract", actor=ctx.actor, reason=reason, dataset=home.dataset, partition=CONTROL_PLANE_PARTITION,
        version_from=None, version_to=None, counts={"revision": contract.revision},
        scope_key=f"contract:{contract.revision}:{contract.to_text()}", clock=ctx.clock,
    )
    home.chain().append(event)


def _job(ctx: _Context, run: Callable[..., Report], label: str, **kwargs: Any) -> Report:
    """`run(home=<home path>, **kwargs)` with the Beam args, the actor, the clock and the progress display."""
    home = ctx.home()  # open and validate here, so a broken home fails before any pipeline starts
    for name in ("lake", "out"):  # an s3:// lake goes as a Lake: it carries --s3-endpoint-url to the workers
        if isinstance(kwargs.get(name), str) and kwargs[name].startswith("s3://"):
            kwargs[name] = ctx.lake(home, kwargs[name])
    with ctx.progress(label) as progress:
        return run(home=home.path, beam_args=ctx.beam_args, actor=ctx.actor, clock=ctx.clock, progress=progress,
                   **kwargs)


def _forwarded(ctx: _Context, lake: Any, report: Report) -> Report:
    """`report`, and with ``audit.sink: cloudwatch`` the run's audit events (``_keyturn/audit/<run-id>.avro``
    under `lake`) sent to CloudWatch too, counted in ``audit_events_forwarded``."""
    home = ctx.home(check_keys=False)
    run_id = getattr(report, "run_id", None)
    if home.config.audit.sink != "cloudwatch" or lake is None or not run_id or getattr(report, "dry_run", False):
        return report
    from keyturn.lake.sideoutputs import read_side_outputs
    from keyturn.home import forward_audit

    if isinstance(lake, str):
        lake = ctx.lake(home, lake)
    forwarded = forward_audit(home, read_side_outputs(lake, "audit", run_id=run_id))
    return dataclasses.replace(report, audit_events_forwarded=forwarded)  # type: ignore[type-var]


def _cmd_encrypt(ctx: _Context) -> Report:
    from keyturn.pipelines import encrypt

    a = ctx.args
    report = _job(ctx, encrypt.run, "encrypting", source=a.source, lake=a.lake, columns=a.columns,
                  partition_by=a.partition_by, bind=a.bind)
    return _forwarded(ctx, a.lake, report)


def _cmd_reencrypt(ctx: _Context) -> Report:
    from keyturn.pipelines import reencrypt

    a = ctx.args
    report = _job(ctx, reencrypt.run, "re-encrypting", lake=a.lake, mode=a.mode, dry_run=a.dry_run,
                  max_files=a.max_files)
    return _forwarded(ctx, a.lake, report)


def _cmd_decrypt(ctx: _Context) -> Report:
    from keyturn.pipelines import decrypt

    a = ctx.args
    extra: dict[str, Any] = {}
    if a.side_outputs is not None:  # an s3:// one carries --s3-endpoint-url, like --lake and --out
        s3 = a.side_outputs.startswith("s3://")
        extra["side_outputs"] = ctx.lake(ctx.home(check_keys=False), a.side_outputs) if s3 else a.side_outputs
    report = _job(ctx, decrypt.run, "decrypting", lake=a.lake, out=a.out, columns=a.columns, **extra)
    side = getattr(report, "side_outputs", None)
    if not side:
        return report
    from keyturn.lake.sideoutputs import SideOutputDir

    # decrypt's audit events are with its side outputs, not in the lake
    return _forwarded(ctx, SideOutputDir.of(ctx.lake(ctx.home(check_keys=False), side)), report)


def _cmd_ingest(ctx: _Context) -> Report:
    from keyturn.pipelines import ingest

    a = ctx.args
    extra = {} if a.poll_interval is None else {"poll_interval": a.poll_interval}
    return _job(ctx, ingest.run, f"watching {a.watch}", watch=a.watch, lake=a.lake, columns=a.columns,
                partition_by=a.partition_by, bind=a.bind, until_idle=a.until_idle, **extra)


def _cmd_demo(ctx: _Context) -> Report:
    from keyturn.pipelines import demo

    a = ctx.args
    kwargs = {k: v for k, v in (("rows", a.rows), ("partitions", a.partitions), ("out", a.out)) if v is not None}
    with ctx.progress("running the demo") as progress:
        return demo.run(beam_args=ctx.beam_args, actor=ctx.actor, clock=ctx.clock, progress=progress, **kwargs)


def _cmd_status(ctx: _Context) -> Report:
    from keyturn.pipelines import status

    home = ctx.home()
    with ctx.progress("reading lake footers") as progress:
        return status.run(home=home, lake=ctx.lake(home, ctx.args.lake), report_path=ctx.args.report,
                          clock=ctx.clock, progress=progress)


def _lake_inventory(ctx: _Context, home: Any, lakes: Sequence[str], policy: Any) -> Any:
    """The combined inventory of the lakes given (None for none); a lake that does not exist is an error.

    The registry's DEK directory decides retire and deletion on its own; a
    lake given here adds a check: its rows under the version (by the
    directory's wrapping), plus rows whose DEK the directory does not know.
    """
    from keyturn.lake import take_inventory
    from keyturn.rotation import CombinedInventory

    if not lakes:
        return None
    inventories = []
    registry = home.registry()
    for uri in lakes:
        lake = ctx.lake(home, uri)
        lake.require()
        inventories.append(_StrictInventory(take_inventory(lake, policy, dataset=home.dataset, directory=registry)))
    return CombinedInventory(inventories)


class _StrictInventory:
    """A lake inventory for retire: rows under the version, plus rows whose DEK the directory does not know."""

    def __init__(self, inventory: Any) -> None:
        self.inventory = inventory

    def references(self, version: int) -> int:
        return self.inventory.references(version) + sum(f.unknown_rows for f in self.inventory.files)


def _cmd_retire(ctx: _Context) -> RetireReport:
    from keyturn.rotation import check_transition_window, retire

    a = ctx.args
    home = ctx.home()
    registry = home.registry()
    window = home.config.key_hierarchy.transition_window_days
    # UnknownVersionError, or a refusal inside the transition window, before any lake is read
    check_transition_window(registry, a.version, window, ctx.clock())
    inventory = _lake_inventory(ctx, home, a.lake, home.policy())
    version = retire(
        registry, a.version, home.chain(), inventory=inventory,
        actor=ctx.actor, reason=a.reason, clock=ctx.clock, dataset=home.dataset, transition_window_days=window,
    )
    return RetireReport(version.version, version.state.value, list(a.lake), a.reason)


def _cmd_schedule_deletion(ctx: _Context) -> ScheduleDeletionReport:
    from keyturn.rotation import schedule_deletion

    a = ctx.args
    home = ctx.home()
    registry = home.registry()
    registry.get(a.version)
    days = a.days if a.days is not None else home.config.key_hierarchy.pending_deletion_days
    inventory = _lake_inventory(ctx, home, a.lake, home.policy())
    version = schedule_deletion(
        registry, a.version, home.chain(), inventory=inventory, pending_days=days,
        actor=ctx.actor, reason=a.reason, clock=ctx.clock, dataset=home.dataset,
    )
    delete_after = version.delete_after.isoformat() if version.delete_after else None
    return ScheduleDeletionReport(version.version, version.state.value, delete_after, days, list(a.lake), a.reason)


def _cmd_audit(ctx: _Context) -> AuditReport:
    home = ctx.home(check_keys=False)
    status = home.chain().verify()  # the chain, then that it still reaches the registry's anchor
    return AuditReport(ok=True, log=home.config.audit.path, **status.to_dict())


_HANDLERS: dict[str, Callable[[_Context], Report]] = {
    "init": _cmd_init,
    "encrypt": _cmd_encrypt,
    "rotate": _cmd_rotate,
    "reencrypt": _cmd_reencrypt,
    "rewrap": _cmd_rewrap,
    "directory": _cmd_directory,
    "dataset": _cmd_dataset,
    "decrypt": _cmd_decrypt,
    "status": _cmd_status,
    "retire": _cmd_retire,
    "schedule-deletion": _cmd_schedule_deletion,
    "audit": _cmd_audit,
    "ingest": _cmd_ingest,
    "demo": _cmd_demo,
}


# --------------------------------------------------------------------------- errors


def _error_message(exc: BaseException, code: int, *, debug: bool = False) -> str:
    """The one line for `exc` (looked at through Beam's wrapping); an internal error names its type.

    "rerun with --debug" only when this run was not already one: with --debug the traceback is above the line.
    """
    message = exitcodes.message_for(exc)
    if code == exitcodes.INTERNAL:
        hint = "" if debug else "; rerun with --debug for the traceback"
        return f"internal error ({exitcodes.type_name_for(exc)}: {message}){hint}"
    return message


# --------------------------------------------------------------------------- main


def _quiet_library_logs(debug: bool) -> None:
    """Keep library logs off a normal run's stderr: an error is the one line `main` writes.

    Beam logs every exception a step raises, with its traceback, at ERROR
    (``apache_beam.runners.common``, the bundle executors) before it
    re-raises it; the CLI reports that exception itself, so Beam's loggers
    are silenced entirely, other libraries' below ERROR, and Python warnings
    go to logging (so the same levels apply). Only when nothing configured
    logging yet (a real command line, not an embedding program or a test
    harness); --debug shows INFO and up, Beam's tracebacks included.
    """
    root = logging.getLogger()
    if root.handlers:
        return
    if debug:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    root.setLevel(logging.ERROR)
    logging.getLogger("apache_beam").setLevel(logging.CRITICAL + 1)
    root.addFilter(_not_from_beam)  # Beam also logs on the root logger: the PortableRunner relays the job's messages
    logging.captureWarnings(True)
    if not isinstance(sys.stderr, _StderrWithoutBeam):
        sys.stderr = _StderrWithoutBeam(sys.stderr)


def _not_from_beam(record: logging.LogRecord) -> bool:
    return f"{os.sep}apache_beam{os.sep}" not in (record.pathname or "")


class _StderrWithoutBeam:
    """sys.stderr, minus what Beam's own code writes to it.

    An SDK worker running in this process (a PortableRunner's LOOPBACK
    worker, ``--direct_running_mode=multi_threading``) prints the traceback
    of every failed bundle straight to sys.stderr before the runner raises
    the error, which the CLI then reports as its one line. Everything else
    (the error line, the progress bars) passes, and every other attribute is the
    stream's own.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            caller = sys._getframe(1).f_globals.get("__name__", "")
        except ValueError:  # called from C with no Python frame above (the interpreter reporting at exit)
            caller = ""
        if caller == "apache_beam" or caller.startswith("apache_beam."):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _report_error(exc: BaseException, *, debug: bool, want_json: bool) -> int:
    """Write the error line (the traceback first with --debug, the JSON error with --json); return its exit code.

    The exception is looked at through Beam's wrapping (`exitcodes.unwrap`):
    a keyturn error a step raised gets its own code and message, and a
    Ctrl-C that reached a step (Beam re-raises it as a RuntimeError) is
    INTERRUPTED like one that reached the driver.
    """
    code = exitcodes.exit_code_for(exc)
    message = _error_message(exc, code, debug=debug)
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()
    if want_json:
        cause = exitcodes.unwrap(exc)
        error: dict[str, Any] = {"error": message, "exit_code": code, "error_type": exitcodes.type_name_for(exc)}
        if isinstance(getattr(cause, "index", None), int):
            error["index"] = cause.index  # type: ignore[attr-defined]
        try:
            output.write_json(error)
        except BrokenPipeError:
            _stdout_to_devnull()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with `argv` (default: sys.argv[1:]) and return the exit code."""
    raw = list(sys.argv[1:] if argv is None else argv)
    own, beam_args = split_beam_args(raw)
    want_json = "--json" in own
    debug = "--debug" in own
    try:
        try:
            args = build_parser().parse_args(own)
        except SystemExit as stop:  # --help
            return stop.code if isinstance(stop.code, int) else exitcodes.OK
        want_json, debug = args.json, args.debug
        _quiet_library_logs(debug)
        if beam_args and args.verb not in BEAM_VERBS:
            raise UsageError(
                f"Beam options after `--` apply only to {', '.join(sorted(BEAM_VERBS))}; `{args.verb}` runs no pipeline"
            )
        ctx = _Context(args, beam_args)
        report = _HANDLERS[args.verb](ctx)
    except (KeyboardInterrupt, Exception) as exc:  # every failure: one line, a documented code
        return _report_error(exc, debug=debug, want_json=want_json)
    try:
        output.emit(report, as_json=want_json)  # the one place a report becomes text or JSON
    except BrokenPipeError:  # `keyturn status | head -1`: the reader had enough; the run itself is done
        _stdout_to_devnull()
    return exitcodes.report_exit_code(report)


def _stdout_to_devnull() -> None:
    """After a broken pipe: point stdout at the null device, so the flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (an embedding program's stdout)
        pass


if __name__ == "__main__":
    sys.exit(main())
