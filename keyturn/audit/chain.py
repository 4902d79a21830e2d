"""An append-only, hash-chained audit log (JSON Lines) for control-plane events.

Rotations, retirements, deletions and reinstatements are rare and matter for
years; they go here, one `AuditEvent` per line::

    {"event":{...},"hash":"<64 hex>","prev":"<64 hex>","seq":0}

- ``seq``: 0-based and contiguous;
- ``prev``: the previous line's ``hash`` (64 zeros for the first line);
- ``event``: `AuditEvent.to_dict()`;
- ``hash``: SHA-256 (hex) of the canonical JSON (sorted keys, separators
  ``,`` and ``:``, ASCII only) of ``{"seq", "prev", "event"}``.

Every line is itself canonical JSON and ends with ``\\n``.

`verify_chain` detects an edited, deleted, inserted, reordered or duplicated
entry and a partly written last line, and reports the first bad line's
0-based index. It reports where the file stops being consistent: a
well-forged entry inserted at line k is noticed at line k+1, whose ``prev``
and ``seq`` no longer fit.

Deleting whole lines from the *end* leaves a valid, shorter chain, and
rewriting the whole file is always possible for someone who can write it (no
secret is involved). Both are caught only against a head recorded elsewhere:

- every `AuditChain.append` atomically rewrites a sidecar file
  ``<path>.head`` holding ``{"hash": ..., "seq": ...}``, which `verify_chain`
  checks when it exists. It sits next to the log, so whoever deletes the
  log's tail can delete or rewrite it too;
- an *anchor* (`AuditChain(path, anchor=store)`, where `store` is an
  `keyturn.registry.base.AuditAnchorStore`: the key home passes its key
  registry, a SQLite table or a DynamoDB item) holds the (seq, hash) of the
  last anchored entry. Every append moves it forward by compare-and-set,
  after the line is durable and before the sidecar; a verify (and every
  `entries()` / `head()`, so every rotate, retire, rewrap... first) checks
  it under the log's lock;
- `verify_chain(path, expected_head=...)` checks a head hash the operator
  recorded (from `AuditChain.head()`).

A recorded head must still be in the chain at its place; entries after it
are later appends and are accepted. So the protection is as strong as the
place the head is kept.

What a verify of an anchored chain proves, and what it does not:

- it proves that every line is intact and in order (each line's hash, seq
  and prev), and that the log still reaches the anchored entry, unchanged:
  no entry up to the anchor was edited, deleted, inserted or reordered, and
  the log was not truncated or replaced below it (a deleted tail together
  with ``<path>.head`` is "trailing entries were deleted");
- it does not prove that entries *after* the anchor are complete: an entry
  written while the anchor could not be moved (a crash between the line and
  the anchor, a registry outage, an older keyturn, a home from before
  anchors existed) is accepted, and so is its deletion. `ChainStatus`
  reports how many entries are past the anchor; a home that has no anchor
  yet gets one at its next control-plane change;
- it does not prove that every registry change was logged (the registry
  changes first, then the event is appended; a crash in between leaves a
  change without its entry), nor who wrote an entry: there is no
  signature, so whoever can write both the log and the registry (for a
  local home: whoever owns its directory, where ``registry.sqlite`` lives;
  for DynamoDB: whoever may put the anchor item) can rewrite both
  consistently. The anchor moves only forward through keyturn (and SQLite
  triggers refuse a backward move or a delete), so a rewrite needs direct
  write access to the registry, not just to the log.

Writers take an exclusive `fcntl.flock` on the log, readers a shared one, so
appends from many processes on one host interleave whole lines only. An
append refuses to extend a log whose last line is damaged or whose sidecar
disagrees with it, so it never hides earlier tampering.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, BinaryIO

from keyturn.fsutil import write_file_atomically
from keyturn.audit.events import AuditEvent
from keyturn.errors import AuditChainError, ConcurrentModificationError, RegistryError

__all__ = [
    "AuditChain",
    "ChainEntry",
    "ChainStatus",
    "verify_chain",
    "entry_hash",
    "GENESIS_PREV",
    "MAX_LINE_BYTES",
]

GENESIS_PREV = "0" * 64
MAX_LINE_BYTES = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEYS = frozenset({"seq", "prev", "event", "hash"})
_SIDECAR_SUFFIX = ".head"


class _Bad(Exception):
    """A problem found in one line, before its index is known."""


@dataclass(frozen=True, slots=True)
class ChainEntry:
    """One verified line of the log."""

    seq: int
    prev: str
    hash: str
    event: AuditEvent


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def entry_hash(seq: int, prev: str, event: dict[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of ``{"seq", "prev", "event"}``."""
    return hashlib.sha256(_canonical({"seq": seq, "prev": prev, "event": event})).hexdigest()


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Bad("a JSON object repeats a key")
    return out


