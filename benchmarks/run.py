"""Run keyturn's benchmarks, print their tables, write results JSON and BENCHMARKS.md.

    python -m benchmarks.run                      # everything, full size (what `make bench` runs)
    python -m benchmarks.run --only cells         # one benchmark: cells, beam_overhead, beam_streaming
    python -m benchmarks.run --only beam          # both Beam benchmarks
    python -m benchmarks.run --quick              # small sizes, a smoke test (BENCHMARKS.md untouched)

Results go to bench-out/results.json (`--out`). A full run also rewrites the
generated tables in BENCHMARKS.md, between the `<!-- bench:NAME:begin -->`
and `<!-- bench:NAME:end -->` markers of the benchmarks that ran (`--no-md`
to skip); the prose around the markers is written by hand.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from benchmarks.common import command_line, machine_info, machine_line

__all__ = ["main", "BENCHMARKS", "SIZES", "render", "update_markdown"]

BENCHMARKS = ("cells", "peers", "kms", "beam_overhead", "beam_streaming", "beam_workers", "lake", "memory")
GROUPS = {"all": BENCHMARKS, "beam": ("beam_overhead", "beam_streaming", "beam_workers")}
SIZES: dict[str, dict[str, dict[str, int]]] = {
    "full": {
        "cells": {"rows": 1_000_000},
        "beam_overhead": {"rows": 1_000_000, "batch_rows": 10_000, "partitions": 10},
        "beam_streaming": {"records": 1_000_000, "source_rows": 100, "batch_rows": 10_000, "partitions": 10},
        "peers": {"rows": 1_000_000, "esdk_rows": 2_000},
        "kms": {"records": 1_000_000, "partitions": 10, "per_record_subset": 1_000_000},
        "beam_workers": {"rows": 1_000_000, "batch_rows": 10_000, "partitions": 10},
        "lake": {"rows": 5_600_000, "partitions": 10},  # ~1 GB of encrypted Parquet
        "memory": {"rows": 200_000, "scale": 4, "partitions": 10},
    },
    "quick": {
        "cells": {"rows": 50_000},
        "beam_overhead": {"rows": 100_000, "batch_rows": 10_000, "partitions": 10},
        "beam_streaming": {"records": 100_000, "source_rows": 100, "batch_rows": 10_000, "partitions": 10},
        "peers": {"rows": 50_000, "esdk_rows": 200},
        "kms": {"records": 100_000, "partitions": 10, "per_record_subset": 10_000},
        "beam_workers": {"rows": 100_000, "batch_rows": 10_000, "partitions": 10},
        "lake": {"rows": 50_000, "partitions": 10},
        "memory": {"rows": 20_000, "scale": 4, "partitions": 10},
    },
}
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("bench-out", "results.json")
DEFAULT_MD = "BENCHMARKS.md"


# --------------------------------------------------------------------------- running


# Each benchmark's module and entry point, and which of (runs, warmup) it takes: "timed" both,
# "capped" runs only (at most 5), "sized" neither.
_ENTRY_POINTS: dict[str, tuple[str, str, str]] = {
    "cells": ("bench_cells", "run", "timed"),
    "beam_overhead": ("bench_beam", "run_overhead", "timed"),
    "beam_streaming": ("bench_beam", "run_streaming", "sized"),
    "beam_workers": ("bench_beam", "run_workers", "timed"),
    "peers": ("bench_peers", "run", "timed"),
    "kms": ("bench_kms", "run", "sized"),
    "lake": ("bench_lake", "run_lake", "capped"),
    "memory": ("bench_lake", "run_memory", "capped"),
}


def _run_one(name: str, size: Mapping[str, int], runs: int, warmup: int) -> dict[str, Any]:
    if name not in _ENTRY_POINTS:
        raise ValueError(f"unknown benchmark {name!r}")
    module, function, takes = _ENTRY_POINTS[name]
    entry = getattr(importlib.import_module(f"benchmarks.{module}"), function)
    if takes == "timed":
        return entry(runs=runs, warmup=warmup, **size)
    if takes == "capped":
        return entry(runs=min(runs, 5), **size)
    return entry(**size)


def _select(only: Sequence[str] | None) -> list[str]:
    if not only:
        return list(BENCHMARKS)
    chosen: list[str] = []
    for item in only:
        for name in item.split(","):
            name = name.strip()
            if not name:
                continue
            names = GROUPS.get(name, (name,))
            for n in names:
                if n not in BENCHMARKS:
                    raise SystemExit(f"unknown benchmark {n!r}; choose from {', '.join(BENCHMARKS + tuple(GROUPS))}")
                if n not in chosen:
                    chosen.append(n)
    return [n for n in BENCHMARKS if n in chosen]


# --------------------------------------------------------------------------- formatting


def _si(value: float, unit: str = "") -> str:
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.3g} {unit}".strip()


def _rate_cells(r: Mapping[str, float], unit: str) -> tuple[str, str]:
    return _si(r["median"], unit), f"{_si(r['min'], unit)} – {_si(r['max'], unit)}"


def _ratio(r: Mapping[str, Any]) -> str:
    return f"{r['median']:.2f} ({r['min']:.2f} – {r['max']:.2f})"


def _met(value: bool | None) -> str:
    return "—" if value is None else ("**yes**" if value else "**no**")


def _secs(t: Mapping[str, Any]) -> tuple[str, str]:
    return f"{t['median_s']:.3f} s", f"{t['min_s']:.3f} – {t['max_s']:.3f} s (IQR {t['q1_s']:.3f} – {t['q3_s']:.3f})"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _run_line(meta: Mapping[str, Any], result: Mapping[str, Any]) -> str:
    info = meta["machine"]
    commit = info.get("git_commit") or "unknown"
    if info.get("git_dirty"):
        commit += " (with uncommitted changes)"
    load = info.get("load_avg_start")
    load_text = f", load average at start {load[0]:.2f}" if load else ""
    return (
        f"Machine: {machine_line(info)}{load_text}.  \n"
        f"Command: `{meta['command']}` · run {info['date_utc']} · commit {commit} · "
        f"took {result.get('elapsed_s', 0):.0f} s."
    )


def _profile_table(profile: Mapping[str, Any], top: int = 8) -> str:
    rows = [
        [f"`{r['function']}`", f"{r['ncalls']:,}", f"{r['tottime_s']:.3f} s", f"{100 * r['share']:.1f} %"]
        for r in profile["top"][:top]
    ]
    return _table(["Function (cProfile, by own time)", "Calls", "Own time", "Share"], rows)


def render_cells(result: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    p, enc, dec, kms = result["params"], result["encrypt"], result["decrypt"], result["kms"]
    ek, eks = _rate_cells(enc["keyturn_cells_per_s"], "cells/s")
    eb, _ = _rate_cells(enc["baseline_cells_per_s"], "cells/s")
    dk, dks = _rate_cells(dec["keyturn_cells_per_s"], "cells/s")
    db, _ = _rate_cells(dec["baseline_cells_per_s"], "cells/s")
    et, ets = _secs(enc["keyturn"])
    bt, _ = _secs(enc["baseline"])
    dt, dts = _secs(dec["keyturn"])
    dbt, _ = _secs(dec["baseline"])
    calls = kms["generate_calls_per_encrypt_run"]
    rows = [
        ["`encrypt_batch` throughput", ek, eks, eb, _ratio(enc["ratio"]), f"≥ {enc['target']:.2f}", _met(enc["met"])],
        ["`encrypt_batch` time", et, ets, bt, "", "", ""],
        ["`decrypt_batch` throughput", dk, dks, db, _ratio(dec["ratio"]), f"≥ {dec['target']:.2f}", _met(dec["met"])],
        ["`decrypt_batch` time", dt, dts, dbt, "", "", ""],
        [
            f"KMS GenerateDataKey calls for all {p['rows']:,} cells (one scope, default caps)",
            f"{kms['calls_per_scope']}",
            f"{min(calls)} – {max(calls)} over {len(calls)} runs" if calls else "",
            "",
            "",
            f"{kms['target_per_scope']} per scope",
            _met(kms["met"]),
        ],
    ]
    parts = [
        _run_line(meta, result),
        "",
        f"{p['rows']:,} cells of {p['string_bytes'][0]}–{p['string_bytes'][1]} random bytes "
        f"({p['plaintext_bytes'] / 1e6:.1f} MB), seed {p['seed']}, {p['warmup']} warm-up + {p['runs']} timed rounds.",
        "",
        _table(["Measurement", "keyturn median", "keyturn spread (min – max)", "Baseline median", "Ratio median (min – max of rounds)", "Target", "Met"], rows),
    ]
    prof = result.get("profile", {}).get("encrypt_batch")
    if prof:
        parts += [
            "",
            f"cProfile of one `encrypt_batch` call ({prof['total_s']:.2f} s under the profiler; "
            f"AES-GCM `encrypt` {100 * prof['aes_gcm_share']:.0f} % of own time, keyturn's Python "
            f"{100 * prof['keyturn_python_share']:.0f} %):",
            "",
            _profile_table(prof),
        ]
    bare = result.get("profile", {}).get("bare_encrypt")
    if bare:
        items = ", ".join(f"`{r['function']}` {r['tottime_s']:.3f} s" for r in bare["top"][:3])
        parts += ["", f"The bare AES-GCM loop under the same profiler: {bare['total_s']:.2f} s per call ({items})."]
    prof = result.get("profile", {}).get("decrypt_batch")
    if prof:
        parts += [
            "",
            f"cProfile of one `decrypt_batch` call ({prof['total_s']:.2f} s under the profiler; "
            f"AES-GCM `decrypt` {100 * prof['aes_gcm_share']:.0f} % of own time, keyturn's Python "
            f"{100 * prof['keyturn_python_share']:.0f} %):",
            "",
            _profile_table(prof, top=6),
        ]
    return "\n".join(parts)


def render_beam_overhead(result: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    p, kms = result["params"], result["kms"]
    core, core_s = _rate_cells(result["core_rows_per_s"], "rows/s")
    pipe, pipe_s = _rate_cells(result["pipeline_rows_per_s"], "rows/s")
    ct, cts = _secs(result["core"])
    pt, pts = _secs(result["pipeline"])
    it, its = _secs(result["identity_pipeline"])
    counters = kms.get("pipeline_counters_last_run", {})
    core_calls = kms.get("core_calls_per_run", [])
    rows = [
        ["Core loop (`DekScope` + `encrypt_batch`)", core, core_s, "", "", ""],
        ["`EncryptBatches` pipeline, end to end", pipe, pipe_s, _ratio(result["ratio"]), f"≥ {result['target']:.2f}", _met(result["met"])],
        ["Core loop time", ct, cts, "", "", ""],
        ["Pipeline time (construction to `wait_until_finish`)", pt, pts, "", "", ""],
        ["Identity pipeline time (Beam's fixed cost, no keyturn)", it, its, "", "", ""],
        [
            "Ratio without Beam's fixed cost: core / (pipeline − identity)",
            "",
            "",
            _ratio(result["ratio_without_fixed_cost"]),
            "(for reference)",
            "",
        ],
        [
            "KMS calls per run: core loop / pipeline (`keyturn` counter `kms_calls`)",
            f"{max(core_calls) if core_calls else '?'} / {counters.get('kms_calls', '?')}",
            f"{p['partitions']} partitions, one bundle",
            "",
            "",
            "",
        ],
    ]
    parts = [
        _run_line(meta, result),
        "",
        f"{p['rows']:,} rows in {p['batches']} batches of {p['batch_rows']:,} over {p['partitions']} partitions, "
        f"column `email` encrypted, {p['runner']}, {p['warmup']} warm-up + {p['runs']} timed rounds.",
        "",
        _table(["Measurement", "Median", "Spread (min – max)", "Ratio median (min – max of rounds)", "Target", "Met"], rows),
    ]
    return "\n".join(parts)


def render_beam_streaming(result: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    p = result["params"]
    g = result["with_partition_batches"]
    n = result.get("without_partition_batches") or {}

    def counters(r: Mapping[str, Any]) -> str:
        c = r.get("runner_counters", {})
        if not c:
            return "none reported"
        return f"kms_calls={c.get('kms_calls', 0)}, deks_generated={c.get('deks_generated', 0)}, rows_encrypted={c.get('rows_encrypted', 0):,}"

    def spread(r: Mapping[str, Any]) -> str:
        values = list(r["kms_calls_per_partition"].values())
        return f"{min(values)} – {max(values)}"

    reduction = result.get("reduction")
    rows = [
        [
            "KMS calls per partition (KMS tally), max",
            g["kms_calls_per_partition_max"],
            n.get("kms_calls_per_partition_max", "—"),
            f"≤ {result['target_per_partition']}",
            _met(result["met"]),
        ],
        ["KMS calls per partition, mean (min – max)", f"{g['kms_calls_per_partition_mean']:g} ({spread(g)})", f"{n['kms_calls_per_partition_mean']:g} ({spread(n)})" if n else "—", "", ""],
        ["KMS calls in total (KMS tally = audit events)", f"{g['kms_calls_total']:,}", f"{n['kms_calls_total']:,}" if n else "—", "", ""],
        ["KMS calls per 1M records", f"{g['kms_calls_per_1m_records']:,.0f}", f"{n['kms_calls_per_1m_records']:,.0f}" if n else "—", f"reduction {reduction:.0f}×" if reduction else "", ""],
        ["DEK scopes (audit events)", f"{g['scopes']:,}", f"{n['scopes']:,}" if n else "—", "", ""],
        ["`keyturn` counters in the pipeline result", counters(g), counters(n) if n else "—", "see note", ""],
        ["Wall time", f"{g['wall_s']:.1f} s", f"{n['wall_s']:.1f} s" if n else "—", "", ""],
    ]
    parts = [
        _run_line(meta, result),
        "",
        f"{p['records']:,} records over {p['partitions']} partitions, arriving as {g['elements']:,} micro-batches of "
        f"{p['source_rows']} rows ({g['arrivals']:,} arrivals, one micro-batch per partition each, "
        f"{p['rate_rows_per_s_per_partition']:g} rows/s per partition), {p['partition_batches']}, {p['runner']}.",
        "",
        _table(["Measurement", "With PartitionBatches", "Without (baseline)", "Ratio / note", "Met"], rows),
    ]
    return "\n".join(parts)


def render_machine(meta: Mapping[str, Any]) -> str:
    info = meta["machine"]
    v = info["versions"]
    rows = [
        ["CPU", f"{info['cpu_model']}{' (AES-NI)' if info.get('aes_ni') else ''}"],
        ["Cores (logical / usable)", f"{info['logical_cores']} / {info['usable_cores']}"],
        ["Memory", f"{info['memory_gib']} GiB" if info.get("memory_gib") else "unknown"],
        ["OS", info["os"]],
        ["Python", info["python"]],
        ["pyarrow / cryptography / OpenSSL", f"{v['pyarrow']} / {v['cryptography']} / {v['openssl']}"],
        ["apache-beam / numpy", f"{v['apache-beam']} / {v['numpy']}"],
        ["Load average at start / end", _load(info)],
        ["Commit", f"{info.get('git_commit')}{' (with uncommitted changes)' if info.get('git_dirty') else ''}"],
        ["Date (UTC)", info["date_utc"]],
        ["Command", f"`{meta['command']}`"],
    ]
    return _table(["", "Last full run"], rows)


def _load(info: Mapping[str, Any]) -> str:
    start, end = info.get("load_avg_start"), info.get("load_avg_end")
    fmt = lambda x: "?" if not x else f"{x[0]:.2f}"  # noqa: E731
    return f"{fmt(start)} / {fmt(end)} (1-minute)"


def render_peers(result: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    p = result["params"]
    names = {
        "keyturn": "keyturn `encrypt_batch` / `decrypt_batch`",
        "bare_aesgcm": "bare `AESGCM` loop",
        "tink": "Tink AEAD, per record",
        "esdk": f"AWS Encryption SDK, per record ({p['esdk_rows']:,}-record subset)",
        "esdk_cached": f"AWS Encryption SDK + caching CMM ({p['esdk_rows']:,}-record subset)",
    }
    targets = result["targets"]
    rows = []
    for name, label in names.items():
        e, d = result["encrypt"][name], result["decrypt"][name]
        er, ers = _rate_cells(e["cells_per_s"], "cells/s")
        dr, _ = _rate_cells(d["cells_per_s"], "cells/s")
        if name == "keyturn":
            rows.append([label, f"{e['cells']:,}", er, ers, "1 (subject)", dr, "", "", ""])
            continue
        t = targets.get(name, {})
        target = t.get("target")
        rows.append([
            label, f"{e['cells']:,}", er, ers, _ratio(e["keyturn_ratio"]), dr, _ratio(d["keyturn_ratio"]),
            f"≥ {target:g}" if target else "none set", _met(t.get("met")),
        ])
    parts = [
        _run_line(meta, result),
        "",
        f"{p['rows']:,} cells of 16–32 random bytes, seed {p['seed']}, {p['warmup']} warm-up + {p['runs']} timed rounds, "
        f"every subject in every round. {p['tink']}. {p['esdk']}; with the cache: {p['esdk_cache']}. "
        f"The ESDK runs on the first {p['esdk_rows']:,} values only; its figures are per-cell throughput on that subset.",
        "",
        _table(["Subject", "Cells per run", "Encrypt median", "Encrypt spread (min – max)", "keyturn ÷ subject, encrypt (min – max)", "Decrypt median", "keyturn ÷ subject, decrypt", "Target (encrypt)", "Met"], rows),
    ]
    prof = result.get("profile", {}).get("esdk_encrypt")
    if prof:
        parts += ["", f"cProfile of {prof['records']} ESDK encrypt calls ({prof['total_s']:.2f} s under the profiler):", "", _profile_table(prof, top=6)]
    prof = result.get("profile", {}).get("tink_encrypt")
    if prof:
        parts += ["", f"cProfile of the Tink loop ({prof['total_s']:.2f} s under the profiler):", "", _profile_table(prof, top=4)]
    return "\n".join(parts)


def render_kms(result: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    p, k, n = result["params"], result["keyturn"], result["per_record"]
    how = (
        f"measured on {n['records_measured']:,} records and extrapolated linearly" if p["extrapolated"]
        else f"all {n['records_measured']:,} calls made and counted"
    )
    rows = [
        [f"keyturn, one DEK scope per partition ({p['partitions']} partitions × 1 scope)", f"{k['calls']:,}", f"{k['calls_per_1m_records']:,.0f}", f"{k['seconds']:.2f} s (encrypting all records)", _fmt_fraction(result["fraction"]), f"≤ 1/{round(1 / result['target_fraction']):,}", _met(result["met"])],
        [f"per record: one GenerateDataKey per record ({how})", f"{n['calls_measured']:,}", f"{n['calls_per_1m_records']:,.0f}", f"{n['seconds_measured']:.2f} s ({n['us_per_call']:.1f} µs per call, local KMS)", "1", "", ""],
    ]
    parts = [
        _run_line(meta, result),
        "",
        f"{p['records']:,} records, counted at {p['kms']}.",
        "",
        _table(["Approach", "GenerateDataKey calls counted", "Calls per 1M records", "Time", "Calls ÷ per-record calls", "Target", "Met"], rows),
    ]
    return "\n".join(parts)


def _fmt_fraction(x: float) -> str:
    return f"1/{round(1 / x):,}" if x else "0"


def render_beam_workers(result: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    p = result["params"]
    one, one_s = _rate_cells(result["one_worker_rows_per_s"], "rows/s")
    two, two_s = _rate_cells(result["two_workers_rows_per_s"], "rows/s")
    core, core_s = _rate_cells(result["core_rows_per_s"], "rows/s")
    rows = [
        ["1 worker (in-process)", one, one_s, f"{result['one_worker']['median_s']:.2f} s", "", "", ""],
        ["2 workers (multi_processing)", two, two_s, f"{result['two_workers']['median_s']:.2f} s", _ratio(result["speedup"]), f"≥ {result['target']:g}", _met(result["met"])],
        ["core loop, no Beam (same batches built and encrypted in one process)", core, core_s, f"{result['core']['median_s']:.2f} s", "", "", ""],
    ]
    parts = [
        _run_line(meta, result),
        "",
        f"{p['rows']:,} rows in {p['batches']} batches of {p['batch_rows']:,} over {p['partitions']} partitions, column `email` encrypted, "
        f"batches built inside the pipeline; {p['usable_cores']} usable cores; {p['warmup']} warm-up + {p['runs']} timed rounds.",
        "",
        _table(["Runner", "Rows/s median", "Spread (min – max)", "Time median", "2 workers ÷ 1 worker (min – max)", "Target", "Met"], rows),
    ]
    return "\n".join(parts)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _args_text(args: str | Sequence[str] | None) -> str:
    """Beam arguments as one code span, or a description (a plain string) as it is."""
    if isinstance(args, str):
        return args
    return f"`{' '.join(args or [])}`"


def render_lake(result: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    p, t, r = result["params"], result["timings"], result["ratios"]
    rot, read, targets = result["rotation"], result["read_path"], result["targets"]
    rr, pr = rot["rotate_rewrap"]["rounds"], rot["pme_rotate"]["rounds"]

    def spread_int(values: Sequence[int]) -> str:
        lo, hi = min(values), max(values)
        return f"{lo:,}" if lo == hi else f"{lo:,} – {hi:,}"

    labels = {
        "encrypt": f"keyturn encrypt (`keyturn.pipelines.encrypt.run`), no Beam options (`{' '.join(p.get('encrypt_default_args') or []) or 'in process'}`)",
        "encrypt_1_core": f"keyturn encrypt, {_args_text(p.get('encrypt_1_core_args'))}",
        "encrypt_shares": f"the machine's ceiling: {p.get('encrypt_shares', '')}",
        "reencrypt": "reencrypt rotation (`keyturn.pipelines.reencrypt.run`, mode reencrypt, home rotated without rewrap)",
        "plain_rewrite": "plain pyarrow read-and-rewrite of the encrypted lake",
        "pme_write": "pyarrow Parquet Modular Encryption write of the source",
    }
    rows = []
    for name, label in labels.items():
        if name not in t:
            continue
        rate_m, _ = _rate_cells(result["rows_per_s"][name], "rows/s")
        med, spread = _secs(t[name])
        rows.append([label, med, spread, rate_m, f"{result['mb_per_s'][name]['median']:.1f} MB/s"])
    rot_rows = [
        [
            "keyturn `rotate --rewrap` (`rotation.rotate` + `rotation.rewrap`, directory only)",
            *_secs(t["rotate_rewrap"]),
            spread_int([x["lake_bytes_written"] for x in rr]) + f" B in {spread_int([x['lake_files_written'] for x in rr])} of {rr[0]['lake_files']} files",
            f"{spread_int([x['home_bytes_written'] for x in rr])} B in the key home ({spread_int([x['home_files_written'] for x in rr])} files)",
            f"{spread_int([x['kms_calls'] for x in rr])} (ReEncrypt) for {spread_int([x['deks_on_old_version'] for x in rr])} DEKs",
        ],
        [
            "PME `CryptoFactory.rotate_master_keys`, every file (external key material)",
            *_secs(t["pme_rotate"]),
            f"{spread_int([x['key_material_bytes_written'] for x in pr])} B of key material in {spread_int([x['key_material_files_written'] for x in pr])} files; "
            f"{spread_int([x['parquet_bytes_written'] for x in pr])} B of Parquet",
            "(key material lives in the lake)",
            f"{spread_int([x['kms_unwrap_calls'] for x in pr])} unwrap + {spread_int([x['kms_wrap_calls'] for x in pr])} wrap "
            f"for {p['pme_external']['files']} files",
        ],
    ]
    reen = rot["reencrypt"]
    payload_rows = [
        ["keyturn `rotate --rewrap`", "0", "0.0 MB", f"{rot['rotate_rewrap']['payload_bytes_decrypted'] / 1e6:,.1f} MB", f"{rot['rotate_rewrap']['cells_decrypted']:,}", f"{rot['rotate_rewrap']['kms_calls']}"],
        ["reencrypt", f"{reen['files_rewritten']}", f"{reen['bytes_rewritten'] / 1e6:,.1f} MB", f"{reen['payload_bytes_decrypted'] / 1e6:,.1f} MB", f"{reen['cells_decrypted']:,}", f"{reen['kms_calls']}"],
    ]
    if "cells_encrypted" in reen:
        payload_rows[1][4] += f" ({reen['decrypts_per_cell']:.3f} per cell); {reen['cells_encrypted']:,} encrypted ({reen['encrypts_per_cell']:.3f} per cell) of {reen['lake_cells']:,} cells"
    rd = read["timings"]
    cps = read["cells_per_s"]
    read_rows = [
        ["`DekReader(kms, directory=registry)` + `contract=`", *_secs(rd["decrypt_directory"]), _rate_cells(cps["decrypt_directory"], "cells/s")[0],
         spread_int(read["stats"]["decrypt_directory"]["kms_unwraps"]), spread_int(read["stats"]["decrypt_directory"]["directory_lookups"])],
        ["`DekReader(kms)`, no directory, no contract", *_secs(rd["decrypt_no_directory"]), _rate_cells(cps["decrypt_no_directory"], "cells/s")[0],
         spread_int(read["stats"]["decrypt_no_directory"]["kms_unwraps"]), spread_int(read["stats"]["decrypt_no_directory"]["directory_lookups"])],
    ]

    def target_row(label: str, key: str, ratio: Mapping[str, Any] | None) -> list[str]:
        tg = targets[key]
        value = _ratio(ratio) if ratio is not None else str(tg["measured"])
        return [label, value, tg["target"], _met(tg["met"])]

    ratio_rows = []
    if "encrypt_over_pme_write_time" in targets:
        ratio_rows += [
            target_row("keyturn encrypt time ÷ PME write time (same data)", "encrypt_over_pme_write_time", r["encrypt_over_pme_time"]),
            target_row("keyturn encrypt on one core ÷ with no Beam options (a worker thread per core)", "encrypt_1_core_over_default_time", r["encrypt_1_core_over_default_time"]),
        ]
        if "encrypt_1_core_over_shares_time" in r:
            ratio_rows.append(["the same one-core time ÷ independent pinned processes, one per CPU, on a share of the files each "
                               "(no target: what this machine gives any split of the job)", _ratio(r["encrypt_1_core_over_shares_time"]), "", ""])
        ratio_rows += [
            ["reencrypt cell operations (untimed counting run)", targets["reencrypt_cell_operations"]["measured"], targets["reencrypt_cell_operations"]["target"], _met(targets["reencrypt_cell_operations"]["met"])],
            ["stored bytes per encrypted cell beyond its raw plaintext", f"{targets['stored_bytes_per_cell_beyond_plaintext']['measured']:.2f}",
             targets["stored_bytes_per_cell_beyond_plaintext"]["target"], _met(targets["stored_bytes_per_cell_beyond_plaintext"]["met"])],
        ]
    ratio_rows += [
        target_row("keyturn `rotate --rewrap` time ÷ PME `rotate_master_keys` time", "rotate_rewrap_over_pme_rotate_time", r["rotate_rewrap_over_pme_rotate_time"]),
        target_row("reencrypt time ÷ `rotate --rewrap` time", "reencrypt_over_rotate_rewrap_time", r["reencrypt_over_rotate_rewrap_time"]),
        ["KMS calls of the rewrap, per round (DEKs in the directory: " + f"{p['deks']:,})", ", ".join(str(x) for x in targets["rewrap_kms_calls_equal_deks"]["measured"]), "= DEKs", _met(targets["rewrap_kms_calls_equal_deks"]["met"])],
        ["lake bytes written by `rotate --rewrap` (max over rounds)", f"{targets['rotate_rewrap_lake_bytes_written']['measured']:,}", "0", _met(targets["rotate_rewrap_lake_bytes_written"]["met"])],
        target_row("decrypt throughput with the directory ÷ without", "decrypt_directory_over_no_directory_throughput", read["throughput_ratio"]),
        ["reencrypt time ÷ plain pyarrow rewrite time", _ratio(r["reencrypt_over_plain_time"]), "(for reference)", ""],
    ]
    if "encrypt_over_pme_write_time" not in targets:
        ratio_rows.append(["keyturn encrypt time ÷ PME write time", _ratio(r["encrypt_over_pme_time"]), "(for reference)", ""])
    ext = p["pme_external"]
    parts = [
        _run_line(meta, result),
        "",
        f"Lake: {p['rows']:,} rows, {p['partitions']} partitions, {p['lake_files']} files, {p['lake_bytes'] / 1e6:,.0f} MB encrypted, "
        f"{p['deks']:,} DEKs in the directory (source {p['source_bytes'] / 1e6:,.0f} MB plain Parquet in {p['source_files']} files; "
        f"PME write output {p['pme_bytes'] / 1e6:,.0f} MB; PME lake with external key material {ext['bytes'] / 1e6:,.0f} MB in {ext['files']} files "
        f"plus {ext['key_material_files']} key-material files, same layout as the keyturn lake); sensitive columns {', '.join(p['sensitive'])}; "
        f"seed {p['seed']}; {p['runs']} timed rounds, no warm-up. PME: {p['pme']}. PME rotation: {p['pme_rotation']}. "
        f"keyturn rotation: {p['rotate_rewrap']}; {p['rewrap_rate_limit']}.",
        "",
        _table(["Rotation", "Time median", "Spread", "Lake bytes written (snapshot: size, mtime, SHA-256 of every file)", "Other bytes written", "KMS calls"], rot_rows),
        "",
        f"Of keyturn's `rotate --rewrap` (medians over rounds): `rotate` {_median([x['rotate_s'] for x in rr]):.3f} s, "
        f"`rewrap` {_median([x['rewrap_s'] for x in rr]):.3f} s ({1e3 * _median([x['rewrap_s'] for x in rr]) / max(1, p['deks']):.2f} ms per DEK).",
        "",
        _table(["Step", "Time median", "Spread", "Rows/s", "Encrypted-lake MB/s"], rows),
        "",
        _table(["Rotation (untimed counting run)", "Files rewritten", "Bytes rewritten", "Payload bytes decrypted", "Cells decrypted", "KMS calls"], payload_rows),
        "",
        f"Read path: `decrypt_batch` over the {read['files']} files' row groups ({read['cells']:,} cells), one reader per file, "
        f"on the home after `rotate --rewrap` (directory on the new version, rows' birth envelopes on the old), interleaved file by file, outputs compared:",
        "",
        _table(["Reader", "Time median", "Spread", "Cells/s", "KMS unwraps per round", "Directory lookups per round"], read_rows),
        "",
        _table(["Ratio / count", "Median (min – max of rounds)", "Target", "Met"], ratio_rows),
    ]
    storage = result.get("storage")
    if storage:
        names = {
            "keyturn": "keyturn lake as written (ciphertext columns DELTA_BYTE_ARRAY, no dictionary)",
            "keyturn_lake_pyarrow_default_encodings": "the same lake rewritten with pyarrow's defaults (dictionary, falling back to PLAIN)",
            "pme": "PME write (encrypts pages after compression)",
        }
        srows = [
            [label, f"{storage[k]['bytes_per_cell_beyond_plaintext']:.2f}",
             ", ".join(f"{c} {v:.2f}" for c, v in storage[k]["per_column"].items()), ", ".join(sorted(set().union(*map(set, storage[k]["encodings"].values()))))]
            for k, label in names.items() if k in storage
        ]
        parts += ["", f"Storage: the sensitive columns' compressed column chunks (Parquet metadata, every file) minus the raw plaintext bytes of the "
                  f"same {storage['keyturn']['cells']:,} cells in the source, per cell (snappy in every case):", "",
                  _table(["Files", "Bytes per cell beyond plaintext", "Per column", "Encodings seen"], srows)]
    prof = result.get("profile", {}).get("rotate_rewrap")
    if prof:
        parts += ["", f"cProfile of one `rotate --rewrap` ({prof['total_s']:.3f} s under the profiler):", "", _profile_table(prof, top=8)]
    for job in ("encrypt", "reencrypt"):
        tp = result.get("profile", {}).get(job)
        if tp:
            threads = ", ".join(f"{n} {v:.2f} s" for n, v in list(tp["threads"].items())[:6])
            parts += [
                "",
                f"cProfile of one `{job}` run on the in-process runner, every thread ({tp['wall_s']:.2f} s wall under the profiler): "
                f"the calling thread {tp['main']['total_s']:.2f} s of own time, {100 * tp['main']['wait_share']:.0f} % of it blocked; "
                f"the {len(tp['threads'])} threads it started {tp['workers']['total_s']:.2f} s, "
                f"{100 * tp['workers']['wait_share']:.0f} % blocked ({threads}). Top functions by own time, waits left out, "
                "calling thread then started threads:",
                "",
                _profile_table({"top": tp["main"]["work_top"]}, top=8),
                "",
                _profile_table({"top": tp["workers"]["work_top"]}, top=8),
            ]
    return "\n".join(parts)


def render_memory(result: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    p = result["params"]
    med = result["median_peak_rss_bytes"]
    big = f"{p['scale']}x"
    rows = [
        ["floor: a child that only imports", "", "", f"{med['floor'] / 2**20:,.0f} MiB", _spread_mib(result["peak_rss_bytes"]["floor"]), "", "", ""],
    ]
    for label in ("1x", big):
        lake = p["lakes"][label]
        rows.append([
            f"reencrypt, {label} lake", f"{lake['rows']:,} rows, {lake['files']} files, {lake['bytes'] / 1e6:,.0f} MB",
            f"{result['seconds'][label]['median_s']:.1f} s", f"{med[label] / 2**20:,.0f} MiB", _spread_mib(result["peak_rss_bytes"][label]),
            f"{result['above_floor_bytes'][label] / 2**20:,.0f} MiB",
            _ratio(result["ratio"]) if label == big else "", (f"≤ {result['target']:g} " + _met(result["met"])) if label == big else "",
        ])
    above = result.get("ratio_above_floor")
    parts = [
        _run_line(meta, result),
        "",
        f"Peak RSS (of the child and its children, sampled every 5 ms with psutil) of `keyturn.pipelines.reencrypt.run(mode=\"reencrypt\")` in a child process, {p['runs']} runs each. "
        f"Above the import floor, {big} ÷ 1x = {above:.2f}." if above else "",
        "",
        _table(["Run", "Lake", "Time median", "Peak RSS median", "Spread", "Above floor", f"{big} ÷ 1x (min – max)", "Target / met"], rows),
    ]
    return "\n".join(parts)


def _spread_mib(values: Sequence[int]) -> str:
    return f"{min(values) / 2**20:,.0f} – {max(values) / 2**20:,.0f} MiB"


RENDERERS: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], str]] = {
    "peers": render_peers,
    "kms": render_kms,
    "beam_workers": render_beam_workers,
    "lake": render_lake,
    "memory": render_memory,
    "cells": render_cells,
    "beam_overhead": render_beam_overhead,
    "beam_streaming": render_beam_streaming,
}


def render(results: Mapping[str, Any]) -> dict[str, str]:
    """The generated Markdown for each benchmark in `results`, and for the machine."""
    sections = {"machine": render_machine(results)}
    for name, result in results["benchmarks"].items():
        sections[name] = RENDERERS[name](result, results)
    return sections


def _marker(name: str, which: str) -> str:
    return f"<!-- bench:{name}:{which} -->"


def update_markdown(text: str, sections: Mapping[str, str]) -> str:
    """Replace the text between each section's begin/end markers; `ValueError` if markers are missing."""
    for name, body in sections.items():
        pattern = re.compile(re.escape(_marker(name, "begin")) + r".*?" + re.escape(_marker(name, "end")), re.DOTALL)
        if len(pattern.findall(text)) != 1:
            raise ValueError(f"BENCHMARKS.md needs exactly one {_marker(name, 'begin')} ... {_marker(name, 'end')} block")
        replacement = f"{_marker(name, 'begin')}\n{body.strip()}\n{_marker(name, 'end')}"
        text = pattern.sub(lambda _m: replacement, text)
    return text


