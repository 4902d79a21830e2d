"""Shared benchmark helpers: timing, ratios, profiles, machine info, test data.

Timing rules (the same for a subject and its baseline):

- each measured callable runs `warmup` times untimed, then `runs` (>= 5 for
  committed numbers) timed runs with `time.perf_counter`;
- subject and baseline runs are interleaved round by round (A, B, A, B, ...)
  so drift on a shared machine hits both alike;
- `gc.collect()` runs before each timed run and the cyclic GC is disabled
  inside it (as `timeit` does); reference counting still frees memory;
- a result reports the median and the spread (min, max, and the
  interquartile range); a ratio is computed per round (same data, adjacent
  runs) and reported as the median of those ratios with their min and max.
"""

from __future__ import annotations

import cProfile
import gc
import os
import platform
import pstats
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = [
    "profile_threads",
    "Timing",
    "Ratio",
    "time_once",
    "measure",
    "measure_rounds",
    "ratio",
    "profile_top",
    "machine_info",
    "random_strings",
    "rate",
    "profile_share",
    "machine_line",
    "command_line",
]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Timing:
    """Wall-clock seconds of repeated runs of one callable."""

    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def min(self) -> float:
        return min(self.runs)

    @property
    def max(self) -> float:
        return max(self.runs)

    def quartiles(self) -> tuple[float, float]:
        """(Q1, Q3); with fewer than 2 runs both are the single value."""
        if len(self.runs) < 2:
            return self.runs[0], self.runs[0]
        q = statistics.quantiles(self.runs, n=4, method="inclusive")
        return q[0], q[2]

    def to_dict(self) -> dict[str, Any]:
        q1, q3 = self.quartiles()
        return {
            "runs": [round(r, 6) for r in self.runs],
            "n": len(self.runs),
            "median_s": round(self.median, 6),
            "min_s": round(self.min, 6),
            "max_s": round(self.max, 6),
            "q1_s": round(q1, 6),
            "q3_s": round(q3, 6),
        }


