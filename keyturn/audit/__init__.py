"""Audit side outputs and the hash-chained control-plane log.

`events` holds the structured events (audit, version mismatch, quarantine)
with deterministic ids; `chain` holds the append-only, hash-chained JSON Lines
log for control-plane events. Neither ever holds key material. This package
re-exports both modules' public names.
"""

from keyturn.audit import chain, events
from keyturn.audit.chain import *  # noqa: F401,F403  (the names of chain.__all__)
from keyturn.audit.events import *  # noqa: F401,F403  (the names of events.__all__)

__all__ = [*events.__all__, *chain.__all__]
