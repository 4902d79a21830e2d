"""Type stub of keyturn._native, the native column kernel (see keyturn/native.py for the wrapper to call)."""

from typing import Final

API_VERSION: Final[int]
FORMAT_VERSION: Final[int]
STATUS_OPENED: Final[int]
STATUS_NULL: Final[int]
STATUS_FAILED: Final[int]
__version__: Final[str]

# A column: a list of bytes/None, or Arrow buffers (data, offsets, offset_width, start, count, validity).
def seal_cells(
    key: object, dek_id: object, first_nonce: int, values: object, aad: object, *, parallel: bool = True
) -> tuple[bytes | None, bytes, bytes, bool, int]: ...
def open_cells(
    key: object, dek_id: object, cells: object, aad: object, *, parallel: bool = True
) -> tuple[bytes | None, bytes, bytes, bool, bytes, int]: ...
def hardware_aes() -> bool: ...
