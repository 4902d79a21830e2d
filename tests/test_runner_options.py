"""Every runner option the README shows works with the `keyturn` CLI, run as a user runs it.

The README passes Beam options after a bare `--` (``-- --runner=DirectRunner
--direct_num_workers=2``, ``--direct_running_mode=multi_processing``, a
PortableRunner against Beam's local job service). Beam 2.77's DirectRunner
sent keyturn's encrypt pipeline (``GroupIntoBatches``, through
`PartitionBatches`) to its BundleBasedDirectRunner, which failed four
AssertionErrors in a GroupByKey (exit 1); it would also try to download the
Prism runner first. `keyturn.pipelines.runner.pipeline_options` now runs the
DirectRunner's batch engine, the FnApiRunner, directly
(`DirectBatchRunner`), with every option passed on.

Each end-to-end test runs the CLI as a subprocess, checks the exit code,
that a successful run writes nothing on stderr (no Beam or worker logs),
and that the data round-trips. Dataflow, Flink and Spark need a cluster or
a cloud project: the README says they are not tested here, and
`test_readme_names_only_runners_tested_here_or_marked_untested` keeps it so.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

from keyturn.pipelines import exitcodes
from keyturn.pipelines.runner import DEFAULT_RUNNER, DirectBatchRunner, pipeline_options
from test_cli_errors import REPO, _disable_kek, assert_one_line, init_home, keyturn_cli, visible_parquet, write_source

pytestmark = [pytest.mark.beam, pytest.mark.slow]

UNTESTED_RUNNERS = {"DataflowRunner", "FlinkRunner", "SparkRunner"}


# --------------------------------------------------------------------------- pipeline_options


@pytest.mark.parametrize(
    "runner_args",
    [
        [],
        ["--runner=DirectRunner"],
        ["--runner", "DirectRunner"],
        ["--runner=direct"],
        ["--runner=SwitchingDirectRunner"],
        ["--runner=apache_beam.runners.direct.direct_runner.DirectRunner"],
    ],
    ids=["none", "DirectRunner", "two-tokens", "direct", "SwitchingDirectRunner", "qualified"],
)
def test_no_runner_and_the_direct_runner_run_on_the_batch_engine(runner_args):
    options = pipeline_options([*runner_args, "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert options.view_as(StandardOptions).runner == DEFAULT_RUNNER == "keyturn.pipelines.runner.DirectBatchRunner"
    direct = options.view_as(DirectOptions)
    assert (direct.direct_running_mode, direct.direct_num_workers) == ("multi_processing", 2)


@pytest.mark.parametrize("runner", ["PortableRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", "FnApiRunner",
                                    "BundleBasedDirectRunner"])
def test_other_runners_are_passed_as_given(runner):
    assert pipeline_options([f"--runner={runner}"]).view_as(StandardOptions).runner == runner


def test_a_streaming_direct_runner_is_left_to_beam():
    options = pipeline_options(["--runner=DirectRunner", "--streaming"])
    assert options.view_as(StandardOptions).runner == "DirectRunner"


def test_sdk_workers_log_at_the_drivers_level_unless_told(monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.ERROR)
    assert pipeline_options([]).get_all_options()["default_sdk_harness_log_level"] == "ERROR"
    given = pipeline_options(["--default_sdk_harness_log_level=DEBUG"]).get_all_options()
    assert given["default_sdk_harness_log_level"] == "DEBUG"


def test_direct_batch_runner_is_what_beam_creates_from_the_name():
    from apache_beam.runners.runner import create_runner

    assert isinstance(create_runner(DEFAULT_RUNNER), DirectBatchRunner)


# --------------------------------------------------------------------------- the CLI, end to end


def _plain_rows(directory: Path) -> list[tuple[int, str]]:
    return sorted(
        (r["id"], r["email"])
        for p in visible_parquet(directory) for r in pq.read_table(p, columns=["id", "email"]).to_pylist()
    )


def _expected(total: int) -> list[tuple[int, str]]:
    return [(i, f"user{i}@example.com") for i in range(total)]


def _round_trip(tmp_path: Path, beam_args: list[str]) -> None:
    """encrypt and decrypt with `beam_args` after `--`: exit 0, nothing on stderr, the data back."""
    home = init_home(tmp_path)
    total = write_source(tmp_path / "src", 2, 400)
    lake, out = tmp_path / "lake", tmp_path / "plain"
    enc = keyturn_cli("--home", str(home), "encrypt", "--source", str(tmp_path / "src"), "--lake", str(lake),
                      "--columns", "email", "--partition-by", "region", "--", *beam_args, cwd=tmp_path)
    assert (enc.returncode, enc.stderr) == (0, ""), enc.stderr[-3000:]
    # a lake file per partition and bundle: one bundle in process, one per worker with two workers
    files = re.search(r"Encrypted 800 rows into (\d+) files in 3 partitions", enc.stdout)
    assert files is not None, enc.stdout
    assert int(files.group(1)) in ((3, 6) if "--direct_num_workers=2" in beam_args else (3,))
    dec = keyturn_cli("--home", str(home), "decrypt", "--lake", str(lake), "--out", str(out), "--", *beam_args,
                      cwd=tmp_path)
    assert (dec.returncode, dec.stderr) == (0, ""), dec.stderr[-3000:]
    assert _plain_rows(out) == _expected(total)


# What the README shows (the CLI section and "Running on other runners"); in_memory is Beam's default mode.
DIRECT_RUNNER_OPTIONS = {
    "DirectRunner": ["--runner=DirectRunner"],
    "DirectRunner-2-workers": ["--runner=DirectRunner", "--direct_num_workers=2"],
    "DirectRunner-multi-processing": ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                                      "--direct_num_workers=2"],
    "multi-threading": ["--direct_running_mode=multi_threading", "--direct_num_workers=2"],
}


@pytest.mark.parametrize("name", sorted(DIRECT_RUNNER_OPTIONS))
def test_encrypt_and_decrypt_with_the_readmes_direct_runner_options(name, tmp_path):
    _round_trip(tmp_path, DIRECT_RUNNER_OPTIONS[name])


def test_every_pipeline_verb_takes_the_direct_runner(tmp_path):
    """reencrypt, ingest and demo build their pipelines through the same options (ingest: PartitionBatches)."""
    direct = ["--", "--runner=DirectRunner", "--direct_num_workers=2"]
    home = init_home(tmp_path)
    total = write_source(tmp_path / "src", 1, 300)
    lake = tmp_path / "lake"
    enc = keyturn_cli("--home", str(home), "encrypt", "--source", str(tmp_path / "src"), "--lake", str(lake),
                      "--columns", "email", "--partition-by", "region", *direct, cwd=tmp_path)
    assert (enc.returncode, enc.stderr) == (0, ""), enc.stderr[-3000:]
    assert keyturn_cli("--home", str(home), "rotate", cwd=tmp_path).returncode == 0
    reenc = keyturn_cli("--home", str(home), "reencrypt", "--lake", str(lake), "--mode", "reencrypt", *direct,
                        cwd=tmp_path)
    assert (reenc.returncode, reenc.stderr) == (0, ""), reenc.stderr[-3000:]
    land = tmp_path / "land"
    write_source(land, 1, 50, start=total)
    ing = keyturn_cli("--home", str(home), "ingest", "--watch", str(land), "--lake", str(lake),
                      "--until-idle", "1", "--poll-interval", "0.2", *direct, cwd=tmp_path)
    assert (ing.returncode, ing.stderr) == (0, ""), ing.stderr[-3000:]
    out = tmp_path / "plain"
    dec = keyturn_cli("--home", str(home), "decrypt", "--lake", str(lake), "--out", str(out), *direct, cwd=tmp_path)
    assert (dec.returncode, dec.stderr) == (0, ""), dec.stderr[-3000:]
    assert _plain_rows(out) == _expected(total + 50)
    demo = keyturn_cli("--home", str(tmp_path / "demo-home"), "demo", "--rows", "2000", "--partitions", "2",
                       "--out", str(tmp_path / "demo"), *direct, cwd=tmp_path)
    assert (demo.returncode, demo.stderr) == (0, ""), demo.stderr[-3000:]


def test_an_error_on_worker_processes_is_one_line(tmp_path):
    """The workers' own tracebacks stay off stderr; the error comes back as text and keeps its code."""
    home = init_home(tmp_path)
    write_source(tmp_path / "src", 1, 50)
    _disable_kek(home)
    result = keyturn_cli("--home", str(home), "encrypt", "--source", str(tmp_path / "src"), "--lake",
                         str(tmp_path / "lake"), "--columns", "email", "--", "--runner=DirectRunner",
                         "--direct_running_mode=multi_processing", "--direct_num_workers=2", cwd=tmp_path)
    assert_one_line(result, exitcodes.UNAVAILABLE, "KEK 'kek-0001' is disabled")


