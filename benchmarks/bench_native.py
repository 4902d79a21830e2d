"""The native column kernel against a bare Python AES-GCM loop and against `openssl speed`.

    python -m benchmarks.bench_native                    # 1M cells of 16 bytes, 136-byte associated data
    python -m benchmarks.bench_native --cells 200000 --size 64 --runs 3

Every subject seals (or opens) the same cells under one key with one shared
associated data, the shape of an unbound column: native with its worker
threads, native on the calling thread only, and the loop the Python path
runs (`AESGCM.encrypt` mapped over nonces and values, framing excluded, so
the loop is if anything flattered). If `openssl` is on the PATH, its
`speed -aead -evp aes-256-gcm` for the same message size gives the ceiling
of one core running OpenSSL's assembly (13-byte associated data, no framing).
Timings follow benchmarks.common: interleaved rounds, median and spread.
Prints a table and one JSON object; BENCHMARKS.md is not touched.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from itertools import repeat
from typing import Any

import pyarrow as pa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from benchmarks.common import machine_info, machine_line, measure_rounds, rate
from keyturn import native
from keyturn.scope import nonce_block


def openssl_rate(size: int, seconds: int = 3) -> dict[str, Any] | None:
    """Messages per second of `openssl speed -aead -evp aes-256-gcm` at `size` bytes, or None without openssl."""
    exe = shutil.which("openssl")
    if exe is None:
        return None
    cmd = [exe, "speed", "-seconds", str(seconds), "-bytes", str(size), "-aead", "-evp", "aes-256-gcm"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    match = re.search(r"^AES-256-GCM\s+([\d.]+)k\s*$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        return None
    bytes_per_s = float(match.group(1)) * 1000
    version = subprocess.run([exe, "version"], capture_output=True, text=True, check=False).stdout.strip()
    return {"command": " ".join(["openssl", *cmd[1:]]), "version": version, "cells_per_s": bytes_per_s / size}


def run(*, cells: int = 1_000_000, size: int = 16, aad_bytes: int = 136, runs: int = 5, warmup: int = 1) -> dict[str, Any]:
    if not native.kernel_loaded():
        raise SystemExit("the native kernel is not built: run `sh native/build-dev.sh .venv/bin/python` (make does)")
    import keyturn._native as ext

    key, dek_id, aad = os.urandom(32), os.urandom(16), os.urandom(aad_bytes)
    values = [os.urandom(size) for _ in range(cells)]
    arrow = pa.array(values, pa.binary())
    column = native._column(arrow)
    nonces = nonce_block(0, cells).view(f"V{12}").ravel().tolist()
    aead = AESGCM(key)
    sealed = native.seal_cells(key, dek_id, 0, arrow, aad)
    sealed_column = native._column(sealed)
    bodies = list(map(aead.encrypt, nonces, values, repeat(aad)))

    subjects = {
        "native seal": lambda: ext.seal_cells(key, dek_id, 0, column, aad),
        "native seal, 1 thread": lambda: ext.seal_cells(key, dek_id, 0, column, aad, parallel=False),
        "python AESGCM seal loop": lambda: list(map(aead.encrypt, nonces, values, repeat(aad))),
        "native open": lambda: ext.open_cells(key, dek_id, sealed_column, aad),
        "native open, 1 thread": lambda: ext.open_cells(key, dek_id, sealed_column, aad, parallel=False),
        "python AESGCM open loop": lambda: list(map(aead.decrypt, nonces, bodies, repeat(aad))),
    }
    timings = measure_rounds(subjects, runs=runs, warmup=warmup)
    result: dict[str, Any] = {
        "cells": cells,
        "value_bytes": size,
        "aad_bytes": aad_bytes,
        "threads": os.cpu_count(),
        "hardware_aes": bool(ext.hardware_aes()),
        "kernel": native.kernel_version(),
        "subjects": {name: {**t.to_dict(), "cells_per_s": rate(cells, t)} for name, t in timings.items()},
        "openssl": openssl_rate(size),
        "machine": machine_line(machine_info()),
    }
    return result


def _table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['cells']:,} cells of {result['value_bytes']} bytes, {result['aad_bytes']}-byte AAD, "
        f"{result['threads']} CPUs, hardware AES: {result['hardware_aes']}",
        f"{'subject':<28}{'median s':>10}{'cells/s':>14}",
    ]
    for name, t in result["subjects"].items():
        lines.append(f"{name:<28}{t['median_s']:>10.3f}{t['cells_per_s']['median']:>14,.0f}")
    if result["openssl"]:
        lines.append(f"{'openssl speed (1 core)':<28}{'':>10}{result['openssl']['cells_per_s']:>14,.0f}")
    else:
        lines.append("openssl: not on this machine")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=16, help="bytes per value")
    parser.add_argument("--aad", type=int, default=136, help="bytes of associated data (136: the vectors' cell AAD)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    result = run(cells=args.cells, size=args.size, aad_bytes=args.aad, runs=args.runs)
    print(_table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
