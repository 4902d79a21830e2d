"""Helpers for the CLI, home and status tests: run `keyturn` in-process, and write small lakes directly.

`write_encrypted_file` writes one lake file the way the pipelines do (the
core codec under the home's active key, the "keyturn" footer, an atomic
write) without running Beam, so status tests stay fast and independent of
the pipelines.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from keyturn.arrow_codec import encrypt_batch
from keyturn.contract import settle_arrow_contract
from keyturn.lake.footer import dek_counts
from keyturn.lake import Lake, footer_for, write_parquet_atomically
from keyturn.scope import DekScope, Location


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run_cli(*argv: str, env: dict[str, str] | None = None) -> Result:
    """`keyturn.pipelines.cli.main(argv)` in this process, with stdout and stderr captured."""
    from keyturn.pipelines.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    try:
        os.environ.update(env or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Result(code, out.getvalue(), err.getvalue())


def customers(n: int, start: int = 0) -> pa.RecordBatch:
    ids = list(range(start, start + n))
    return pa.record_batch(
        {
            "id": pa.array(ids, pa.int64()),
            "email": [f"user{i}@example.com" for i in ids],
            "spend": [float(i) for i in ids],
        }
    )


def write_encrypted_file(home: Any, lake_dir: str, partition: str, batch: pa.RecordBatch, columns=("email",)) -> str:
    """Encrypt `batch` under the home's active version and write it as one lake file; returns its path."""
    lake = Lake(lake_dir)
    policy = home.policy()
    registry = home.registry()
    contract = settle_arrow_contract(registry, home.dataset, batch.schema, list(columns), actor="tests")
    where = Location(home.dataset, partition)
    with home.kms() as kms, DekScope(
        kms, policy.active, where, directory=registry, contract_revision=contract.revision
    ) as scope:
        sealed = encrypt_batch(batch, list(columns), scope)
    footer = footer_for(
        home.dataset, partition, {policy.active.version: batch.num_rows}, batch.num_rows, columns, dek_counts(sealed)
    )
    path = lake.path(partition, f"part-{uuid.uuid4().hex}.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_parquet_atomically(lake, path, pa.Table.from_batches([sealed]), footer)
    return path


def write_versioned_plain_file(lake_dir: str, partition: str, version: int | None, rows: int) -> str:
    """A Parquet file written by "another tool": no keyturn footer, a `_keyturn_version` column (or none)."""
    data: dict[str, Any] = {"id": list(range(rows))}
    if version is not None:
        data["_keyturn_version"] = pa.array([version] * rows, pa.int64())
    path = os.path.join(lake_dir, partition, f"part-{uuid.uuid4().hex}.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(data), path)
    return path


def snapshot(directory: str) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
    return out
