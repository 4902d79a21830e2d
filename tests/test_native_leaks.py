"""The cell key given to the native kernel is never seen again: not in logs, reprs, errors, pickles or memory.

A canary cell key is planted, the kernel seals and opens with it (good
cells, bad cells, caller mistakes), DEBUG logging is captured for every
logger, and every log record, repr, str, exception text and traceback, and
pickle of every object the kernel returned, is searched for the key in raw,
hex, base64 and repr forms. Last, the process memory is searched for the
key's two 16-byte halves (AES-256's first two round keys are exactly those,
so a key schedule the kernel failed to wipe would show): the key lives in one
bytearray that is filled in place and wiped after the calls.
"""

from __future__ import annotations

import base64
import ctypes
import gc
import logging
import os
import pickle
import traceback

import pyarrow as pa
import pytest

from keyturn import native
from test_native_kernel import require_kernel

DEK_ID = os.urandom(16)


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel()


def forms(secret: bytes) -> list[bytes]:
    b64, url = base64.b64encode(secret), base64.urlsafe_b64encode(secret)
    return [secret, secret.hex().encode(), secret.hex().upper().encode(), b64, b64.rstrip(b"="), url, url.rstrip(b"="),
            repr(secret).encode()]


def _assert_absent(secret: bytes, blobs: list[bytes], what: str) -> None:
    for form in forms(secret) + forms(secret[:16]) + forms(secret[16:]):
        for blob in blobs:
            assert form not in blob, f"the cell key appears in {what}"


def test_the_key_never_reaches_logs_reprs_errors_or_pickles(caplog) -> None:
    key = os.urandom(32)
    caplog.set_level(logging.DEBUG)
    native.native_available()
    seen: list = []
    errors: list[BaseException] = []
    values = [b"alice", None, b"", os.urandom(100)]
    sealed = native.seal_cells(key, DEK_ID, 0, values, b"aad")
    seen.append(sealed)
    seen.append(native.seal_cells(bytearray(key), DEK_ID, 7, pa.array(values, pa.binary()), [b"a", None, b"c", b"d"]))
    bad = sealed.to_pylist()
    bad[0] = bad[0][:-1] + b"\x00"
    seen.append(native.open_cells(key, DEK_ID, sealed, b"aad"))
    seen.append(native.open_cells(memoryview(key), DEK_ID, bad + [key, b"\x01" + DEK_ID + key], b"aad"))
    seen.append(native.open_cells(key, DEK_ID, sealed, b"wrong"))
    import keyturn._native as ext

    seen.append(ext.seal_cells(key, DEK_ID, 0, values, b"aad"))
    seen.append(ext.open_cells(key, DEK_ID, bad, b"aad"))
    mistakes = [
        lambda: native.seal_cells(key[:31], DEK_ID, 0, values, b""),
        lambda: native.seal_cells(key + b"\x00", DEK_ID, 0, values, b""),
        lambda: native.seal_cells(key, key[:16] + b"!", 0, values, b""),
        lambda: native.seal_cells(key, DEK_ID, 1 << 97, values, b""),
        lambda: native.seal_cells(key, DEK_ID, 0, [key.hex()], b""),
        lambda: native.open_cells(key, DEK_ID, [b"x"], [None]),
        lambda: ext.open_cells(key, DEK_ID, (b"", b"\xff" * 8, 4, 0, 1, None), b""),
        lambda: ext.seal_cells(key[:5], DEK_ID, 0, [b"x"], b""),
    ]
    for mistake in mistakes:
        with pytest.raises((ValueError, TypeError, OverflowError, RuntimeError)) as caught:
            mistake()
        errors.append(caught.value)
    blobs: list[bytes] = []
    for obj in seen:
        blobs += [repr(obj).encode(), str(obj).encode()]
        blobs.append(pickle.dumps(obj))
        if isinstance(obj, native.OpenedCells):
            blobs += [repr(obj.values).encode(), pickle.dumps(obj.values), obj.status.tobytes(), repr(obj.failed).encode()]
            blobs += [b.to_pybytes() for b in obj.values.buffers() if b is not None]
        elif isinstance(obj, pa.Array):
            blobs += [b.to_pybytes() for b in obj.buffers() if b is not None]
        else:
            blobs += [part for part in obj if isinstance(part, bytes)]
    for err in errors:
        blobs += [str(err).encode(), repr(err).encode(), "".join(traceback.format_exception(err)).encode()]
    blobs += [r.getMessage().encode() for r in caplog.records]
    blobs += [repr(vars(ext)).encode(), repr(vars(native)).encode()]
    assert any(b"native kernel" in r.getMessage().encode() for r in caplog.records) or native._logged
    _assert_absent(key, blobs, "an output, log, repr, error or pickle")
    # and the kernel's data really was searched: the plaintexts are there
    assert any(b"alice" in blob for blob in blobs)


def _fill_in_place(buf: bytearray) -> None:
    """Random bytes written straight into `buf`: no other Python object ever holds them."""
    with open("/dev/urandom", "rb", buffering=0) as f:
        assert f.readinto(buf) == len(buf)


_STEP = 1 << 24


def _occurrences(needles: list[bytes]) -> list[int]:
    """How often each needle appears in this process's writable memory (heap, stacks, anonymous maps).

    Memory is read through one preallocated buffer, whose own pages are
    skipped, so the scan itself makes no copy that it could count.
    """
    buf = bytearray(_STEP + 16)
    view = memoryview(buf)
    own = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    with open("/proc/self/maps") as maps:
        regions = [line.split() for line in maps]
    counts = [0] * len(needles)
    with open("/proc/self/mem", "rb", buffering=0) as mem:
        for fields in regions:
            if not fields[1].startswith("rw") or (len(fields) > 5 and fields[5].startswith("[v")):
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            # skip the scan buffer's own bytes only: the kernel merges neighbouring anonymous maps into one region
            for start, stop in ((lo, min(hi, own)), (max(lo, own + len(buf)), hi)):
                for at in range(start, stop, _STEP):
                    size = min(_STEP + 15, stop - at)
                    try:
                        mem.seek(at)
                        got = mem.readinto(view[:size])
                    except OSError:
                        break
                    for k, needle in enumerate(needles):
                        pos = buf.find(needle, 0, got)
                        while pos >= 0:
                            counts[k] += 1
                            pos = buf.find(needle, pos + 1, got)
    view.release()
    return counts


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="reads process memory through /proc (Linux only)")
def test_no_copy_of_the_key_or_its_schedule_outlives_the_calls() -> None:
    key = bytearray(32)
    _fill_in_place(key)
    # The two halves are AES-256's first two round keys. These two objects are their only other copies.
    halves = [bytes(memoryview(key)[:16]), bytes(memoryview(key)[16:])]
    assert _occurrences(halves) == [2, 2]  # the check can see a copy: here, the key itself and each half
    rows = [os.urandom(64) for _ in range(50_000)]  # enough for the kernel to use its worker threads
    sealed = native.seal_cells(key, DEK_ID, 0, rows, b"aad")
    assert native.open_cells(key, DEK_ID, sealed, b"aad").failed.size == 0
    small = native.seal_cells(key, DEK_ID, 0, [b"x"], b"aad")  # and the calling thread alone
    assert native.open_cells(key, DEK_ID, small, b"aad").failed.size == 0
    for i in range(len(key)):
        key[i] = 0
    gc.collect()
    assert _occurrences(halves) == [1, 1], "a copy of the cell key (or an unwiped key schedule) is still in memory"
