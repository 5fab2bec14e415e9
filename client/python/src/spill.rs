//! The model as received, kept in a temporary file while `fit` runs.
//!
//! The update is `returned − global` against the model as it arrived, and
//! `fit` may change the arrays it is handed in place, so the core needs the
//! model twice: once for `fit`, once to subtract from. Keeping that second
//! copy on disk rather than in memory is what holds the core's extra memory
//! near one model: the received buffer itself becomes `fit`'s numpy array,
//! without a copy, and the update is computed chunk by chunk in the file,
//! so no second model-sized buffer exists until `fit`'s arrays are released.
//! The file is anonymous (unlinked at creation), and holds only the global
//! model every device receives, never the device's data or its update
//! beyond the round.

use std::{
    fs::File,
    io::{self, Read, Seek, SeekFrom, Write},
};

/// Values per read or write: 256 KiB of I/O at a time.
const CHUNK: usize = 1 << 16;

pub struct Spill {
    file: File,
    len: usize,
}

impl Spill {
    pub fn new(values: &[f32]) -> io::Result<Self> {
        let mut file = tempfile::tempfile()?;
        let mut bytes = Vec::with_capacity(CHUNK * 4);
        for chunk in values.chunks(CHUNK) {
            bytes.clear();
            bytes.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
            file.write_all(&bytes)?;
        }
        Ok(Self {
            file,
            len: values.len(),
        })
    }

    fn read_at(&mut self, offset: usize, out: &mut [f32], bytes: &mut Vec<u8>) -> io::Result<()> {
        bytes.resize(out.len() * 4, 0);
        self.file.seek(SeekFrom::Start(offset as u64 * 4))?;
        self.file.read_exact(bytes)?;
        for (v, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }

    /// Replaces the stored values from `offset` on, one per item of
    /// `returned`, with `returned − stored`. Returns whether every result
    /// is finite. `returned` must not reach past the end.
    pub fn subtract_from(
        &mut self,
        offset: usize,
        returned: impl Iterator<Item = f32>,
    ) -> io::Result<bool> {
        let mut finite = true;
        let mut at = offset;
        let mut fresh = Vec::with_capacity(CHUNK);
        let mut stored = vec![0f32; CHUNK];
        let mut bytes = Vec::with_capacity(CHUNK * 4);
        let mut returned = returned.peekable();
        while returned.peek().is_some() {
            fresh.clear();
            fresh.extend(returned.by_ref().take(CHUNK));
            if at + fresh.len() > self.len {
                return Err(io::Error::other("more values than the model holds"));
            }
            let stored = &mut stored[..fresh.len()];
            self.read_at(at, stored, &mut bytes)?;
            bytes.clear();
            for (s, r) in stored.iter().zip(&fresh) {
                let d = r - s;
                finite &= d.is_finite();
                bytes.extend_from_slice(&d.to_le_bytes());
            }
            self.file.seek(SeekFrom::Start(at as u64 * 4))?;
            self.file.write_all(&bytes)?;
            at += fresh.len();
        }
        Ok(finite)
    }

    /// Everything stored, read back.
    pub fn into_vec(mut self) -> io::Result<Vec<f32>> {
        let mut out = vec![0f32; self.len];
        let mut bytes = Vec::with_capacity(CHUNK * 4);
        for (i, chunk) in out.chunks_mut(CHUNK).enumerate() {
            self.read_at(i * CHUNK, chunk, &mut bytes)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_back_and_subtraction_lands_where_it_should() {
        let n = CHUNK * 2 + 17;
        let base: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
        let mut spill = Spill::new(&base).unwrap();
        // Two tensors: the first spans a chunk boundary.
        let split = CHUNK + 3;
        let returned: Vec<f32> = base.iter().map(|b| b * 3.0 + 1.0).collect();
        assert!(
            spill
                .subtract_from(0, returned[..split].iter().copied())
                .unwrap()
        );
        assert!(
            spill
                .subtract_from(split, returned[split..].iter().copied())
                .unwrap()
        );
        let delta = spill.into_vec().unwrap();
        let expected: Vec<f32> = base.iter().map(|b| b * 2.0 + 1.0).collect();
        assert_eq!(delta, expected);
    }

    #[test]
    fn non_finite_results_and_overlong_input_are_reported() {
        let mut spill = Spill::new(&[1.0, 2.0, 3.0]).unwrap();
        assert!(!spill.subtract_from(1, [f32::NAN].into_iter()).unwrap());
        assert!(spill.subtract_from(2, [1.0, 2.0].into_iter()).is_err());
    }
}