def _reject_constant(name: str) -> None:
    raise _Bad(f"JSON constant {name} is not allowed")


def _parse_line(raw: bytes) -> dict[str, Any]:
    """Parse one line (without its newline) and check its own hash."""
    try:
        entry = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _Bad("line is not valid JSON") from None
    if not isinstance(entry, dict) or set(entry) != _KEYS:
        raise _Bad(f"line must be an object with exactly the keys {sorted(_KEYS)}")
    seq, prev, digest, event = entry["seq"], entry["prev"], entry["hash"], entry["event"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise _Bad("seq must be a non-negative integer")
    if not (isinstance(prev, str) and _HEX64.fullmatch(prev)):
        raise _Bad("prev must be 64 lowercase hex chars")
    if not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
        raise _Bad("hash must be 64 lowercase hex chars")
    if not isinstance(event, dict):
        raise _Bad("event must be an object")
    try:
        recomputed = entry_hash(seq, prev, event)
    except (TypeError, ValueError):
        raise _Bad("event cannot be encoded canonically") from None
    if recomputed != digest:
        raise _Bad("hash does not match the entry's content: the entry was edited")
    return entry


def _read_sidecar(head_path: str) -> tuple[int, str] | None:
    try:
        with open(head_path, "rb") as f:
            raw = f.read(4096)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
        seq, digest = data["seq"], data["hash"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError):
        raise _Bad(f"head file {os.path.basename(head_path)} is unreadable") from None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or not (
        isinstance(digest, str) and _HEX64.fullmatch(digest)
    ):
        raise _Bad(f"head file {os.path.basename(head_path)} is malformed")
    return seq, digest


def _scan(f: BinaryIO) -> list[dict[str, Any]]:
    """Read and verify every line of an open log; `AuditChainError` on the first bad one."""
    entries: list[dict[str, Any]] = []
    prev = GENESIS_PREV
    while True:
        i = len(entries)
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return entries
        if not line.endswith(b"\n"):
            if len(line) > MAX_LINE_BYTES:
                raise AuditChainError(i, f"line is longer than {MAX_LINE_BYTES} bytes")
            raise AuditChainError(i, "last line is incomplete (no trailing newline): the log was truncated mid-line")
        try:
            entry = _parse_line(line[:-1])
        except _Bad as exc:
            raise AuditChainError(i, str(exc)) from None
        seq = entry["seq"]
        if seq < i:
            raise AuditChainError(i, f"seq {seq} repeats or is out of order (expected {i}): duplicated or reordered entry")
        if seq > i:
            raise AuditChainError(i, f"seq jumps to {seq} (expected {i}): entries were deleted or reordered")
        if entry["prev"] != prev:
            raise AuditChainError(i, "prev does not match the previous entry's hash: an entry was removed, inserted or reordered")
        prev = entry["hash"]
        entries.append(entry)


def _check_anchor(hashes: list[str], seq: int | None, digest: str, source: str) -> None:
    """A recorded head must still sit in the chain (at `seq` when known)."""
    n = len(hashes)
    if seq is None:
        if digest not in hashes:
            raise AuditChainError(n, f"{source} {digest[:16]}... is not in the chain: entries were deleted or rewritten")
        return
    if seq >= n:
        raise AuditChainError(n, f"chain has {n} entries but the {source} records seq {seq}: trailing entries were deleted")
    if hashes[seq] != digest:
        raise AuditChainError(seq, f"entry {seq} differs from the {source}: the chain was rewritten")


_ANCHOR_SOURCE = "key registry's audit anchor"


def _read_anchor(anchor: Any) -> tuple[int, str] | None:
    """The anchor store's (seq, hash), checked for shape; None if it holds none."""
    stored = anchor.audit_anchor()
    if stored is None:
        return None
    seq, digest = stored
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0 or not (
        isinstance(digest, str) and _HEX64.fullmatch(digest)
    ):
        raise AuditChainError(0, f"the {_ANCHOR_SOURCE} is malformed ({stored!r})")
    return seq, digest


def _verify_open(
    f: BinaryIO, path: str, expected_head: str | None, anchored: tuple[int, str] | None
) -> list[dict[str, Any]]:
    entries = _scan(f)
    hashes = [e["hash"] for e in entries]
    try:
        sidecar = _read_sidecar(path + _SIDECAR_SUFFIX)
    except _Bad as exc:
        raise AuditChainError(len(entries), str(exc)) from None
    if anchored is not None:
        _check_anchor(hashes, anchored[0], anchored[1], _ANCHOR_SOURCE)
    if sidecar is not None:
        _check_anchor(hashes, sidecar[0], sidecar[1], "head file")
    if expected_head is not None:
        _check_anchor(hashes, None, expected_head, "expected head")
    return entries


def _verify(
    path: str, expected_head: str | None, *, missing_ok: bool, anchor: Any = None
) -> tuple[list[dict[str, Any]], tuple[int, str] | None]:
    """(verified entries, the anchor read under the log's lock or None)."""
    if expected_head is not None and not (isinstance(expected_head, str) and _HEX64.fullmatch(expected_head)):
        raise ValueError("expected_head must be 64 lowercase hex chars (the hash from AuditChain.head())")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        anchored = None if anchor is None else _read_anchor(anchor)
        if anchored is not None:
            raise AuditChainError(
                0, f"log file is missing but the {_ANCHOR_SOURCE} records entry {anchored[0]}: the log was deleted"
            ) from None
        if os.path.exists(path + _SIDECAR_SUFFIX):
            raise AuditChainError(0, "log file is missing but its head file exists: the log was deleted") from None
        if expected_head is not None:
            raise AuditChainError(0, "log file is missing but an expected head was given") from None
        if missing_ok:
            return [], None
        raise
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # appends move the anchor under the exclusive lock
        anchored = None if anchor is None else _read_anchor(anchor)
        return _verify_open(f, path, expected_head, anchored), anchored


def _verified(path: str, expected_head: str | None, *, missing_ok: bool, anchor: Any = None) -> list[dict[str, Any]]:
    return _verify(path, expected_head, missing_ok=missing_ok, anchor=anchor)[0]


def verify_chain(path: str | os.PathLike[str], *, expected_head: str | None = None, anchor: Any = None) -> int:
    """Verify the whole log and return its number of entries.

    Raises `AuditChainError(index, problem)` at the first bad line, or when
    the `anchor` store's entry (if given and it holds one), the
    ``<path>.head`` sidecar (if present) or `expected_head` (if given) is no
    longer in the chain at its place; `FileNotFoundError` if there is no log
    at all (and nothing anchored).
    """
    return len(_verified(os.fspath(path), expected_head, missing_ok=False, anchor=anchor))


@dataclass(frozen=True, slots=True)
class ChainStatus:
    """What `AuditChain.verify` found: a chain that verified (a broken one raises)."""

    entries: int
    head: tuple[int, str] | None
    anchored_in: str | None  # where the chain is anchored ("the key registry"), None without an anchor store
    anchor: tuple[int, str] | None  # the anchored (seq, hash); None if the store holds none yet

    @property
    def unanchored_entries(self) -> int:
        """Entries after the anchored one (all of them when nothing is anchored)."""
        return self.entries if self.anchor is None else self.entries - 1 - self.anchor[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "head": None if self.head is None else self.head[1],
            "anchored_in": self.anchored_in,
            "anchor": None if self.anchor is None else {"seq": self.anchor[0], "hash": self.anchor[1]},
            "unanchored_entries": self.unanchored_entries,
        }


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))


