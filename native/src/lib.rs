//! `keyturn._native`: the Python face of the column kernel (`kernel.rs`).
//!
//! Two functions, `seal_cells` and `open_cells`. Each takes the cell key for
//! the length of the call only: the AES key schedule is built from the
//! caller's buffer, used with the GIL released, and wiped when it is dropped
//! at the end of the call (aes-gcm's `zeroize` feature). Nothing here keeps a
//! key, a cipher or a plaintext between calls, and each call overwrites the
//! stack its AES code used (`kernel::scrub_stack`), so no spilled round key
//! outlives it either.
//!
//! A column is either a Python list (each item `bytes` or `None`) or the
//! buffers of an Arrow binary-like array, passed as the tuple
//! `(data, offsets, offset_width, start, count, validity)`: `offsets` holds
//! int32 (width 4) or int64 (width 8) values, rows `start .. start + count`
//! are read, and `validity` is an Arrow bitmap (bit `start + i` for row i)
//! or None. Buffers are read in place through the buffer protocol.
//!
//! Results are Arrow binary buffers as `bytes`:
//! `(validity | None, offsets, data, large, n)` where `large` says the
//! offsets are int64 (the data reached 2 GiB) rather than int32.

mod kernel;

use aes_gcm::{Aes256Gcm, KeyInit};
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyOverflowError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use kernel::{Aad, CELL_OVERHEAD, DEK_ID_BYTES, FAILED, MAX_CELL_PLAINTEXT, OPENED};

const KEY_BYTES: usize = 32;

/// A contiguous buffer exported by a Python object, held for the call.
struct Held(PyUntypedBuffer);

impl Held {
    fn get(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Self> {
        let buf = PyUntypedBuffer::get(obj)
            .map_err(|_| PyTypeError::new_err(format!("{what} must support the buffer protocol")))?;
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err(format!("{what} must be a contiguous buffer")));
        }
        Ok(Held(buf))
    }

    fn bytes(&self) -> &[u8] {
        let len = self.0.len_bytes();
        if len == 0 {
            return &[];
        }
        // SAFETY: the exporter keeps `len` bytes at `buf_ptr` alive (and, for a resizable
        // object such as a bytearray, refuses to resize) until `self.0` is released.
        unsafe { std::slice::from_raw_parts(self.0.buf_ptr() as *const u8, len) }
    }
}

/// What a column argument keeps alive while its slices are in use.
enum Holder<'py> {
    List(Vec<Bound<'py, PyAny>>),
    Arrow { data: Held, offsets: Held, validity: Option<Held>, width: usize, start: usize, count: usize },
}

