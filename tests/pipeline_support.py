"""Helpers for the lake pipeline tests: key homes, synthetic plain sources, lake views.

Sources are small synthetic customer tables with PII (email, ssn), a
partition column (region) and non-sensitive columns, written as Parquet or
Avro files, flat or hive-partitioned. Lakes and decrypt outputs are read
back with `pyarrow.dataset` (hive partitioning), as any other reader would.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from keyturn.home import KeyHome

SENSITIVE = ["email", "ssn"]
REPO = Path(__file__).resolve().parents[1]


def make_home(path: str | os.PathLike[str], dataset: str = "customers") -> KeyHome:
    return KeyHome.init(path, dataset=dataset, actor="tests")


def customers(rows: int, *, partitions: int = 4, start: int = 0) -> pa.Table:
    """`rows` customers with ids start..start+rows-1; region = id % partitions; some ssn are null."""
    ids = list(range(start, start + rows))
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "region": pa.array([i % partitions for i in ids], pa.int64()),
            "email": [f"user{i}@example.com" for i in ids],
            "ssn": [None if i % 9 == 0 else f"{100 + i % 800:03d}-{i % 97:02d}-{i % 9973:04d}" for i in ids],
            "spend": [round(i * 1.25, 2) for i in ids],
            "signup": pa.array([dt.date(2024, 1, 1) + dt.timedelta(days=i % 365) for i in ids], pa.date32()),
        }
    )


def write_parquet_source(directory: str | os.PathLike[str], table: pa.Table, *, files: int = 2, hive_by: str | None = None) -> str:
    """Write `table` as `files` Parquet files under `directory` (hive-partitioned by `hive_by` if given)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    if hive_by is None:
        step = -(-table.num_rows // files)
        for k in range(files):
            pq.write_table(table.slice(k * step, step), root / f"data-{k}.parquet", row_group_size=max(1, step // 3))
        return str(root)
    for value in sorted(set(table.column(hive_by).to_pylist())):
        part = table.filter(pc.equal(table[hive_by], value)).drop_columns([hive_by])
        (root / f"{hive_by}={value}").mkdir(exist_ok=True)
        pq.write_table(part, root / f"{hive_by}={value}" / "part-0.parquet")
    return str(root)


AVRO_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Customer",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "region", "type": "int"},
        {"name": "email", "type": "string"},
        {"name": "ssn", "type": ["null", "string"]},
        {"name": "spend", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}},
        {"name": "seen", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "tier", "type": {"type": "enum", "name": "Tier", "symbols": ["gold", "silver"]}},
    ],
}


def avro_records(rows: int, *, start: int = 0, partitions: int = 3) -> list[dict[str, Any]]:
    t0 = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)
    return [
        {
            "id": i,
            "region": i % partitions,
            "email": f"user{i}@example.com",
            "ssn": None if i % 7 == 0 else f"{i:09d}",
            "spend": Decimal(i) / 4,
            "seen": t0 + dt.timedelta(seconds=i),
            "tier": "gold" if i % 2 else "silver",
        }
        for i in range(start, start + rows)
    ]


def write_avro(path: str | os.PathLike[str], records: Sequence[Mapping[str, Any]]) -> str:
    import fastavro

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(AVRO_SCHEMA), list(records))
    return str(path)


def read_hive(path: str | os.PathLike[str]) -> pa.Table:
    """Everything under `path` via pyarrow.dataset with hive partitioning, sorted by id."""
    table = ds.dataset(str(path), partitioning="hive", format="parquet").to_table()
    return table.sort_by("id")


def data_files(path: str | os.PathLike[str]) -> list[str]:
    """Relative paths of data files (no hidden or `_` names anywhere in the path)."""
    root = Path(path)
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith((".", "_")) for part in rel.parts):
            out.append(str(rel))
    return sorted(out)


def all_files(path: str | os.PathLike[str]) -> list[str]:
    root = Path(path)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def same_values(actual: pa.Table, expected: pa.Table, columns: Sequence[str]) -> bool:
    """Column values equal (as Python values), both sorted by id."""
    a = actual.sort_by("id")
    e = expected.sort_by("id")
    return all(a.column(c).to_pylist() == e.column(c).to_pylist() for c in columns)


def run_python(code: str, *, env: Mapping[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (the repo on sys.path); the process is always reaped."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))


def cli_command(*args: str) -> list[str]:
    """The argv of a `keyturn` command line run as a subprocess (``python -m keyturn.pipelines.cli ARGS``)."""
    return [sys.executable, "-m", "keyturn.pipelines.cli", *args]


def set_config(home_dir: str | os.PathLike[str], section: str, **values: Any) -> None:
    """Change settings of one section of a key home's config.yaml (for the next process that opens it)."""
    import yaml

    path = os.path.join(home_dir, "config.yaml")
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    raw.setdefault(section, {}).update(values)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(raw, fh, sort_keys=False)


def run_cli(args: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`keyturn ARGS` in a fresh interpreter."""
    return run_python(f"import sys; from keyturn.pipelines.cli import main; sys.exit(main({list(args)!r}))", env=env, timeout=timeout)
