//! Fuzz `kernel::open` on sealed cells the input mutates and on raw cells it spells.
//!
//! The input is read as: a flags byte (bit 0: parallel, bit 1: one AAD per
//! row), a count of plaintexts and their bytes (sealed under a fixed key),
//! then edits (flip a byte, truncate, extend, swap two cells, add a raw
//! cell). Whatever the bytes, `open` must return, and for every row:
//! - a cell equal to one that was sealed opens, to exactly its plaintext;
//! - any other cell is FAILED (or NULL when null), its output slot all zeros.
//! So a bad cell is only ever a failed row: no panic, no wrong plaintext,
//! no unauthenticated byte in the output.

#![no_main]

use aes_gcm::{Aes256Gcm, KeyInit};
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/kernel.rs"]
mod kernel;

use kernel::{Aad, CELL_OVERHEAD, FAILED, NULL, OPENED};

const KEY: [u8; 32] = [7u8; 32];
const DEK_ID: [u8; 16] = [0xA5; 16];
const FIRST_NONCE: u128 = 1 << 40;

struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
}

fn aad_of(row: usize, per_row: bool) -> Vec<u8> {
    if per_row {
        format!("row-{row}").into_bytes()
    } else {
        b"dataset|partition|field|type".to_vec()
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input { data };
    let flags = input.byte().unwrap_or(0);
    let (parallel, per_row) = (flags & 1 != 0, flags & 2 != 0);
    let cipher = Aes256Gcm::new_from_slice(&KEY).unwrap();

    // seal the plaintexts (every third one null when flag bit 2 is set)
    let count = input.byte().unwrap_or(0) as usize % 64;
    let mut plain: Vec<Option<Vec<u8>>> = Vec::with_capacity(count);
    for i in 0..count {
        let len = input.byte().unwrap_or(0) as usize;
        let value = input.take(len).to_vec();
        plain.push(if flags & 4 != 0 && i % 3 == 0 { None } else { Some(value) });
    }
    let aads: Vec<Vec<u8>> = (0..count).map(|i| aad_of(i, per_row)).collect();
    fn aad_for(n: usize, aads: &[Vec<u8>], per_row: bool) -> Aad<'_> {
        if per_row {
            Aad::PerRow((0..n).map(|i| aads.get(i).map(|a| a.as_slice())).collect())
        } else {
            Aad::Shared(b"dataset|partition|field|type")
        }
    }
    let values: Vec<Option<&[u8]>> = plain.iter().map(|v| v.as_deref()).collect();
    let lengths: Vec<usize> = values.iter().map(|v| v.map_or(0, |v| CELL_OVERHEAD + v.len())).collect();
    let offsets = kernel::offsets_of(&lengths);
    let mut sealed = vec![0u8; *offsets.last().unwrap()];
    kernel::seal(&cipher, &DEK_ID, FIRST_NONCE, &values, &aad_for(count, &aads, per_row), &offsets, &mut sealed, parallel)
        .unwrap();
    let originals: Vec<Option<Vec<u8>>> =
        (0..count).map(|i| values[i].map(|_| sealed[offsets[i]..offsets[i + 1]].to_vec())).collect();

    // edit them
    let mut cells = originals.clone();
    let mut aads = aads;
    while let Some(op) = input.byte() {
        let at = input.byte().unwrap_or(0) as usize;
        let arg = input.byte().unwrap_or(0);
        match op % 5 {
            0 | 1 => {
                if let Some(Some(cell)) = cells.get_mut(at % count.max(1)) {
                    if !cell.is_empty() {
                        let pos = (arg as usize * 7 + at) % cell.len();
                        cell[pos] ^= if op % 5 == 0 { 1 << (arg % 8) } else { arg | 1 };
                    }
                }
            }
            2 => {
                if let Some(Some(cell)) = cells.get_mut(at % count.max(1)) {
                    cell.truncate(cell.len().saturating_sub(arg as usize % 48 + 1));
                }
            }
            3 => {
                if let Some(Some(cell)) = cells.get_mut(at % count.max(1)) {
                    cell.extend(std::iter::repeat(arg).take(arg as usize % 17 + 1));
                }
            }
            _ => {
                if count > 1 && arg % 2 == 0 {
                    cells.swap(at % count, arg as usize % count);
                } else {
                    let raw = input.take(arg as usize).to_vec();
                    aads.push(aad_of(cells.len(), per_row));
                    cells.push(Some(raw));
                }
            }
        }
    }

    // open, and check every row
    let n = cells.len();
    let refs: Vec<Option<&[u8]>> = cells.iter().map(|c| c.as_deref()).collect();
    let out_offsets = kernel::offsets_of(&kernel::open_lengths(&refs, &DEK_ID));
    let mut out = vec![0xEEu8; *out_offsets.last().unwrap()];
    let mut status = vec![0xFFu8; n];
    kernel::open(&cipher, &DEK_ID, &refs, &aad_for(n, &aads, per_row), &out_offsets, &mut out, &mut status, parallel);
    for i in 0..n {
        let slot = &out[out_offsets[i]..out_offsets[i + 1]];
        let Some(cell) = &cells[i] else {
            assert_eq!(status[i], NULL, "row {i}: a null cell");
            continue;
        };
        // completeness: a sealed cell opens wherever its associated data is the same (unbound cells can
        // move between rows of one DEK, FORMAT.md)
        if let Some(j) = (0..count).find(|&j| originals[j].as_ref() == Some(cell) && aads[j] == aads[i]) {
            assert_eq!(status[i], OPENED, "row {i}: the cell sealed for row {j} must open");
            assert_eq!(Some(slot), plain[j].as_deref(), "row {i}: wrong plaintext");
        } else if (0..count).any(|j| originals[j].as_ref() == Some(cell)) {
            // a sealed cell moved to a row whose associated data differs (bound row keys): it must fail
            assert_eq!(status[i], FAILED, "row {i}: a cell sealed for another row's associated data opened");
        }
        match status[i] {
            // soundness: what opened is exactly the plaintext this cell seals (its nonce, this row's AAD)
            OPENED => assert_eq!(&reseal(&cipher, cell, slot, &aads[i], per_row), cell, "row {i}: a wrong plaintext"),
            FAILED => assert!(slot.iter().all(|&b| b == 0), "row {i}: bytes of a failed cell were left in the output"),
            other => panic!("row {i}: status {other} for a non-null cell"),
        }
    }
});

/// The cell that sealing `plaintext` under the fuzz key with `cell`'s nonce and this row's AAD gives,
/// framed here from `aes_gcm` directly (not with `kernel::seal`, so a fault the kernel's seal and
/// open share cannot hide): version byte, dek_id, nonce, ciphertext, tag.
fn reseal(cipher: &Aes256Gcm, cell: &[u8], plaintext: &[u8], aad: &[u8], per_row: bool) -> Vec<u8> {
    use aes_gcm::aead::inout::InOutBuf;
    use aes_gcm::aead::AeadInOut;
    let shared: &[u8] = b"dataset|partition|field|type";
    let nonce_bytes = &cell[17..29];
    let nonce = <&aes_gcm::Nonce<aes_gcm::aead::consts::U12>>::try_from(nonce_bytes).unwrap();
    let mut body = plaintext.to_vec();
    let tag = cipher
        .encrypt_inout_detached(nonce, if per_row { aad } else { shared }, InOutBuf::from(&mut body[..]))
        .unwrap();
    let mut out = vec![0x01u8];
    out.extend_from_slice(&DEK_ID);
    out.extend_from_slice(nonce_bytes);
    out.extend_from_slice(&body);
    out.extend_from_slice(&tag);
    out
}