impl<'py> Holder<'py> {
    fn get(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Self> {
        if let Ok(list) = obj.cast::<PyList>() {
            return Ok(Holder::List(list.iter().collect()));
        }
        let Ok(tuple) = obj.cast::<PyTuple>() else {
            return Err(PyTypeError::new_err(format!(
                "{what} must be a list of bytes/None or a (data, offsets, offset_width, start, count, validity) tuple"
            )));
        };
        if tuple.len() != 6 {
            return Err(PyTypeError::new_err(format!("{what} as Arrow buffers is a 6-tuple")));
        }
        let width: usize = tuple.get_item(2)?.extract()?;
        if width != 4 && width != 8 {
            return Err(PyValueError::new_err("offset_width must be 4 (int32) or 8 (int64)"));
        }
        let validity = tuple.get_item(5)?;
        Ok(Holder::Arrow {
            data: Held::get(&tuple.get_item(0)?, "the data buffer")?,
            offsets: Held::get(&tuple.get_item(1)?, "the offsets buffer")?,
            validity: if validity.is_none() { None } else { Some(Held::get(&validity, "the validity bitmap")?) },
            width,
            start: tuple.get_item(3)?.extract()?,
            count: tuple.get_item(4)?.extract()?,
        })
    }

    /// One slice per row, None for a null.
    fn slices(&self, what: &str) -> PyResult<Vec<Option<&[u8]>>> {
        match self {
            Holder::List(items) => items
                .iter()
                .map(|item| {
                    if item.is_none() {
                        Ok(None)
                    } else {
                        item.cast::<PyBytes>()
                            .map(|b| Some(b.as_bytes()))
                            .map_err(|_| PyTypeError::new_err(format!("{what} items must be bytes or None")))
                    }
                })
                .collect(),
            Holder::Arrow { data, offsets, validity, width, start, count } => {
                let (data, raw, (start, count), width) = (data.bytes(), offsets.bytes(), (*start, *count), *width);
                let end = start
                    .checked_add(count)
                    .and_then(|e| e.checked_add(1))
                    .ok_or_else(|| PyValueError::new_err("start + count overflows"))?;
                if raw.len() < end.saturating_mul(width) {
                    return Err(PyValueError::new_err("the offsets buffer is shorter than start + count + 1 offsets"));
                }
                let at = |k: usize| -> i64 {
                    let b = &raw[k * width..(k + 1) * width];
                    if width == 4 {
                        i32::from_le_bytes(b.try_into().unwrap()) as i64
                    } else {
                        i64::from_le_bytes(b.try_into().unwrap())
                    }
                };
                let bits = match validity {
                    Some(v) => {
                        let v = v.bytes();
                        if v.len() * 8 < start + count {
                            return Err(PyValueError::new_err("the validity bitmap is shorter than start + count bits"));
                        }
                        Some(v)
                    }
                    None => None,
                };
                let mut out = Vec::with_capacity(count);
                let mut lo = at(start);
                for i in 0..count {
                    let hi = at(start + i + 1);
                    if lo < 0 || hi < lo || hi as u64 > data.len() as u64 {
                        return Err(PyValueError::new_err("offsets must be non-negative, non-decreasing and inside the data"));
                    }
                    let j = start + i;
                    let valid = bits.map_or(true, |v| v[j >> 3] >> (j & 7) & 1 == 1);
                    out.push(if valid { Some(&data[lo as usize..hi as usize]) } else { None });
                    lo = hi;
                }
                Ok(out)
            }
        }
    }
}

/// The associated-data argument: one `bytes`-like for every cell, or a list with one per row.
enum AadHolder<'py> {
    Shared(Held),
    PerRow(Vec<Bound<'py, PyAny>>),
}

impl<'py> AadHolder<'py> {
    fn get(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(list) = obj.cast::<PyList>() {
            return Ok(AadHolder::PerRow(list.iter().collect()));
        }
        Ok(AadHolder::Shared(Held::get(obj, "aad")?))
    }

    fn view(&self, rows: &[Option<&[u8]>]) -> PyResult<Aad<'_>> {
        match self {
            AadHolder::Shared(h) => Ok(Aad::Shared(h.bytes())),
            AadHolder::PerRow(items) => {
                if items.len() != rows.len() {
                    return Err(PyValueError::new_err(format!(
                        "aad must be one bytes for every cell or a list with one per row ({} rows, {} aads)",
                        rows.len(),
                        items.len()
                    )));
                }
                let mut out = Vec::with_capacity(items.len());
                for (item, row) in items.iter().zip(rows) {
                    if item.is_none() {
                        if row.is_some() {
                            return Err(PyTypeError::new_err("aad is None at a row that holds a value"));
                        }
                        out.push(None);
                    } else {
                        let b = item
                            .cast::<PyBytes>()
                            .map_err(|_| PyTypeError::new_err("per-row aad items must be bytes or None"))?;
                        out.push(Some(b.as_bytes()));
                    }
                }
                Ok(Aad::PerRow(out))
            }
        }
    }
}

/// The AES-256-GCM cipher for one call, keyed straight from the caller's buffer (no copy is made
/// here); its key schedule is wiped when it is dropped. The error never shows key bytes.
fn cipher(key: &Bound<'_, PyAny>) -> PyResult<Aes256Gcm> {
    let held = Held::get(key, "the cell key")?;
    if held.bytes().len() != KEY_BYTES {
        return Err(PyValueError::new_err(format!("a cell key must be {KEY_BYTES} bytes")));
    }
    Aes256Gcm::new_from_slice(held.bytes()).map_err(|_| PyValueError::new_err(format!("a cell key must be {KEY_BYTES} bytes")))
}

fn dek_id_of(obj: &Bound<'_, PyAny>) -> PyResult<[u8; DEK_ID_BYTES]> {
    let held = Held::get(obj, "dek_id")?;
    held.bytes().try_into().map_err(|_| PyValueError::new_err(format!("dek_id must be {DEK_ID_BYTES} bytes")))
}

