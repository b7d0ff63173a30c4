//! The raw images every backend serves, and the data pattern written to
//! them and checked.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use super::error::{HostBenchError, Result};
use super::load::splitmix64;

/// Fills `buf` with the pattern for image offset `offset` under `seed`:
/// every 8-byte word is a function of the seed and its own offset, so a
/// block returned from the wrong place, a stale block or zeros all differ.
pub fn fill_pattern(buf: &mut [u8], seed: u64, offset: u64) {
    for (i, word) in buf.chunks_mut(8).enumerate() {
        let mut state = seed ^ (offset + 8 * i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
        let value = splitmix64(&mut state).to_le_bytes();
        word.copy_from_slice(&value[..word.len()]);
    }
}

/// The first byte where `got` differs from the pattern, if any.
pub fn pattern_mismatch(got: &[u8], seed: u64, offset: u64) -> Option<usize> {
    let mut expected = vec![0; got.len()];
    fill_pattern(&mut expected, seed, offset);
    got.iter().zip(&expected).position(|(a, b)| a != b)
}

/// Creates `path` with `bytes` of the pattern under `seed` (fully
/// allocated: reads of a sparse image would cost no I/O at all), then
/// writes it back so that the runs do not pay for it.
pub fn create(path: &Path, bytes: u64, seed: u64) -> Result<File> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| HostBenchError::io(format!("creating {}", path.display()), e))?;
    let chunk = 1 << 20;
    let mut buf = vec![0u8; chunk];
    let mut offset = 0;
    while offset < bytes {
        let len = chunk.min(usize::try_from(bytes - offset).unwrap_or(chunk));
        fill_pattern(&mut buf[..len], seed, offset);
        file.write_all(&buf[..len]).map_err(|e| HostBenchError::io(format!("writing {}", path.display()), e))?;
        offset += len as u64;
    }
    file.sync_all().map_err(|e| HostBenchError::io(format!("syncing {}", path.display()), e))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_depends_on_seed_and_offset() {
        let mut a = vec![0; 4096];
        let mut b = vec![0; 4096];
        fill_pattern(&mut a, 1, 4096);
        fill_pattern(&mut b, 1, 4096);
        assert_eq!(a, b);
        assert_eq!(pattern_mismatch(&a, 1, 4096), None);
        assert_eq!(pattern_mismatch(&a, 2, 4096), Some(0));
        assert_eq!(pattern_mismatch(&a, 1, 8192), Some(0));
        assert_eq!(pattern_mismatch(&vec![0; 4096], 1, 4096), Some(0));
        // A pattern written in one piece reads the same in parts.
        let mut whole = vec![0; 8192];
        fill_pattern(&mut whole, 3, 0);
        assert_eq!(pattern_mismatch(&whole[4096..], 3, 4096), None);
        b[100] ^= 1;
        assert_eq!(pattern_mismatch(&b, 1, 4096), Some(100));
    }

    #[test]
    fn created_image_holds_the_pattern() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| HostBenchError::io("tempdir", e))?;
        let path = dir.path().join("img.raw");
        let bytes = (1 << 20) + 8192;
        create(&path, bytes, 9)?;
        let data = std::fs::read(&path).map_err(|e| HostBenchError::io("read", e))?;
        assert_eq!(data.len() as u64, bytes);
        assert_eq!(pattern_mismatch(&data, 9, 0), None);
        Ok(())
    }
}
