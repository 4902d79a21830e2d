//! The column kernel: seal and open whole columns of keyturn v1 cells under one cell key.
//!
//! Pure Rust, no Python: `lib.rs` turns Python arguments into the slices
//! used here. A cell is `0x01 | dek_id (16) | nonce (12) | ciphertext | tag (16)`
//! (docs/FORMAT.md section 4); the k-th non-null value of a call takes nonce
//! `first + k`, a 96-bit big-endian counter (section 6).

use aes_gcm::aead::inout::InOutBuf;
use aes_gcm::aead::AeadInOut;
use aes_gcm::aead::consts::U12;
use aes_gcm::{Aes256Gcm, Tag};

type Nonce = aes_gcm::Nonce<U12>;
use rayon::prelude::*;
use zeroize::Zeroize;

pub const FORMAT_VERSION: u8 = 0x01;
pub const DEK_ID_BYTES: usize = 16;
pub const NONCE_BYTES: usize = 12;
pub const TAG_BYTES: usize = 16;
pub const HEADER_BYTES: usize = 1 + DEK_ID_BYTES + NONCE_BYTES;
pub const CELL_OVERHEAD: usize = HEADER_BYTES + TAG_BYTES;
pub const MAX_CELL_PLAINTEXT: usize = 64 * 1024 * 1024;
pub const MAX_NONCE: u128 = (1u128 << 96) - 1;

/// Per-cell outcome of `open`: the value opened, the cell was null, or it failed a check.
pub const OPENED: u8 = 0;
pub const NULL: u8 = 1;
pub const FAILED: u8 = 2;

/// Stack bytes `scrub_stack` overwrites: far more than the AES code's deepest frames use.
const SCRUB_BYTES: usize = 64 * 1024;

/// Overwrite the stack below the caller's frame with zeros.
///
/// AES implementations copy round keys into locals (vector registers spilled
/// to the stack, a schedule built and then moved); the cipher's own storage is
/// wiped when it drops, but those stack copies would otherwise stay until
/// something else happens to overwrite them. Call it from a frame no deeper
/// than the one that built or used the cipher.
#[inline(never)]
pub fn scrub_stack() {
    let mut area = [0u8; SCRUB_BYTES];
    area.zeroize(); // volatile writes: never optimised away
    std::hint::black_box(&area);
}

/// Scrub the stacks of every worker thread, after a parallel run.
fn scrub_workers() {
    rayon::broadcast(|_| scrub_stack());
}

/// Below this many bytes of work a column is processed on the calling thread (the fuzz build,
/// `--cfg fuzzing`, splits small inputs too, so the fuzzer reaches the parallel path).
const PARALLEL_MIN_BYTES: usize = if cfg!(fuzzing) { 64 } else { 1 << 20 };
const PARALLEL_MIN_CELLS: usize = if cfg!(fuzzing) { 2 } else { 4096 };

/// The associated data: one for every cell, or one per row (None at a null row).
pub enum Aad<'a> {
    Shared(&'a [u8]),
    PerRow(Vec<Option<&'a [u8]>>),
}

impl<'a> Aad<'a> {
    #[inline]
    fn of(&self, row: usize) -> &'a [u8] {
        match self {
            Aad::Shared(a) => a,
            // `lib.rs` checked that every non-null row has one.
            Aad::PerRow(v) => v[row].unwrap_or(&[]),
        }
    }
}

fn nonce_bytes(counter: u128) -> [u8; NONCE_BYTES] {
    let mut out = [0u8; NONCE_BYTES];
    out.copy_from_slice(&counter.to_be_bytes()[16 - NONCE_BYTES..]);
    out
}

/// Row ranges for the worker threads: contiguous, in order, each roughly the same bytes.
fn chunks(row_bytes: &[usize], total: usize, parallel: bool) -> Vec<(usize, usize)> {
    let rows = row_bytes.len();
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    if threads <= 1 || rows < PARALLEL_MIN_CELLS || total < PARALLEL_MIN_BYTES {
        return vec![(0, rows)];
    }
    let pieces = threads * 4;
    let target = total / pieces + 1;
    let mut out = Vec::with_capacity(pieces + 1);
    let (mut start, mut acc) = (0, 0);
    for (i, b) in row_bytes.iter().enumerate() {
        acc += b;
        if acc >= target {
            out.push((start, i + 1));
            start = i + 1;
            acc = 0;
        }
    }
    if start < rows {
        out.push((start, rows));
    }
    out
}

/// Output offsets (rows + 1 entries) from each row's output length.
pub fn offsets_of(lengths: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(lengths.len() + 1);
    let mut at = 0usize;
    out.push(0);
    for n in lengths {
        at += n;
        out.push(at);
    }
    out
}

/// Split `buf` into the pieces `[offsets[a]..offsets[b]]` of each chunk.
fn split_by<'b>(mut buf: &'b mut [u8], offsets: &[usize], ranges: &[(usize, usize)]) -> Vec<&'b mut [u8]> {
    let mut out = Vec::with_capacity(ranges.len());
    for &(a, b) in ranges {
        let (head, tail) = buf.split_at_mut(offsets[b] - offsets[a]);
        out.push(head);
        buf = tail;
    }
    out
}