/// Arrow offsets as bytes: int32 while they fit, else int64 (then `large` is true).
fn offsets_bytes<'py>(py: Python<'py>, offsets: &[usize]) -> PyResult<(Bound<'py, PyBytes>, bool)> {
    let large = offsets.last().is_some_and(|&end| end > i32::MAX as usize);
    let width = if large { 8 } else { 4 };
    let out = PyBytes::new_with(py, offsets.len() * width, |buf| {
        for (slot, &o) in buf.chunks_exact_mut(width).zip(offsets) {
            if large {
                slot.copy_from_slice(&(o as i64).to_le_bytes());
            } else {
                slot.copy_from_slice(&(o as i32).to_le_bytes());
            }
        }
        Ok(())
    })?;
    Ok((out, large))
}

/// An Arrow validity bitmap (bit i set where `valid(i)`), or None when every row is valid.
fn bitmap<'py>(py: Python<'py>, rows: usize, valid: impl Fn(usize) -> bool) -> PyResult<Option<Bound<'py, PyBytes>>> {
    if (0..rows).all(&valid) {
        return Ok(None);
    }
    let out = PyBytes::new_with(py, rows.div_ceil(8), |buf| {
        for i in (0..rows).filter(|&i| valid(i)) {
            buf[i >> 3] |= 1 << (i & 7);
        }
        Ok(())
    })?;
    Ok(Some(out))
}

/// Run `call`, then overwrite the stack it used (`kernel::scrub_stack`). `call` runs in a frame
/// of its own below this one, so the scrub reaches whatever its AES code left on the stack.
fn scrubbed<T>(call: impl FnOnce() -> T) -> T {
    let out = in_own_frame(call);
    kernel::scrub_stack();
    out
}

#[inline(never)]
fn in_own_frame<T>(call: impl FnOnce() -> T) -> T {
    call()
}

/// Parse a column argument and its associated data (in that order) and pass their views to `f`.
fn with_rows<R>(
    column: &Bound<'_, PyAny>,
    what: &str,
    aad: &Bound<'_, PyAny>,
    f: impl FnOnce(&[Option<&[u8]>], &Aad<'_>) -> PyResult<R>,
) -> PyResult<R> {
    let holder = Holder::get(column, what)?;
    let rows = holder.slices(what)?;
    let aad_holder = AadHolder::get(aad)?;
    let aad = aad_holder.view(&rows)?;
    f(&rows, &aad)
}

/// Key the cipher from `key` and let `fill(cipher, offsets, out)` write the data buffer that
/// `lengths` frame; the cipher is dropped, wiping its key schedule, before the offsets are built.
/// Returns `(data, offsets, large)` as `offsets_bytes` gives them.
fn keyed_fill<'py>(
    py: Python<'py>,
    key: &Bound<'py, PyAny>,
    lengths: &[usize],
    fill: impl FnOnce(&Aes256Gcm, &[usize], &mut [u8]) -> PyResult<()>,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>, bool)> {
    let offsets = kernel::offsets_of(lengths);
    let cipher = cipher(key)?;
    let total = *offsets.last().unwrap_or(&0);
    let data = PyBytes::new_with(py, total, |out| fill(&cipher, &offsets, out))?;
    drop(cipher);
    let (offsets_out, large) = offsets_bytes(py, &offsets)?;
    Ok((data, offsets_out, large))
}

