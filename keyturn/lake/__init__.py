"""The lake: layout, footers and file summaries, atomic writes, inventory, lock, crashpoints, rewrites.

Local directories and S3 (`keyturn.lake.s3`, `keyturn.lake.s3lock`).

Beam-free. See `keyturn.lake.layout` for the directory layout and
`keyturn.lake.footer` for the ``keyturn`` footer every encrypted file carries.
"""

from keyturn.lake.atomic import AtomicParquetWriter, fsync_dir, write_parquet_atomically
from keyturn.crash import crashpoint
from keyturn.lake.footer import (
    FOOTER_KEY,
    FileSummary,
    Footer,
    count_versions,
    footer_for,
    parse_footer,
    read_file_summary,
)
from keyturn.lake.inventory import Inventory, take_inventory
from keyturn.lake.layout import KEYTURN_DIR, TEMP_PREFIX, DataFile, Lake, as_lake, is_hidden, is_temp_name
from keyturn.lake.lock import LakeLock, open_lock
from keyturn.lake.s3 import S3Settings

__all__ = [
    "Lake",
    "as_lake",
    "S3Settings",
    "open_lock",
    "DataFile",
    "KEYTURN_DIR",
    "TEMP_PREFIX",
    "is_hidden",
    "is_temp_name",
    "FOOTER_KEY",
    "Footer",
    "FileSummary",
    "footer_for",
    "parse_footer",
    "count_versions",
    "read_file_summary",
    "AtomicParquetWriter",
    "write_parquet_atomically",
    "fsync_dir",
    "Inventory",
    "take_inventory",
    "LakeLock",
    "crashpoint",
]
