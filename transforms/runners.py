"""Runner checks: keyturn refuses to build on a Beam runner known to misroute its outputs.

Every keyturn transform returns several tagged outputs (`main`,
`version_mismatch`, `quarantine`, `audit`) and emits its audit events in
``finish_bundle``. Beam's DaskRunner (2.77) breaks all three:

- it maps every consumer of a ParDo to the producer's whole output bag, not
  to the tag it consumes (``DaskBagVisitor.visit_transform`` keys its bags
  by the producing transform), so audit and quarantine elements arrive on
  other tags, and plaintext meant for `main` can reach a side-output sink;
- it computes only the last bag of the pipeline (``run_pipeline``:
  ``dask.optimize(list(bags.values())[-1])``), so with two sinks only the
  last one is written;
- ``apply_dofn_to_bundle`` collects a bundle's outputs before calling
  ``finish_bundle``, so what a DoFn emits there (keyturn's audit events) is
  dropped.

A keyturn pipeline on it would lose or misfile rows without an error, so
`check_runner` raises `keyturn.errors.ConfigError` (field ``runner``) when
the pipeline is built (every keyturn PTransform calls it in ``expand``), and
`keyturn.pipelines.runner.pipeline_options` raises the same error for
``keyturn ... -- --runner=DaskRunner``. See docs/RUNNERS.md.
"""

from __future__ import annotations

from typing import Any

from keyturn.errors import ConfigError

__all__ = ["REFUSED_RUNNERS", "runner_problem", "check_runner"]

REFUSED_RUNNERS = {
    "daskrunner": (
        "Beam's DaskRunner routes tagged outputs to the wrong consumers, writes only the pipeline's last sink "
        "and drops what finish_bundle emits, so keyturn's audit, quarantine and data outputs would be lost or "
        "misfiled; run on the DirectRunner, a portable runner (Flink, Spark) or Dataflow (see docs/RUNNERS.md)"
    ),
}


def runner_problem(runner: Any) -> str | None:
    """Why keyturn refuses `runner` (a name such as ``"DaskRunner"`` or a dotted path, a runner class or
    instance), or None if it does not."""
    if runner is None:
        return None
    if isinstance(runner, str):
        names = [runner.strip().rpartition(".")[2]]
    else:
        cls = runner if isinstance(runner, type) else type(runner)
        names = [c.__name__ for c in cls.__mro__]
    for name in names:
        problem = REFUSED_RUNNERS.get(name.lower())
        if problem is not None:
            return problem
    return None


def check_runner(pipeline: Any, what: str) -> None:
    """`ConfigError` if `pipeline` (a `beam.Pipeline`) runs on, or its options name, a refused runner.

    `what` names the transform being built, for the message.
    """
    if pipeline is None:
        return
    from apache_beam.options.pipeline_options import StandardOptions

    candidates = [getattr(pipeline, "runner", None)]
    options = getattr(pipeline, "_options", None)
    if options is not None:
        candidates.append(options.view_as(StandardOptions).runner)
    for runner in candidates:
        problem = runner_problem(runner)
        if problem is not None:
            raise ConfigError("runner", f"{what} cannot run on this pipeline's runner: {problem}")