/// Seal every non-null value of a column under one cell key; nulls stay null and take no nonce.
///
/// The k-th non-null value takes nonce `first_nonce + k` (96-bit big-endian), exactly as
/// `keyturn.scope.nonce_block`; the caller reserves that range before the call. `aad` is one
/// associated data for every cell or a list with one per row (None allowed at a null row).
/// Returns `(validity | None, offsets, data, large, sealed)`: the framed cells of docs/FORMAT.md
/// section 4 as the buffers of an Arrow binary (int32 offsets) or large_binary (int64) array, and
/// the number of cells sealed. `ValueError` for a wrong key, dek_id or value size;
/// `OverflowError` if the nonces would leave the 96-bit space.
#[pyfunction]
#[pyo3(signature = (key, dek_id, first_nonce, values, aad, *, parallel = true))]
fn seal_cells<'py>(
    py: Python<'py>,
    key: &Bound<'py, PyAny>,
    dek_id: &Bound<'py, PyAny>,
    first_nonce: &Bound<'py, PyAny>,
    values: &Bound<'py, PyAny>,
    aad: &Bound<'py, PyAny>,
    parallel: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    scrubbed(|| {
        let first: u128 = first_nonce.extract().map_err(|_| PyOverflowError::new_err("nonce space exhausted"))?;
        let dek_id = dek_id_of(dek_id)?;
        with_rows(values, "values", aad, |rows, aad| {
            let mut lengths = Vec::with_capacity(rows.len());
            let mut sealed: usize = 0;
            for v in rows {
                match v {
                    Some(v) if v.len() > MAX_CELL_PLAINTEXT => {
                        return Err(PyValueError::new_err(format!("a cell value exceeds {MAX_CELL_PLAINTEXT} bytes")));
                    }
                    Some(v) => {
                        lengths.push(CELL_OVERHEAD + v.len());
                        sealed += 1;
                    }
                    None => lengths.push(0),
                }
            }
            if !kernel::nonce_range_fits(first, sealed as u128) {
                return Err(PyOverflowError::new_err("nonce space exhausted"));
            }
            let (data, offsets_out, large) = keyed_fill(py, key, &lengths, |cipher, offsets, out| {
                py.detach(|| kernel::seal(cipher, &dek_id, first, rows, aad, offsets, out, parallel))
                    .map_err(|_| PyRuntimeError::new_err("AES-GCM refused to seal a cell"))
            })?;
            let validity = bitmap(py, rows.len(), |i| rows[i].is_some())?;
            (validity, offsets_out, data, large, sealed).into_pyobject(py)
        })
    })
}

/// Open a column of cells sealed under one cell key and `dek_id`.
///
/// Each non-null cell must be 45 to 45 + 64 MiB bytes, start with the version byte and `dek_id`,
/// and authenticate under its nonce and `aad` (one for every cell, or a list with one per row).
/// Returns `(validity | None, offsets, data, large, status, failed)`: the plaintexts as Arrow
/// binary buffers (a row is valid only where its cell opened), `status` with one byte per row
/// (0 opened, 1 null, 2 failed) and the number that failed. A failed cell's bytes are zero and
/// the row is null: no unauthenticated plaintext is ever returned. Bad cells never raise.
#[pyfunction]
#[pyo3(signature = (key, dek_id, cells, aad, *, parallel = true))]
fn open_cells<'py>(
    py: Python<'py>,
    key: &Bound<'py, PyAny>,
    dek_id: &Bound<'py, PyAny>,
    cells: &Bound<'py, PyAny>,
    aad: &Bound<'py, PyAny>,
    parallel: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    scrubbed(|| {
        let dek_id = dek_id_of(dek_id)?;
        with_rows(cells, "cells", aad, |rows, aad| {
            let lengths = kernel::open_lengths(rows, &dek_id);
            let mut status = vec![FAILED; rows.len()];
            let (data, offsets_out, large) = keyed_fill(py, key, &lengths, |cipher, offsets, out| {
                py.detach(|| kernel::open(cipher, &dek_id, rows, aad, offsets, out, &mut status, parallel));
                Ok(())
            })?;
            let failed = status.iter().filter(|&&s| s == FAILED).count();
            let validity = bitmap(py, rows.len(), |i| status[i] == OPENED)?;
            let status = PyBytes::new(py, &status);
            (validity, offsets_out, data, large, status, failed).into_pyobject(py)
        })
    })
}

/// Whether this build runs AES with hardware instructions (AES-NI and CLMUL on x86-64).
#[pyfunction]
fn hardware_aes() -> bool {
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86", target_arch = "aarch64")))]
    {
        false
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(seal_cells, m)?)?;
    m.add_function(wrap_pyfunction!(open_cells, m)?)?;
    m.add_function(wrap_pyfunction!(hardware_aes, m)?)?;
    m.add("API_VERSION", 1u32)?;
    m.add("FORMAT_VERSION", kernel::FORMAT_VERSION)?;
    m.add("STATUS_OPENED", OPENED)?;
    m.add("STATUS_NULL", kernel::NULL)?;
    m.add("STATUS_FAILED", FAILED)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
