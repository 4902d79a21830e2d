"""Re-wrapping a DEK envelope under another key version.

Only the wrapping fields of the envelope change (key version, KEK id,
wrapped DEK); the dek_id and commitment stay, so every cell sealed under the
DEK stays byte-for-byte identical. The KMS does the work (AWS ReEncrypt), so
the plaintext DEK never enters this process on this path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from keyturn.directory import DekDirectory, DekEntry, WrappingSwap, replace_one_by_one
from keyturn.errors import DecryptionError, KmsError
from keyturn.format import kms_context, parse_envelope
from keyturn.kms.base import KmsBackend
from keyturn.crash import crashpoint
from keyturn.policy import ReadStatus
from keyturn.scope import KekRef, Location

__all__ = ["rewrap_envelope", "rewrap_rows", "rewrap_entries", "DirectoryRewrap"]


def rewrap_envelope(kms: KmsBackend, envelope_bytes: bytes, location: Location, target: KekRef) -> tuple[bytes, str]:
    """Return (new envelope bytes, KMS request id). `DecryptionError` if the envelope is bad."""
    envelope = parse_envelope(envelope_bytes)
    source = kms_context(
        dataset=location.dataset, partition=location.partition, dek_id=envelope.dek_id, key_version=envelope.key_version
    )
    destination = kms_context(
        dataset=location.dataset, partition=location.partition, dek_id=envelope.dek_id, key_version=target.version
    )
    try:
        result = kms.rewrap(
            envelope.wrapped_dek,
            source_kek_id=envelope.kek_id,
            source_context=source,
            destination_kek_id=target.kek_id,
            destination_context=destination,
        )
    except KmsError:  # an outage or a closed client is never a verdict on the data
        raise
    except (ValueError, TypeError):  # the KMS refused an argument that came from the data
        raise DecryptionError() from None
    new = envelope.with_wrapping(key_version=target.version, kek_id=target.kek_id, wrapped_dek=result.wrapped)
    return new.to_bytes(), result.request_id


def rewrap_rows(
    kms: KmsBackend,
    status: list[ReadStatus],
    envelopes: Sequence[bytes | None],
    location: Location,
    target: KekRef,
) -> tuple[dict[bytes, bytes | None], list[str]]:
    """Re-wrap each distinct envelope of the `stale` rows once, shared by both codecs.

    Returns (replacement map: old envelope -> new envelope bytes, or None if
    it failed to re-wrap; KMS request ids). `status` is updated in place: a
    stale row whose envelope fails to re-wrap becomes `corrupt`. Rows in any
    other status are not touched. KMS outages raise.
    """
    replaced: dict[bytes, bytes | None] = {}
    request_ids: list[str] = []
    for i, s in enumerate(status):
        env = envelopes[i]
        if s is not ReadStatus.STALE or env is None:
            continue
        if env not in replaced:
            try:
                replaced[env], request_id = rewrap_envelope(kms, env, location, target)
                request_ids.append(request_id)
            except DecryptionError:
                replaced[env] = None
        if replaced[env] is None:
            status[i] = ReadStatus.CORRUPT
    return replaced, request_ids


@dataclass
class DirectoryRewrap:
    """What re-wrapping directory entries did. Holds no key material."""

    moved: int = 0  # entries now wrapped under the target version
    raced: int = 0  # entries someone else moved first (compare-and-set lost): nothing to do
    failed: list[str] = field(default_factory=list)  # dek ids whose envelope the KMS would not re-wrap
    kms_request_ids: list[str] = field(default_factory=list)

    @property
    def kms_calls(self) -> int:
        return len(self.kms_request_ids)


def rewrap_entries(
    directory: DekDirectory,
    kms: KmsBackend,
    entries: Iterable[DekEntry],
    target: KekRef,
    *,
    result: DirectoryRewrap | None = None,
    on_entry: Callable[[DekEntry], None] | None = None,
) -> DirectoryRewrap:
    """Re-wrap each entry's current envelope onto `target` in the KMS and swap it in, a batch at a time.

    One KMS call per entry (ReEncrypt on AWS: the DEK never enters this
    process there). The new envelopes are swapped in `swap_batch` at a time
    where the directory offers `replace_wrappings` (one SQLite transaction
    per batch, one DynamoDB write per entry), else one by one; each swap is
    a compare-and-set on the entry's envelope: a crash after the KMS calls
    and before the batch's swap leaves those entries on their old (still
    readable) wrapping and a rerun finishes them, and two concurrent runs
    never overwrite each other. `result.moved` counts only swaps that were
    written; `result.kms_request_ids` every KMS call made, swapped or not.
    Entries already on `target` are skipped without a KMS call. An envelope
    the KMS refuses (`DecryptionError`) is listed in `failed` and left as it
    is. KMS outages raise, after the entries re-wrapped before the outage
    are swapped in (their KMS work is not lost). `on_entry` is called with
    each entry once its swap was written (moved or lost to another run).
    """
    out = result if result is not None else DirectoryRewrap()
    many = getattr(directory, "replace_wrappings", None)
    batch = max(1, int(getattr(directory, "swap_batch", 1))) if many is not None else 1
    pending: list[tuple[DekEntry, WrappingSwap]] = []

    def swap() -> None:
        done = pending[:]
        pending.clear()
        if not done:
            return
        swaps = [s for _, s in done]
        moved = many(swaps) if many is not None else replace_one_by_one(directory, swaps)  # the one-entry call only
        out.moved += sum(moved)
        out.raced += len(moved) - sum(moved)
        if on_entry is not None:
            for entry, _ in done:
                on_entry(entry)

    for entry in entries:
        if entry.key_version == target.version:
            continue
        location = Location(entry.dataset, entry.partition)
        try:
            new, request_id = rewrap_envelope(kms, entry.envelope, location, target)
        except DecryptionError:
            out.failed.append(entry.dek_id.hex())
            continue
        except KmsError as outage:  # keep what the KMS already did for this batch, then report the outage itself
            try:
                swap()
            except Exception as lost:  # the batch stays on its old wrapping: nothing is lost but KMS work
                outage.add_note(f"the entries re-wrapped before it were not swapped in either ({type(lost).__name__}: {lost})")
            raise
        out.kms_request_ids.append(request_id)
        crashpoint("rewrap:before-swap")
        pending.append((entry, WrappingSwap(entry.dek_id, entry.envelope, new)))
        if len(pending) >= batch:
            swap()
    swap()
    return out
