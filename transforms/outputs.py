"""The outputs every keyturn transform returns."""

from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam

from keyturn.transforms.tags import AUDIT, MAIN, QUARANTINE, VERSION_MISMATCH

__all__ = ["KeyturnOutputs", "from_tagged"]


class KeyturnOutputs(NamedTuple):
    """main, version_mismatch, quarantine and audit PCollections (also by index)."""

    main: beam.PCollection
    version_mismatch: beam.PCollection
    quarantine: beam.PCollection
    audit: beam.PCollection


def from_tagged(tagged: beam.pvalue.DoOutputsTuple) -> KeyturnOutputs:
    return KeyturnOutputs(tagged[MAIN], tagged[VERSION_MISMATCH], tagged[QUARANTINE], tagged[AUDIT])
