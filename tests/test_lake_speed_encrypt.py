"""Issue 12, lake jobs: encrypt keeps batches in the process that read them, and a large job uses every core.

- On the default runner, read -> encrypt -> write is one fused stage: no
  record batch is decoded from Arrow IPC between steps (counted at the one
  deserializer keyturn's coders and `PartitionBatches` use).
- `lake_job_args`: with no Beam option, a large job gets one worker thread
  per core; any option the user gives (or a small job) leaves it alone.
- The worker threads really share the files, and that path keeps every
  guarantee: each row accounted for, staged then committed, and the data
  decrypts back.
"""

from __future__ import annotations

import threading
import time

import pytest

import keyturn.transforms.coders
import keyturn.transforms.partition
from keyturn.pipelines import decrypt, encrypt
from keyturn.pipelines import runner
from keyturn.pipelines.runner import PARALLEL_MIN_ROWS, lake_job_args
from tests.pipeline_support import SENSITIVE, customers, data_files, make_home, read_hive, same_values, write_parquet_source

pytestmark = pytest.mark.beam


def test_lake_job_args_adds_worker_threads_only_for_a_large_job_without_options():
    big = PARALLEL_MIN_ROWS
    assert lake_job_args(None, rows=big, items=10, cores=2) == [
        "--direct_num_workers=2", "--direct_running_mode=multi_threading",
    ]
    assert lake_job_args([], rows=big, items=3, cores=4) == [
        "--direct_num_workers=3", "--direct_running_mode=multi_threading",
    ]
    assert lake_job_args(None, rows=big - 1, items=10, cores=2) == []  # small: the split would save little
    assert lake_job_args(None, rows=big, items=1, cores=2) == []  # one file: nothing to share
    assert lake_job_args(None, rows=big, items=10, cores=1) == []
    given = ["--direct_num_workers=1"]
    assert lake_job_args(given, rows=big, items=10, cores=2) == given  # the user's options win, whatever they are
    assert lake_job_args(["--runner=DirectRunner"], rows=big, items=10, cores=2) == ["--runner=DirectRunner"]


def test_encrypt_decodes_no_batch_between_steps(tmp_path, monkeypatch):
    """No batch crosses a stage boundary: none is read back from Arrow IPC on the way from read to write.

    (Beam still *encodes* a sampled output element to estimate its size for
    its byte counters; that is `RecordBatchCoder.estimate_size`, not transport.)
    """
    calls = []

    def counting(real):
        def batch_from_ipc(data, *args, **kwargs):
            calls.append(len(data))
            return real(data, *args, **kwargs)
        return batch_from_ipc

    for module in (keyturn.transforms.coders, keyturn.transforms.partition):
        monkeypatch.setattr(module, "batch_from_ipc", counting(module.batch_from_ipc))
    home = make_home(tmp_path / "home")
    src = write_parquet_source(tmp_path / "src", customers(900, partitions=3), files=3)
    report = encrypt.run(home=home, source=src, lake=str(tmp_path / "lake"), columns=SENSITIVE, partition_by="region")
    assert report.rows_written == 900
    assert report.files_written == 3  # the files of the bundle share each partition's lake file
    assert calls == []


def test_a_large_job_runs_on_worker_threads_with_every_guarantee(tmp_path, monkeypatch):
    seen, readers = [], set()
    real, real_read = encrypt._run_pipeline, encrypt.read_batches

    def spy(beam_args, **steps):
        seen.append(list(beam_args or []))
        return real(beam_args, **steps)

    def reading(*args, **kwargs):
        readers.add(threading.get_ident())
        time.sleep(0.2)  # a file takes a moment to read: the other worker takes the next one meanwhile
        return real_read(*args, **kwargs)

    monkeypatch.setattr(encrypt, "_run_pipeline", spy)
    monkeypatch.setattr(encrypt, "read_batches", reading)
    monkeypatch.setattr(runner, "PARALLEL_MIN_ROWS", 1)  # this small source counts as large
    monkeypatch.setattr(runner, "available_cores", lambda: 2)
    home = make_home(tmp_path / "home")
    table = customers(1200, partitions=3)
    src = write_parquet_source(tmp_path / "src", table, files=4)
    lake = tmp_path / "lake"
    report = encrypt.run(home=home, source=src, lake=str(lake), columns=SENSITIVE, partition_by="region")
    assert seen == [["--direct_num_workers=2", "--direct_running_mode=multi_threading"]]
    assert len(readers) == 2  # both worker threads read files
    assert (report.rows_source, report.rows_written, report.rows_skipped) == (1200, 1200, 0)
    assert 3 <= report.files_written <= 6 and len(data_files(lake)) == report.files_written
    assert not (lake / "_keyturn" / "staging").exists() or not list((lake / "_keyturn" / "staging").iterdir())
    out = tmp_path / "plain"
    decrypt.run(home=home, lake=str(lake), out=str(out), beam_args=["--direct_num_workers=1"])
    assert same_values(read_hive(out), table, ["id", "email", "ssn"])