@dataclass
class Ratio:
    """Per-round ratios (subject throughput / baseline throughput)."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "per_round": [round(v, 4) for v in self.values],
            "median": round(self.median, 4),
            "min": round(min(self.values), 4),
            "max": round(max(self.values), 4),
        }


def time_once(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run `fn` once with the cyclic GC off; return (seconds, result)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
    finally:
        if was_enabled:
            gc.enable()
    return elapsed, result


def measure(fn: Callable[[], Any], *, runs: int = 5, warmup: int = 1) -> Timing:
    """Time `fn` alone: `warmup` untimed runs, then `runs` timed ones."""
    return measure_rounds({"fn": fn}, runs=runs, warmup=warmup)["fn"]


def measure_rounds(
    fns: Mapping[str, Callable[[], Any]],
    *,
    runs: int = 5,
    warmup: int = 1,
    check: Callable[[str, Any], None] | None = None,
) -> dict[str, Timing]:
    """Time several callables round-robin, in the order given, `runs` rounds.

    `check(name, result)`, if given, is called (untimed) on each result, so a
    benchmark can verify its output without timing the verification.
    """
    if runs < 1:
        raise ValueError("runs must be >= 1")
    warmup = max(warmup, 0)
    timings = {name: Timing() for name in fns}
    for round_ in range(warmup + runs):
        for name, fn in fns.items():
            elapsed, result = time_once(fn)
            if check is not None:
                check(name, result)
            del result
            if round_ >= warmup:  # warm-up rounds are run and checked, not kept
                timings[name].runs.append(elapsed)
    return timings


def ratio(subject: Timing, baseline: Timing) -> Ratio:
    """Subject throughput over baseline throughput, round by round (= baseline time / subject time)."""
    return Ratio([b / s for s, b in zip(subject.runs, baseline.runs)])


def rate(count: int, timing: Timing) -> dict[str, float]:
    """Items per second: at the median, and at the slowest and fastest run."""
    return {
        "median": count / timing.median,
        "min": count / timing.max,
        "max": count / timing.min,
    }


# --------------------------------------------------------------------------- profiles


def _short_path(path: str) -> str:
    """A path without machine-specific prefixes (site-packages, repository root)."""
    marker = "site-packages" + os.sep
    if marker in path:
        return path.split(marker, 1)[1]
    if path.startswith(_ROOT + os.sep):
        return os.path.relpath(path, _ROOT)
    if os.path.isabs(path):
        return os.path.basename(path)
    return path


def _label(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename == "~":  # built-ins and C methods
        return name
    return f"{_short_path(filename)}:{line}({name})"


def profile_top(fn: Callable[[], Any], *, top: int = 12, repeat: int = 3) -> dict[str, Any]:
    """cProfile `repeat` calls of `fn`; the `top` functions by own time per call, with their share.

    Times and call counts are per call of `fn` (totals divided by `repeat`),
    which evens out a noisy call. cProfile adds overhead per Python call, so
    shares are indicative: Python loops look a little more expensive than
    they are next to C calls.
    """
    profiler = cProfile.Profile()
    for _ in range(repeat):
        gc.collect()
        profiler.enable()
        try:
            result = fn()
        finally:
            profiler.disable()
        del result
    stats = pstats.Stats(profiler)
    total = stats.total_tt / repeat  # type: ignore[attr-defined]
    rows = []
    for func, (cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": _label(func),
                "ncalls": round(nc / repeat),
                "tottime_s": round(tt / repeat, 4),
                "cumtime_s": round(ct / repeat, 4),
                "share": round(tt / repeat / total, 4) if total else 0.0,
            }
        )
    rows.sort(key=lambda r: r["tottime_s"], reverse=True)
    return {"total_s": round(total, 4), "top": rows[:top], "all": rows}


def _is_wait(label: str) -> bool:
    """Whether a profile row is a thread blocking (a lock, a queue, a socket), not work."""
    return any(w in label for w in ("acquire' of '_thread.lock", "_thread.lock", "select.", "time.sleep", "'poll'"))


def _stats_rows(stats: pstats.Stats) -> tuple[float, list[dict[str, Any]]]:
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = [
        {
            "function": _label(func),
            "ncalls": nc,
            "tottime_s": round(tt, 4),
            "cumtime_s": round(ct, 4),
            "share": round(tt / total, 4) if total else 0.0,
        }
        for func, (cc, nc, tt, ct, _callers) in stats.stats.items()  # type: ignore[attr-defined]
    ]
    rows.sort(key=lambda r: r["tottime_s"], reverse=True)
    return total, rows


def profile_threads(fn: Callable[[], Any], *, top: int = 12) -> dict[str, Any]:
    """cProfile one call of `fn` in the calling thread AND in every thread started while it runs.

    A pipeline on Beam's in-process runner does its work on the runner's
    worker threads (and a thread pool inside a DoFn on its own threads): a
    profile of the calling thread alone sees it wait (``lock.acquire``).
    Each new thread gets its own profiler from the first event it makes
    (`threading.setprofile`); the worker threads' profiles are merged.
    Returns ``main`` and ``workers`` (``total_s`` of own time, ``wait_share``,
    the time spent blocked, ``work_top``: the `top` rows that are not waits,
    ``top``) and ``threads`` (own seconds per thread name).
    """
    started: list[tuple[str, cProfile.Profile]] = []
    lock = threading.Lock()

    def start(frame: Any, event: str, arg: Any) -> None:
        profiler = cProfile.Profile()
        with lock:
            started.append((threading.current_thread().name, profiler))
        profiler.enable()  # replaces this hook in this thread

    main = cProfile.Profile()
    gc.collect()
    wall0 = time.perf_counter()
    threading.setprofile(start)
    main.enable()
    try:
        fn()
    finally:
        main.disable()
        threading.setprofile(None)  # type: ignore[arg-type]
    wall = time.perf_counter() - wall0

    def summary(stats: pstats.Stats | None) -> dict[str, Any]:
        if stats is None:
            return {"total_s": 0.0, "wait_share": 0.0, "top": [], "work_top": []}
        total, rows = _stats_rows(stats)
        wait = sum(r["tottime_s"] for r in rows if _is_wait(r["function"]))
        return {
            "total_s": round(total, 3),
            "wait_share": round(wait / total, 4) if total else 0.0,
            "top": rows[:top],
            "work_top": [r for r in rows if not _is_wait(r["function"])][:top],
        }

    per_thread: dict[str, float] = {}
    merged: pstats.Stats | None = None
    with lock:
        threads = list(started)
    for name, profiler in threads:
        stats = pstats.Stats(profiler)
        per_thread[name] = round(per_thread.get(name, 0.0) + stats.total_tt, 3)  # type: ignore[attr-defined]
        if merged is None:
            merged = stats
        else:
            merged.add(stats)
    return {
        "wall_s": round(wall, 3),
        "main": summary(pstats.Stats(main)),
        "workers": summary(merged),
        "threads": dict(sorted(per_thread.items(), key=lambda kv: -kv[1])),
    }


def profile_share(profile: Mapping[str, Any], predicate: Callable[[str], bool]) -> float:
    """The share of own time spent in functions whose label satisfies `predicate`."""
    return round(sum(r["share"] for r in profile["all"] if predicate(r["function"])), 4)


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - missing optional package
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_ROOT, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, OS, interpreter and library versions, and the git commit."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        from cryptography.hazmat.backends.openssl.backend import backend

        openssl = backend.openssl_version_text()
    except Exception:  # noqa: BLE001
        openssl = None
    commit = _git("rev-parse", "--short=12", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    if commit is None:  # an exported tree (git archive) has no .git: the exporter may name the commit
        commit = os.environ.get("KEYTURN_BENCH_COMMIT") or None
        dirty = "" if commit else None
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "aes_ni": "aes" in _cpu_flags(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": {
            "pyarrow": pa.__version__,
            "cryptography": _version("cryptography"),
            "apache-beam": _version("apache-beam"),
            "numpy": np.__version__,
            "openssl": openssl,
            "keyturn": _version("keyturn"),
        },
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def machine_line(info: Mapping[str, Any]) -> str:
    """One line for a report: CPU, cores, Python and the main library versions."""
    v = info["versions"]
    return (
        f"{info['cpu_model']}, {info['usable_cores']} cores"
        f"{' (AES-NI)' if info.get('aes_ni') else ''}, {info['python']}, pyarrow {v['pyarrow']}, "
        f"cryptography {v['cryptography']} ({v['openssl']}), apache-beam {v['apache-beam']}"
    )


# --------------------------------------------------------------------------- data

_ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", dtype=np.uint8)


def random_strings(n: int, rng: np.random.Generator, min_len: int = 16, max_len: int = 32) -> pa.StringArray:
    """`n` random ASCII alphanumeric strings of `min_len`..`max_len` bytes (uniform), no nulls."""
    if n < 0 or min_len < 0 or max_len < min_len:
        raise ValueError("need n >= 0 and 0 <= min_len <= max_len")
    lengths = rng.integers(min_len, max_len + 1, size=n, dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    data = _ALPHABET[rng.integers(0, len(_ALPHABET), size=int(offsets[-1]))]
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data.tobytes()))


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that produced a run, without machine paths."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m benchmarks.run", *args]).strip()