def _start_local_job_service(workdir: Path) -> tuple[subprocess.Popen, int]:
    """Beam's local job service on localhost, on a port it picks; (process, port)."""
    port_file = workdir / "job.port"
    log = open(workdir / "job-service.log", "wb")  # noqa: SIM115  (closed with the process)
    proc = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main", "--port=0",
         f"--port_file={port_file}", f"--staging_dir={workdir / 'staging'}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + 120  # a start-up wait, not a speed assertion
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"local job service did not start:\n{(workdir / 'job-service.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def test_portable_runner_against_the_local_job_service(tmp_path):
    service = tmp_path / "service"
    service.mkdir()
    proc, port = _start_local_job_service(service)
    try:
        portable = ["--runner=PortableRunner", f"--job_endpoint=localhost:{port}", "--environment_type=LOOPBACK"]
        (tmp_path / "ok").mkdir()
        _round_trip(tmp_path / "ok", portable)
        (tmp_path / "bad").mkdir()
        home = init_home(tmp_path / "bad")
        write_source(tmp_path / "bad" / "src", 1, 50)
        _disable_kek(home)
        failed = keyturn_cli("--home", str(home), "encrypt", "--source", str(tmp_path / "bad" / "src"), "--lake",
                             str(tmp_path / "bad" / "lake"), "--columns", "email", "--", *portable, cwd=tmp_path)
        # the LOOPBACK worker runs in the CLI's process and prints the bundle's traceback: not on stderr
        assert_one_line(failed, exitcodes.UNAVAILABLE, "KEK 'kek-0001' is disabled")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- the README


def test_readme_names_only_runners_tested_here_or_marked_untested():
    readme = (REPO / "README.md").read_text()
    runners = set(re.findall(r"--runner=(\w+)", readme))
    tested = {"DirectRunner", "PortableRunner"}
    assert runners - tested <= UNTESTED_RUNNERS, runners - tested - UNTESTED_RUNNERS
    section = readme.split("## Running on other runners", 1)[1].split("\n## ", 1)[0]
    assert "not tested here" in section
    for runner in runners & UNTESTED_RUNNERS:
        assert runner in section
    modes = set(re.findall(r"--direct_running_mode=\s*(\w+)", readme)) | set(re.findall(r"`(\w+)`", section)) & {
        "in_memory", "multi_threading", "multi_processing"}
    shown = {" ".join(args) for args in DIRECT_RUNNER_OPTIONS.values()}
    for mode in modes - {"in_memory"}:  # in_memory: Beam's default, every case above that names no mode
        assert any(f"--direct_running_mode={mode}" in s for s in shown), mode
