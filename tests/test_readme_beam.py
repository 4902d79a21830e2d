"""README's "Beam in five minutes" runs as written, so it cannot drift from the code.

The section's code blocks run in order in a temporary directory: ``sh``
blocks line by line through the CLI (`cli_support.run_cli`, each must exit
0), ``python`` blocks in one shared namespace. Then the results are
checked: the lake decrypts (CLI and Beam) to the source, the Avro events
come back, and ``keyturn status`` counted every row.
"""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli_support import run_cli

pytestmark = pytest.mark.beam

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Beam in five minutes"


def section_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block of the section, in order."""
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    body = text[start : end if end != -1 else len(text)]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w+)\n(.*?)```", body, re.S)]


def test_the_section_has_the_promised_blocks():
    blocks = section_blocks()
    code = "\n".join(c for _, c in blocks)
    for needle in ("ReadFromParquetBatched", "EncryptBatches", "partition_by=", "WriteLake", "ReadLake",
                   "DecryptBatches", "WriteToParquetBatched", "ReadFromAvro", "EncryptRecords", "WriteToAvro",
                   "keyturn decrypt"):
        assert needle in code, needle
    assert {lang for lang, _ in blocks} == {"sh", "python"}


def test_the_readme_beam_section_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    outputs = {}
    for lang, code in section_blocks():
        if lang == "sh":
            for line in code.splitlines():
                if not line.strip():
                    continue
                argv = shlex.split(line)
                assert argv[0] == "keyturn", line
                result = run_cli(*argv[1:], "--json")
                assert result.code == 0, f"{line}: {result.err}"
                outputs[argv[1]] = result.json()
        else:
            exec(compile(code, f"README.md ({SECTION})", "exec"), namespace)  # noqa: S102 - our own README

    source = pq.read_table("source/part-0.parquet")
    key = lambda r: r["id"]  # noqa: E731
    expected = sorted(source.to_pylist(), key=key)
    assert outputs["status"]["rows"] == source.num_rows
    assert outputs["decrypt"]["rows_written"] == source.num_rows
    assert sorted(outputs["decrypt"]["partitions"]) == ["region=apac", "region=eu", "region=us"]
    back = pa.concat_tables([pq.read_table(f) for f in glob.glob("plain-beam/*.parquet")])
    assert sorted(back.to_pylist(), key=key) == expected
    events = [r for f in glob.glob("events-plain/*.avro") for r in fastavro.reader(open(f, "rb"))]
    assert sorted(events, key=key) == [{"id": i, "email": f"user{i}@example.com"} for i in range(100)]
    sealed = b"".join(open(f, "rb").read() for f in glob.glob("events-encrypted/*.avro"))
    assert b"user7@example.com" not in sealed
