"""The inventory of a lake: rows and files per key version per partition, from footers only.

`take_inventory` lists the data files and reads each one's footer (see
`keyturn.lake.footer`); it never reads data pages of a file that carries a
consistent ``keyturn`` footer. The result drives the reencrypt plan (files
with stale rows), `keyturn status`, and the registry's retire and deletion
checks (`Inventory.references`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from keyturn.contract import DatasetContract
from keyturn.directory import LOOKUP_BATCH, DekDirectory, DekEntry, entry_matches
from keyturn.errors import NotAKeyturnLakeError, WrongKeyHomeError
from keyturn.format import DEK_FIELD, VERSION_FIELD
from keyturn.lake.footer import FileSummary, read_file_summary
from keyturn.scope import Location
from keyturn.lake.layout import DataFile, Lake
from keyturn.policy import KeyPolicy, ReadStatus

__all__ = [
    "Inventory",
    "take_inventory",
    "NotAKeyturnLakeError",
    "WrongKeyHomeError",
    "keyturn_marked",
    "check_fits_home",
]


_STATUSES = [s.value for s in ReadStatus]


@dataclass
class Inventory:
    """Summaries of every data file of a lake under one key policy snapshot.

    Also a registry `Inventory` (`references(version)`), so retiring or
    deleting a version is refused while data still uses it.
    """

    lake: Lake
    policy: KeyPolicy
    files: list[FileSummary]
    dataset: str | None = None
    deks_seen: int = 0  # distinct DEK ids named by the files (counted when a directory was applied)
    deks_known: int | None = None  # how many of them the directory knows; None: no directory applied

    # -- registry Inventory protocol ---------------------------------------
    def references(self, version: int) -> int:
        """Rows under `version`, plus one per unreadable file (it might hold that version).

        Conservative on purpose: a key is not retired or deleted while any
        file the inventory cannot read might still need it.
        """
        rows = sum(f.versions.get(version, 0) for f in self.files)
        return rows + len(self.unreadable())

    # -- views --------------------------------------------------------------
    def readable(self) -> list[FileSummary]:
        return [f for f in self.files if f.readable]

    def unreadable(self) -> list[FileSummary]:
        return [f for f in self.files if not f.readable]

    def foreign(self) -> list[FileSummary]:
        """Readable files whose footer names another dataset (never rewritten)."""
        if self.dataset is None:
            return []
        return [f for f in self.readable() if f.dataset is not None and f.dataset != self.dataset]

    def stale_files(self) -> list[FileSummary]:
        """Files holding stale rows (readable, on a decrypt-only version) of this dataset, by path."""
        foreign = {id(f) for f in self.foreign()}
        return [f for f in self.files if f.needs_rewrite(self.policy) and id(f) not in foreign]

    def aged_files(self, cutoff: datetime) -> list[FileSummary]:
        """Readable files of this dataset with a DEK created before `cutoff` (needs directory counts)."""
        foreign = {id(f) for f in self.foreign()}
        return [
            f
            for f in self.files
            if f.readable and id(f) not in foreign and f.oldest_dek is not None and f.oldest_dek < cutoff
        ]

    def current_files(self) -> list[FileSummary]:
        return [f for f in self.files if f.is_current(self.policy)]

    def versions(self) -> dict[int, int]:
        """Rows per key version over the whole lake."""
        out: dict[int, int] = {}
        for f in self.files:
            for v, n in f.versions.items():
                out[v] = out.get(v, 0) + n
        return dict(sorted(out.items()))

    def status_rows(self, files: Iterable[FileSummary] | None = None) -> dict[str, int]:
        """Rows per status (current, stale, retired, unknown, missing)."""
        out = {s: 0 for s in _STATUSES}
        for f in self.files if files is None else files:
            for s, n in f.status_rows(self.policy).items():
                if s in out:
                    out[s] += n
        return out

    def totals(self) -> dict[str, Any]:
        rows = sum(f.rows for f in self.files)
        status = self.status_rows()
        return {
            "files": len(self.files),
            "unreadable_files": len(self.unreadable()),
            "rows": rows,
            "active_version": self.policy.active.version,
            "versions": {str(v): n for v, n in self.versions().items()},
            "status_rows": status,
            "current_fraction": (status["current"] / rows) if rows else 1.0,
            "stale_files": len(self.stale_files()),
            "current_files": len(self.current_files()),
        }

    def by_partition(self) -> dict[str, dict[str, Any]]:
        """Per partition: files, rows, rows and files per version, rows per status, fraction current."""
        out: dict[str, dict[str, Any]] = {}
        for f in self.files:
            p = out.setdefault(
                f.partition,
                {"files": 0, "rows": 0, "unreadable_files": 0, "rows_by_version": {}, "files_by_version": {}, "stale_files": 0},
            )
            p["files"] += 1
            p["rows"] += f.rows
            p["unreadable_files"] += 0 if f.readable else 1
            p["stale_files"] += 1 if f.needs_rewrite(self.policy) else 0
            for v, n in f.versions.items():
                p["rows_by_version"][str(v)] = p["rows_by_version"].get(str(v), 0) + n
                p["files_by_version"][str(v)] = p["files_by_version"].get(str(v), 0) + 1
        for partition, p in out.items():
            files = [f for f in self.files if f.partition == partition]
            p["status_rows"] = self.status_rows(files)
            p["current_fraction"] = (p["status_rows"]["current"] / p["rows"]) if p["rows"] else 1.0
            p["rows_by_version"] = dict(sorted(p["rows_by_version"].items(), key=lambda kv: int(kv[0])))
            p["files_by_version"] = dict(sorted(p["files_by_version"].items(), key=lambda kv: int(kv[0])))
        return dict(sorted(out.items()))

    def problems(self) -> list[dict[str, Any]]:
        """Files needing a human: unreadable, another dataset, or holding retired/unknown/missing rows."""
        out = []
        for f in self.files:
            if not f.readable:
                out.append({"path": f.relpath, "partition": f.partition, "reason": "unreadable", "detail": f.error})
                continue
            if self.dataset is not None and f.dataset is not None and f.dataset != self.dataset:
                out.append(
                    {"path": f.relpath, "partition": f.partition, "reason": "foreign_dataset",
                     "detail": f"footer names dataset {f.dataset!r}, not {self.dataset!r}; left untouched"}
                )
            if f.legacy_plain:
                out.append(
                    {"path": f.relpath, "partition": f.partition, "reason": "legacy_plain_column", "rows": f.rows,
                     "detail": f"contract column(s) {', '.join(f.legacy_plain)} held in clear (written before they "
                     "joined the contract): never returned by decrypt, reencrypt leaves the file; re-encrypt it "
                     "from its plain source"}
                )
            if f.contract_problems:
                out.append(
                    {"path": f.relpath, "partition": f.partition, "reason": "contract_violation", "rows": f.rows,
                     "detail": "; ".join(f.contract_problems) + " (the dataset contract says ciphertext); "
                     "its rows are quarantined on read"}
                )
            status = f.status_rows(self.policy)
            for reason in ("retired", "unknown", "missing", "corrupt"):
                if status[reason]:
                    out.append(
                        {"path": f.relpath, "partition": f.partition, "reason": reason, "rows": status[reason],
                         "detail": f"{status[reason]} rows {_WHY[reason]}; left as they are"}
                    )
        return out

    def to_dict(self, *, with_files: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"lake": self.lake.uri, "dataset": self.dataset, **self.totals()}
        out["partitions"] = self.by_partition()
        out["problems"] = self.problems()
        if with_files:
            out["file_list"] = [f.to_dict(self.policy) for f in self.files]
        return out


_WHY = {
    "retired": "are under a retired key version",
    "unknown": "name a DEK the key registry's directory does not know (or a key version the registry does not know)",
    "missing": "carry no key-version metadata",
    "corrupt": "name a DEK whose directory entry does not match them",
}


def take_inventory(
    lake: Lake,
    policy: KeyPolicy,
    *,
    dataset: str | None = None,
    threads: int = 8,
    directory: DekDirectory | None = None,
    contract: DatasetContract | None = None,
    data_files: Sequence[DataFile] | None = None,
) -> Inventory:
    """Read every data file's footer (in `threads` threads) and build the inventory.

    `dataset`, if given, marks files whose footer names another dataset as
    foreign (reported, never rewritten). With the key registry's DEK
    `directory`, each file's rows are counted under the key version that
    wraps their DEK *now* (the directory's), so a lake rewrapped in the
    directory is current with every file untouched; rows whose DEK the
    directory does not know are ``unknown``. With the dataset's `contract`,
    a file whose schema breaks it (a contract column missing or not
    ciphertext: a downgrade) is reported as a problem; its rows are not
    counted as readable. A missing lake directory is an empty inventory;
    call `lake.require()` first to make it an error. `data_files` (from
    `lake.data_files()`) limits the inventory to those files.
    """
    data_files = lake.data_files() if data_files is None else list(data_files)
    if threads > 1 and len(data_files) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            files = list(pool.map(lambda df: read_file_summary(lake, df), data_files))
    else:
        files = [read_file_summary(lake, df) for df in data_files]
    seen, known = apply_directory(files, directory, dataset) if directory is not None else (0, None)
    if contract is not None:
        from keyturn.arrow_codec import contract_violations, legacy_plain_columns

        for f in files:
            if f.readable and f.schema is not None and f.rows:
                f.contract_problems = contract_violations(f.schema, contract, f.dek_revision)
                if not f.contract_problems:
                    f.legacy_plain = legacy_plain_columns(f.schema, contract)
                if f.contract_problems:  # a downgraded file: none of its rows will be read as clear data
                    f.corrupt_rows += sum(f.versions.values())
                    f.versions = {}
    return Inventory(lake, policy, files, dataset, deks_seen=seen, deks_known=known)


def apply_directory(files: Sequence[FileSummary], directory: DekDirectory, dataset: str | None) -> tuple[int, int]:
    """Recount each file's rows by the directory's key version of their DEK (one lookup per 100 DEKs).

    A DEK the directory does not know counts as unknown; an entry for
    another place (dataset, partition) than the file's, or (when the file's
    birth envelopes were read) one that does not match its envelope, as
    corrupt. Files that cannot be read are left as they are. Returns (distinct
    dek ids the files name, how many of them the directory knows).
    """
    ids = sorted({d for f in files for d in f.dek_rows})
    entries: dict[bytes, DekEntry] = {}
    for lo in range(0, len(ids), LOOKUP_BATCH):
        entries.update(directory.lookup_deks(ids[lo : lo + LOOKUP_BATCH]))
    for f in files:
        if not f.readable:
            continue
        where = Location(f.dataset or dataset or "?", f.partition)
        versions: dict[int, int] = {}
        unknown = corrupt = 0
        oldest = None
        f.unknown_by_version = {}
        revision: int | None = 0  # the newest contract revision of its DEKs; None once one DEK has none
        for dek_id, n in f.dek_rows.items():
            entry = entries.get(dek_id)
            birth = None if f.births is None else f.births.get(dek_id)
            if entry is None:
                unknown += n
                born = birth.key_version if birth is not None else (next(iter(f.versions)) if len(f.versions) == 1 else None)
                f.unknown_by_version[born] = f.unknown_by_version.get(born, 0) + n
            elif (entry.dataset, entry.partition) != (where.dataset, where.partition) or (
                birth is not None and not entry_matches(entry, birth, where)
            ):
                corrupt += n
            else:
                versions[entry.key_version] = versions.get(entry.key_version, 0) + n
                oldest = entry.created_at if oldest is None or entry.created_at < oldest else oldest
                if revision is not None:
                    revision = max(revision, entry.contract_revision) if entry.contract_revision else None
        f.versions = dict(sorted(versions.items()))
        f.unknown_rows, f.corrupt_rows = unknown, corrupt
        f.missing_rows = max(0, f.rows - sum(versions.values()) - unknown - corrupt)
        f.oldest_dek = oldest
        f.dek_revision = revision or None
        f.effective = True
    return len(ids), len(entries)


# -- does the lake belong to this key home? -------------------------------------


def keyturn_marked(f: FileSummary) -> bool:
    """True if a readable file shows any sign keyturn wrote it: a ``keyturn`` footer, a key column, keyturn field metadata."""
    if not f.readable:
        return False
    if f.dataset is not None or f.source == "footer":
        return True
    schema = f.schema
    if schema is None:
        return False
    if VERSION_FIELD in schema.names or DEK_FIELD in schema.names:
        return True
    return any(fl.metadata and b"keyturn.format" in fl.metadata for fl in schema)


def _directory_has_dataset(directory: DekDirectory, dataset: str) -> bool:
    after = None
    while True:
        page = directory.list_deks(after=after, limit=LOOKUP_BATCH * 10)
        if not page:
            return False
        if any(e.dataset == dataset for e in page):
            return True
        after = page[-1].dek_id


def _names(values: Iterable[str]) -> str:
    return ", ".join(repr(v) for v in sorted(values))


def check_fits_home(
    inventory: Inventory,
    *,
    home: str,
    dataset: str,
    contract: DatasetContract | None,
    directory: DekDirectory | None,
) -> list[dict[str, Any]]:
    """Check that `inventory` (taken with the home's `directory`) is a keyturn lake this key home can read.

    Raises `NotAKeyturnLakeError` when the lake has readable data files,
    none of them shows a sign of keyturn (`keyturn_marked`), and the home
    has neither a contract nor a DEK for `dataset`. Raises
    `WrongKeyHomeError` when the files name DEKs, the directory knows none
    of them, and every footer that names a dataset names another one than
    `dataset`. Both are usage errors (exit code 2): the wrong `--lake` or
    `--home` was given, nothing is wrong with the data.

    Returns lake-level problems (exit code 3) for the cases that may be
    either a wrong home or a damaged key home, so the report still counts
    every row: ``no_known_dek`` (same dataset, but the directory knows none
    of the lake's DEKs: a wrong home, or a lost directory that `keyturn
    directory rebuild` recreates) and ``no_keyturn_files`` (no file shows a
    sign of keyturn although the home has a contract for the dataset).
    `home` names the key home in messages. An empty lake passes.
    """
    readable = inventory.readable()
    if not readable:
        return []
    lake = inventory.lake.uri
    problems: list[dict[str, Any]] = []
    if not any(keyturn_marked(f) for f in readable):
        if contract is None and (directory is None or not _directory_has_dataset(directory, dataset)):
            raise NotAKeyturnLakeError(
                f"{lake} is not a keyturn lake: none of its {len(readable):,} readable data file(s) carries keyturn "
                f"key columns or a keyturn footer, and the key home {home} has no contract or DEK for dataset "
                f"{dataset!r} (wrong --lake? `keyturn encrypt` makes a lake from plain Parquet)"
            )
        problems.append({
            "path": None, "partition": None, "reason": "no_keyturn_files", "rows": sum(f.rows for f in readable),
            "detail": f"none of the lake's {len(readable):,} readable data file(s) carries keyturn key columns or a "
            f"keyturn footer, though the key home {home} has a contract for dataset {dataset!r}: is --lake the "
            "plain source rather than the lake, or were the files replaced?",
        })
        return problems
    if inventory.deks_known == 0 and inventory.deks_seen:
        named = {f.dataset for f in readable if f.dataset is not None}
        rows = sum(sum(f.dek_rows.values()) for f in readable)
        if named and dataset not in named:
            raise WrongKeyHomeError(
                f"this lake's files belong to dataset {_names(named)}; the key home {home} is for dataset "
                f"{dataset!r} and knows none of the lake's {inventory.deks_seen:,} DEK(s) (wrong --home?)"
            )
        problems.append({
            "path": None, "partition": None, "reason": "no_known_dek", "rows": rows,
            "detail": f"the key home {home} (dataset {dataset!r}) knows none of this lake's "
            f"{inventory.deks_seen:,} DEK(s): wrong --home, or its DEK directory was lost "
            f"(run `keyturn directory rebuild --lake {lake}`)",
        })
    return problems
