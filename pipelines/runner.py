"""The runner every keyturn lake pipeline uses by default, and the options that pick it.

`pipeline_options(beam_args)` builds the `PipelineOptions` every lake
pipeline uses. With no `--runner`, or with ``--runner=DirectRunner``, the
pipeline runs on `DirectBatchRunner`: the FnApiRunner, which is the engine
Beam's DirectRunner picks for a batch pipeline, taken directly, with every
pipeline option (``--direct_num_workers``, ``--direct_running_mode`` and the
rest) handed to it and its SDK workers. Beam 2.77's DirectRunner itself
would first try to download and start the Prism runner from GitHub, and a
pipeline holding ``GroupIntoBatches`` (`PartitionBatches`, which encrypt
used before it gathered rows within a bundle on this runner: its
processing-time buffering timer exists even without a buffering
duration) it sends to the BundleBasedDirectRunner instead, which fails an
assertion in its GroupByKey when a combine (the audit side output's
``ToList``) follows the stateful step. Any other ``--runner`` (PortableRunner,
DataflowRunner, FlinkRunner, ...) is passed to Beam as given, except a
runner keyturn refuses (Beam's DaskRunner misroutes tagged outputs, see
`keyturn.transforms.runners` and docs/RUNNERS.md): `ConfigError` (exit code 2).

`lake_job_args(beam_args, rows=, items=)` is what the encrypt and ingest
jobs hand to `pipeline_options`: when the user passed no
Beam option at all and the job is large (at least `PARALLEL_MIN_ROWS` rows
over two or more work items), it adds ``--direct_num_workers=<cores>
--direct_running_mode=multi_threading``, so one worker thread per core
reads, seals and writes its share of the files. Threads, not processes:
nearly all of a lake job's time is spent where the GIL is released
(Parquet reading and writing, Arrow takes, the native kernel, hashing), so
threads use both cores, without the worker processes' start-up (about 3 s)
and without every element crossing a process boundary; measured on the
same 5.6M-row job on 2 cores, worker processes used about 1.6 times the CPU
of one thread, worker threads about 1.1 times (BENCHMARKS.md section 7).
Smaller jobs stay on one thread: their split saves little. Any Beam
option given (``-- --direct_num_workers=1``, a ``--runner``,
``--direct_running_mode=multi_processing``) turns this off.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineRunner

import keyturn.transforms.coders  # noqa: F401  (registers RecordBatchCoder)
from keyturn.errors import ConfigError
from keyturn.transforms.runners import runner_problem

__all__ = ["DEFAULT_RUNNER", "PARALLEL_MIN_ROWS", "DirectBatchRunner", "available_cores", "lake_job_args", "pipeline_options",
           "runs_in_process_engine"]

DEFAULT_RUNNER = "keyturn.pipelines.runner.DirectBatchRunner"
PARALLEL_MIN_ROWS = 2_000_000
"""Rows from which a lake job with no Beam options runs on one worker thread per core."""


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def runs_in_process_engine(options: PipelineOptions) -> bool:
    """Whether `options` (from `pipeline_options`) run on `DirectBatchRunner`, whose bundles are large
    (all of a stage's input, or one share per worker), so a step may gather rows within a bundle."""
    from apache_beam.options.pipeline_options import StandardOptions

    return options.view_as(StandardOptions).runner == DEFAULT_RUNNER


def lake_job_args(beam_args: Sequence[str] | None, *, rows: int, items: int, cores: int | None = None) -> list[str]:
    """`beam_args`, or for a large job given no Beam option, the worker-thread options (see the module doc).

    `rows`: the rows the job will process; `items`: its independent work
    items (source files, partitions), at most one worker thread each.
    """
    args = list(beam_args or [])
    cores = available_cores() if cores is None else cores
    workers = min(cores, items)
    if args or workers < 2 or rows < PARALLEL_MIN_ROWS:
        return args
    return [f"--direct_num_workers={workers}", "--direct_running_mode=multi_threading"]


class DirectBatchRunner(PipelineRunner):
    """The DirectRunner's batch engine, the FnApiRunner, without the DirectRunner's detours.

    Built the way Beam's DirectRunner builds it for a batch pipeline: the
    pipeline options are provisioned to the SDK workers (the worker
    processes of ``--direct_running_mode=multi_processing`` read them, for
    example ``--default_sdk_harness_log_level``). When the driver silenced
    Beam's loggers (the CLI without --debug), the worker processes' stderr
    goes to the null device: they log what they do and every traceback at
    start-up, before any option reaches them, and an error they hit comes
    back to the driver anyway (the CLI reports it as one line).
    """

    def run_pipeline(self, pipeline: beam.Pipeline, options: PipelineOptions) -> Any:
        from apache_beam.options.pipeline_options import DirectOptions
        from apache_beam.portability.api import beam_provision_api_pb2
        from apache_beam.runners.portability.fn_api_runner import fn_runner
        from apache_beam.runners.portability.portable_runner import JobServiceHandle
        from apache_beam.transforms.environments import SubprocessSDKEnvironment

        encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
        provision = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
        direct = options.view_as(DirectOptions)
        if direct.direct_running_mode != "multi_processing" or not _beam_silenced():
            return fn_runner.FnApiRunner(provision_info=provision).run_pipeline(pipeline, options)
        # The FnApiRunner's own multi-processing command, its stderr to the null device. The FnApiRunner
        # replaces its environment only for the multi_* modes, so it runs with in_memory set meanwhile (its
        # workers were given the real options above); it runs the pipeline to the end before it returns.
        command = f"{shlex.quote(sys.executable)} -m apache_beam.runners.worker.sdk_worker_main 2>{os.devnull}"
        environment = SubprocessSDKEnvironment.from_command_string(command_string=command)
        runner = fn_runner.FnApiRunner(default_environment=environment, provision_info=provision)
        direct.direct_running_mode = "in_memory"
        try:
            return runner.run_pipeline(pipeline, options)
        finally:
            direct.direct_running_mode = "multi_processing"


def _beam_silenced() -> bool:
    return logging.getLogger("apache_beam").getEffectiveLevel() > logging.CRITICAL


# Names under which Beam's create_runner finds its (switching) DirectRunner.
_DIRECT_RUNNER_NAMES = frozenset({"direct", "directrunner", "switchingdirectrunner"})
_DIRECT_RUNNER_MODULE = "apache_beam.runners.direct.direct_runner"


def _runner_arg(args: Sequence[str]) -> tuple[int, int, str] | None:
    """(first index, index after, runner name) of the last ``--runner`` option in `args`, or None."""
    found = None
    for i, arg in enumerate(args):
        if arg.startswith("--runner="):
            found = (i, i + 1, arg.split("=", 1)[1])
        elif arg == "--runner" and i + 1 < len(args):
            found = (i, i + 2, args[i + 1])
    return found


def _is_direct_runner(name: str) -> bool:
    module, _, cls = name.strip().rpartition(".")
    return cls.lower() in _DIRECT_RUNNER_NAMES and module in ("", _DIRECT_RUNNER_MODULE)


def pipeline_options(beam_args: Sequence[str] | None = None) -> PipelineOptions:
    """`PipelineOptions(beam_args)`; no runner or the DirectRunner means `DirectBatchRunner` (see the module doc).

    `ConfigError` (field ``runner``) for a runner keyturn refuses (DaskRunner).

    Unless `beam_args` set ``--default_sdk_harness_log_level``, SDK worker
    processes log at the driver's level (the CLI's: ERROR, INFO with --debug).
    """
    args = list(beam_args or [])
    found = _runner_arg(args)
    problem = runner_problem(found[2]) if found is not None else None
    if problem is not None:  # refused before Beam even tries to build it (see keyturn.transforms.runners)
        raise ConfigError("runner", f"--runner={found[2]}: {problem}")
    streaming = any(a == "--streaming" or a.startswith("--streaming=") for a in args)
    if found is None:
        args.append(f"--runner={DEFAULT_RUNNER}")
    elif _is_direct_runner(found[2]) and not streaming:
        start, end, _ = found
        args[start:end] = [f"--runner={DEFAULT_RUNNER}"]
    if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        if isinstance(level, str) and level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            args.append(f"--default_sdk_harness_log_level={level}")
    return PipelineOptions(args)


# ------------------------------------------------------------------ footers


# ------------------------------------------------------------------ writes (through keyturn.lake)


# ------------------------------------------------------------------ DoFns