_NO_MET = object()


def _summary_line(bench: str, label: str, value: Any, spec: str = "", target: str = "", met: Any = _NO_MET) -> str:
    """One line of `summary`: `value` formatted with `spec`; the met column only where `met` is given."""
    line = f"{bench:<16} {label:<46} {value:>14{spec}} {target:>10}"
    return line if met is _NO_MET else f"{line}  {met}"


def summary(results: Mapping[str, Any]) -> str:
    """A short plain-text table for the terminal: one line per target."""
    lines = [f"{'benchmark':<16} {'measurement':<46} {'value':>14} {'target':>10}  met"]
    b = results["benchmarks"]
    if "cells" in b:
        r = b["cells"]
        lines += [
            _summary_line("cells", "encrypt_batch / bare AES-GCM (cells/s)", r["encrypt"]["ratio"]["median"], ".3f", ">= " + str(r["encrypt"]["target"]), r["encrypt"]["met"]),
            _summary_line("cells", "encrypt_batch cells/s", r["encrypt"]["keyturn_cells_per_s"]["median"], ",.0f"),
            _summary_line("cells", "decrypt_batch / bare AES-GCM (cells/s)", r["decrypt"]["ratio"]["median"], ".3f", "-", "-"),
            _summary_line("cells", "decrypt_batch cells/s", r["decrypt"]["keyturn_cells_per_s"]["median"], ",.0f"),
            _summary_line("cells", "KMS calls per 1M cells", r["kms"]["calls_per_1m_cells"], "g", "1", r["kms"]["met"]),
        ]
    if "beam_overhead" in b:
        r = b["beam_overhead"]
        lines += [
            _summary_line("beam_overhead", "pipeline / core loop (rows/s)", r["ratio"]["median"], ".3f", ">= " + str(r["target"]), r["met"]),
            _summary_line("beam_overhead", "same, without Beam fixed cost", r["ratio_without_fixed_cost"]["median"], ".3f"),
            _summary_line("beam_overhead", "pipeline rows/s", r["pipeline_rows_per_s"]["median"], ",.0f"),
        ]
    if "beam_streaming" in b:
        r = b["beam_streaming"]
        g = r["with_partition_batches"]
        lines.append(_summary_line("beam_streaming", "KMS calls per partition (max)", g["kms_calls_per_partition_max"], "", "<= " + str(r["target_per_partition"]), r["met"]))
        if r.get("without_partition_batches"):
            lines.append(_summary_line("beam_streaming", "same without PartitionBatches (baseline)", r["without_partition_batches"]["kms_calls_per_partition_max"]))
    if "peers" in b:
        r = b["peers"]
        for peer, label in (("bare_aesgcm", "keyturn / bare AES-GCM (encrypt cells/s)"), ("tink", "keyturn / Tink per record"), ("esdk", "keyturn / AWS ESDK per record"), ("esdk_cached", "keyturn / AWS ESDK + caching CMM")):
            t = r["targets"][peer]
            lines.append(_summary_line("peers", label, t["measured"], ".2f", (">= " + format(t["target"], "g")) if t["target"] else "-", t["met"]))
    if "kms" in b:
        r = b["kms"]
        lines += [
            _summary_line("kms", "keyturn KMS calls per 1M records", r["keyturn"]["calls_per_1m_records"], ",.0f"),
            _summary_line("kms", "per-record KMS calls per 1M records", r["per_record"]["calls_per_1m_records"], ",.0f"),
            _summary_line("kms", "keyturn / per-record", r["fraction"], ".2e", "<= 1e-04", r["met"]),
        ]
    if "beam_workers" in b:
        r = b["beam_workers"]
        lines.append(_summary_line("beam_workers", "2 workers / 1 worker (rows/s)", r["speedup"]["median"], ".2f", ">= " + format(r["target"], "g"), r["met"]))
    if "lake" in b:
        r = b["lake"]
        t = r["targets"]
        for key, label in (
            ("rotate_rewrap_over_pme_rotate_time", "rotate --rewrap time / PME rotate_master_keys"),
            ("reencrypt_over_rotate_rewrap_time", "reencrypt time / rotate --rewrap time"),
            ("decrypt_directory_over_no_directory_throughput", "decrypt with directory / without (throughput)"),
        ):
            lines.append(_summary_line("lake", label, t[key]["measured"], ".2f", t[key]["target"], t[key]["met"]))
        calls = t["rewrap_kms_calls_equal_deks"]["measured"]
        lines.append(_summary_line("lake", "rewrap KMS calls (DEKs: " + format(r["params"]["deks"], ",") + ")", max(calls) if calls else 0, ",", "= DEKs", t["rewrap_kms_calls_equal_deks"]["met"]))
        lines.append(_summary_line("lake", "rotate --rewrap lake bytes written", t["rotate_rewrap_lake_bytes_written"]["measured"], ",", "0", t["rotate_rewrap_lake_bytes_written"]["met"]))
        for key, label in (
            ("encrypt_over_pme_write_time", "encrypt time / PME write time"),
            ("encrypt_1_core_over_default_time", "encrypt 1 core / default (cores) time"),
            ("stored_bytes_per_cell_beyond_plaintext", "stored bytes per cell beyond plaintext"),
        ):
            if key in t:
                lines.append(_summary_line("lake", label, t[key]["measured"], ".2f", t[key]["target"], t[key]["met"]))
        if "encrypt_1_core_over_shares_time" in r.get("ratios", {}):
            lines.append(_summary_line("lake", "encrypt 1 core / a process per CPU (ceiling)",
                                       r["ratios"]["encrypt_1_core_over_shares_time"]["median"], ".2f"))
        if "reencrypt_cell_operations" in t:
            c = t["reencrypt_cell_operations"]
            lines.append(_summary_line("lake", "reencrypt per cell", c["measured"], "", "2+1", c["met"]))
        lines.append(_summary_line("lake", "lake MB", r["params"]["lake_bytes"] / 1e6, ",.0f"))
    if "memory" in b:
        r = b["memory"]
        lines.append(_summary_line("memory", "peak RSS 4x lake / 1x lake", r["ratio"]["median"], ".2f", "<= " + format(r["target"], "g"), r["met"]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", metavar="NAME", help=f"benchmarks to run (repeat or comma-separate): {', '.join(BENCHMARKS)}, beam, all")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke test; leaves BENCHMARKS.md alone")
    parser.add_argument("--runs", type=int, default=7, help="timed rounds per timing benchmark (default 7; use >= 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds (default 1)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT})")
    parser.add_argument("--markdown", default=DEFAULT_MD, help=f"file whose generated tables are rewritten (default {DEFAULT_MD})")
    parser.add_argument("--no-md", action="store_true", help="do not rewrite the Markdown tables")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        raise SystemExit("--runs must be >= 1 and --warmup >= 0")
    selected = _select(args.only)
    sizes = SIZES["quick" if args.quick else "full"]
    info = machine_info()
    info["load_avg_start"] = list(os.getloadavg())
    results: dict[str, Any] = {
        "command": command_line(argv),
        "quick": args.quick,
        "machine": info,
        "benchmarks": {},
    }
    print(f"keyturn benchmarks: {', '.join(selected)} ({'quick' if args.quick else 'full'} size)", flush=True)
    print(f"machine: {machine_line(info)}; load average {info['load_avg_start'][0]:.2f}", flush=True)
    if info["load_avg_start"][0] > 0.5 * (info.get("usable_cores") or 1):
        print("warning: the machine is busy; timings will be noisy", flush=True)
    for name in selected:
        print(f"-- {name} ...", flush=True)
        started = time.perf_counter()
        result = _run_one(name, sizes[name], args.runs, args.warmup)
        result["elapsed_s"] = round(time.perf_counter() - started, 1)
        results["benchmarks"][name] = result
        print(f"   done in {result['elapsed_s']:.0f} s", flush=True)
    info["load_avg_end"] = list(os.getloadavg())

    out = args.out if os.path.isabs(args.out) else os.path.join(os.getcwd(), args.out)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2, sort_keys=False)
        fh.write("\n")

    sections = render(results)
    if selected != list(BENCHMARKS):
        sections.pop("machine")  # the machine table describes the last full run
    print()
    print(summary(results))
    print()
    for name in selected:
        print(f"## {name}\n\n{sections[name]}\n")
    print(f"results: {args.out}")

    if not args.quick and not args.no_md:
        md = args.markdown if os.path.isabs(args.markdown) else os.path.join(_ROOT, args.markdown)
        with open(md, encoding="utf-8") as fh:
            text = fh.read()
        with open(md, "w", encoding="utf-8") as fh:
            fh.write(update_markdown(text, sections))
        print(f"tables rewritten in {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
