"""keyturn's reproducible benchmarks: `python -m benchmarks.run` (or `make bench`).

- `benchmarks.bench_cells`: `encrypt_batch` / `decrypt_batch` against bare
  AES-GCM loops over the same values, KMS calls per 1M cells, a cProfile
  breakdown of `encrypt_batch`;
- `benchmarks.bench_beam`: `EncryptBatches` on the DirectRunner against the
  plain core loop over the same batches, and KMS calls per partition in a
  streaming pipeline (TestStream -> PartitionBatches -> EncryptBatches).

Each benchmark measures its own baseline on the same data in the same run
and reports ratios; results go to bench-out/results.json and BENCHMARKS.md.
"""