/// Seal every non-null `values[i]` into `out[offsets[i]..offsets[i + 1]]` (offsets from `offsets_of`
/// over 45 + len per non-null row, 0 per null). The caller checked the nonce range and value sizes.
pub fn seal(
    cipher: &Aes256Gcm,
    dek_id: &[u8; DEK_ID_BYTES],
    first_nonce: u128,
    values: &[Option<&[u8]>],
    aad: &Aad<'_>,
    offsets: &[usize],
    out: &mut [u8],
    parallel: bool,
) -> Result<(), ()> {
    let row_bytes: Vec<usize> = (0..values.len()).map(|i| offsets[i + 1] - offsets[i]).collect();
    let ranges = chunks(&row_bytes, out.len(), parallel);
    // The nonce counter at the start of each chunk: first + non-null rows before it.
    let mut starts = Vec::with_capacity(ranges.len());
    let mut counter = first_nonce;
    for &(a, b) in &ranges {
        starts.push(counter);
        counter += values[a..b].iter().filter(|v| v.is_some()).count() as u128;
    }
    let pieces = split_by(out, offsets, &ranges);
    let work = |((range, piece), start): (((usize, usize), &mut [u8]), u128)| -> Result<(), ()> {
        let (a, b) = range;
        let base = offsets[a];
        let mut counter = start;
        for i in a..b {
            let Some(value) = values[i] else { continue };
            let slot = &mut piece[offsets[i] - base..offsets[i + 1] - base];
            let nonce = nonce_bytes(counter);
            counter += 1;
            slot[0] = FORMAT_VERSION;
            slot[1..1 + DEK_ID_BYTES].copy_from_slice(dek_id);
            slot[1 + DEK_ID_BYTES..HEADER_BYTES].copy_from_slice(&nonce);
            let (body, tag_out) = slot[HEADER_BYTES..].split_at_mut(value.len());
            let buffer = InOutBuf::new(value, body).map_err(|_| ())?;
            let tag = cipher
                .encrypt_inout_detached(&Nonce::from(nonce), aad.of(i), buffer)
                .map_err(|_| ())?;
            tag_out.copy_from_slice(&tag);
        }
        Ok(())
    };
    let jobs: Vec<_> = ranges.iter().copied().zip(pieces).zip(starts).collect();
    if jobs.len() == 1 {
        jobs.into_iter().try_for_each(work)
    } else {
        let done = jobs.into_par_iter().try_for_each(work);
        scrub_workers();
        done
    }
}

/// Whether a non-null cell has the framing `open` accepts: length bounds, version byte, this dek_id.
#[inline]
pub fn well_formed(cell: &[u8], dek_id: &[u8; DEK_ID_BYTES]) -> bool {
    cell.len() >= CELL_OVERHEAD
        && cell.len() <= CELL_OVERHEAD + MAX_CELL_PLAINTEXT
        && cell[0] == FORMAT_VERSION
        && cell[1..1 + DEK_ID_BYTES] == dek_id[..]
}

/// Each row's plaintext length for `open`'s output: a well-formed cell's length less the framing, 0 otherwise.
pub fn open_lengths(cells: &[Option<&[u8]>], dek_id: &[u8; DEK_ID_BYTES]) -> Vec<usize> {
    cells
        .iter()
        .map(|c| match c {
            Some(c) if well_formed(c, dek_id) => c.len() - CELL_OVERHEAD,
            _ => 0,
        })
        .collect()
}

/// Open every well-formed cell into `out[offsets[i]..offsets[i + 1]]` (its plaintext length; 0 for
/// null or malformed cells) and set `status[i]`. A cell that fails authentication leaves its slot
/// zeroed and `FAILED`: no unauthenticated byte is ever left in `out`.
pub fn open(
    cipher: &Aes256Gcm,
    dek_id: &[u8; DEK_ID_BYTES],
    cells: &[Option<&[u8]>],
    aad: &Aad<'_>,
    offsets: &[usize],
    out: &mut [u8],
    status: &mut [u8],
    parallel: bool,
) {
    let work_bytes: Vec<usize> = cells.iter().map(|c| c.map_or(0, |c| c.len())).collect();
    let total = work_bytes.iter().sum();
    let ranges = chunks(&work_bytes, total, parallel);
    let pieces = split_by(out, offsets, &ranges);
    let mut statuses = Vec::with_capacity(ranges.len());
    let mut rest = status;
    for &(a, b) in &ranges {
        let (head, tail) = rest.split_at_mut(b - a);
        statuses.push(head);
        rest = tail;
    }
    let work = |((range, piece), st): (((usize, usize), &mut [u8]), &mut [u8])| {
        let (a, b) = range;
        let base = offsets[a];
        for i in a..b {
            let Some(cell) = cells[i] else {
                st[i - a] = NULL;
                continue;
            };
            if !well_formed(cell, dek_id) {
                st[i - a] = FAILED;
                continue;
            }
            let slot = &mut piece[offsets[i] - base..offsets[i + 1] - base];
            let (body, tag) = cell[HEADER_BYTES..].split_at(cell.len() - CELL_OVERHEAD);
            let ok = match (
                <&Nonce>::try_from(&cell[1 + DEK_ID_BYTES..HEADER_BYTES]),
                <&Tag>::try_from(tag),
                InOutBuf::new(body, slot),
            ) {
                (Ok(nonce), Ok(tag), Ok(buffer)) => cipher.decrypt_inout_detached(nonce, aad.of(i), buffer, tag).is_ok(),
                _ => false,
            };
            if ok {
                st[i - a] = OPENED;
            } else {
                slot.zeroize();
                st[i - a] = FAILED;
            }
        }
    };
    let jobs: Vec<_> = ranges.iter().copied().zip(pieces).zip(statuses).collect();
    if jobs.len() == 1 {
        jobs.into_iter().for_each(work)
    } else {
        jobs.into_par_iter().for_each(work);
        scrub_workers();
    }
}

/// Whether nonces `first .. first + count - 1` stay in the 96-bit space (`nonce_block`'s rule).
pub fn nonce_range_fits(first: u128, count: u128) -> bool {
    first.checked_add(count).is_some_and(|end| end <= MAX_NONCE + 1)
}