def _read_tail(f: BinaryIO, size: int) -> bytes | None:
    """The last line (without its newline) of a file of `size` bytes, or None if empty."""
    if size == 0:
        return None
    f.seek(size - 1)
    if f.read(1) != b"\n":
        raise _Bad("last line is incomplete (no trailing newline): the log was truncated mid-line")
    end = size - 1
    start = end
    while start > 0:
        step = min(4096, start)
        f.seek(start - step)
        chunk = f.read(step)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            start = start - step + cut + 1
            break
        start -= step
        if end - start > MAX_LINE_BYTES:
            raise _Bad(f"line is longer than {MAX_LINE_BYTES} bytes")
    f.seek(start)
    return f.read(end - start)


class AuditChain:
    """An append-only hash-chained log at `path`, with its head in ``<path>.head`` and, with `anchor`, in a registry.

    `anchor` is an `keyturn.registry.base.AuditAnchorStore` (the key home
    passes its key registry); `anchored_in` names it in reports. Safe for
    concurrent appends from several processes on one host (flock).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, anchor: Any = None, anchored_in: str = "the key registry"
    ) -> None:
        self.path = os.fspath(path)
        self.head_path = self.path + _SIDECAR_SUFFIX
        self.anchor = anchor
        self.anchored_in = anchored_in if anchor is not None else None

    def __repr__(self) -> str:
        return f"AuditChain({self.path!r}{', anchored' if self.anchor is not None else ''})"

    def append(self, event: AuditEvent) -> int:
        """Append `event` durably (fsync) and return its seq.

        Under an exclusive lock it reads only the last line, checks it, the
        sidecar and the anchor, writes one line, fsyncs, moves the anchor
        forward (compare-and-set), then replaces the sidecar atomically.
        Raises `AuditChainError` rather than extend a damaged or truncated
        log. If the anchor store moved meanwhile (another log anchored in the
        same registry), the line is taken back and `AuditChainError` raised;
        if the store is unavailable, the line stays (the anchor lags one
        entry, which a later append catches up) and `RegistryError` says so.
        """
        if not isinstance(event, AuditEvent):
            raise TypeError(f"AuditChain.append takes an AuditEvent, got {type(event).__name__}")
        event_dict = event.to_dict()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            seq, prev = self._next_position(size)
            anchored = None
            if self.anchor is not None:
                anchored = _read_anchor(self.anchor)
                self._check_anchor_before_append(anchored, seq, prev)
            digest = entry_hash(seq, prev, event_dict)
            line = _canonical({"seq": seq, "prev": prev, "event": event_dict, "hash": digest}) + b"\n"
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)  # never leave a partial line behind
                raise
            if self.anchor is not None:
                self._move_anchor(fd, size, seq, digest, anchored)
            self._write_sidecar(seq, digest)
            return seq
        finally:
            os.close(fd)  # releases the lock

    def _check_anchor_before_append(self, anchored: tuple[int, str] | None, seq: int, prev: str) -> None:
        """Refuse to extend a log that no longer reaches its anchor; called with the exclusive lock held."""
        if anchored is None:
            return
        a_seq, a_hash = anchored
        last = seq - 1
        if a_seq > last:
            ends = "the log is empty" if last < 0 else f"the log ends at entry {last}"
            raise AuditChainError(
                seq, f"refusing to append: {ends} but the {_ANCHOR_SOURCE} records entry {a_seq}: trailing entries were deleted"
            )
        if a_seq == last:
            if a_hash != prev:
                raise AuditChainError(last, f"refusing to append: entry {last} differs from the {_ANCHOR_SOURCE}: the chain was rewritten")
            return
        with open(self.path, "rb") as f:  # the anchor lags (an older home, a crash): check it against the whole log
            hashes = [e["hash"] for e in _scan(f)]
        try:
            _check_anchor(hashes, a_seq, a_hash, _ANCHOR_SOURCE)
        except AuditChainError as exc:
            raise AuditChainError(exc.index, f"refusing to append: {exc.problem}") from None

    def _move_anchor(self, fd: int, size: int, seq: int, digest: str, anchored: tuple[int, str] | None) -> None:
        try:
            self.anchor.advance_audit_anchor(seq, digest, expected=anchored)
        except ConcurrentModificationError as exc:
            os.ftruncate(fd, size)  # take the line back: this log and the anchor disagree
            os.fsync(fd)
            raise AuditChainError(
                seq,
                f"refusing to append: the {_ANCHOR_SOURCE} moved while this entry was written ({exc}); "
                "is another audit log anchored in the same registry?",
            ) from None
        except RegistryError as exc:
            self._write_sidecar(seq, digest)
            raise RegistryError(
                f"audit entry {seq} was logged, but {self.anchored_in} could not anchor it ({exc}); "
                "the next control-plane change anchors it"
            ) from exc

    def verify(self, *, expected_head: str | None = None) -> ChainStatus:
        """Verify the whole log (and its anchor, if any); `AuditChainError` names the first problem.

        `FileNotFoundError` if there is no log and nothing is anchored.
        """
        entries, anchored = _verify(self.path, expected_head, missing_ok=False, anchor=self.anchor)
        head = (entries[-1]["seq"], entries[-1]["hash"]) if entries else None
        return ChainStatus(entries=len(entries), head=head, anchored_in=self.anchored_in, anchor=anchored)

    def _next_position(self, size: int) -> tuple[int, str]:
        """(seq, prev) for the next line; called with the exclusive lock held."""
        try:
            with open(self.path, "rb") as f:
                tail = _read_tail(f, size)
        except _Bad as exc:  # a partial last line: its index is the number of complete lines
            raise AuditChainError(_count_lines(self.path), f"refusing to append: {exc}") from None
        try:
            last = None if tail is None else _parse_line(tail)
        except _Bad as exc:
            raise AuditChainError(_count_lines(self.path) - 1, f"refusing to append: {exc}") from None
        try:
            sidecar = _read_sidecar(self.head_path)
        except _Bad as exc:
            raise AuditChainError(_count_lines(self.path), f"refusing to append: {exc}") from None
        if last is None:
            if sidecar is not None:
                raise AuditChainError(0, f"refusing to append: log is empty but its head file records seq {sidecar[0]}")
            return 0, GENESIS_PREV
        if sidecar is not None:
            hs, hh = sidecar
            current = hs == last["seq"] and hh == last["hash"]
            one_behind = hs == last["seq"] - 1 and hh == last["prev"]  # a crash between line and sidecar
            if not (current or one_behind):
                index = last["seq"] + 1 if hs > last["seq"] else hs
                raise AuditChainError(index, "refusing to append: head file disagrees with the last entry")
        return last["seq"] + 1, last["hash"]

    def _write_sidecar(self, seq: int, digest: str) -> None:
        write_file_atomically(self.head_path, _canonical({"seq": seq, "hash": digest}) + b"\n", mode=0o600)

    def entries(self) -> list[ChainEntry]:
        """Every entry, after verifying the whole chain; [] if there is no log yet."""
        out = []
        for i, raw in enumerate(_verified(self.path, None, missing_ok=True, anchor=self.anchor)):
            try:
                event = AuditEvent.from_dict(raw["event"])
            except (TypeError, ValueError) as exc:
                raise AuditChainError(i, f"event is not a valid AuditEvent: {exc}") from None
            out.append(ChainEntry(seq=raw["seq"], prev=raw["prev"], hash=raw["hash"], event=event))
        return out

    def head(self) -> tuple[int, str] | None:
        """(seq, hash) of the last entry of the verified chain, or None if empty.

        Record the hash somewhere the log's writers cannot rewrite and pass it
        to `verify_chain(expected_head=...)` later to detect truncation.
        """
        entries = _verified(self.path, None, missing_ok=True, anchor=self.anchor)
        if not entries:
            return None
        return entries[-1]["seq"], entries[-1]["hash"]
