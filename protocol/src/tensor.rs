//! Tensors on the wire: a flat f32 vector cut into chunk frames.
//!
//! A 1 GB model streams as many bounded frames, never as one giant message,
//! and the receiver checks every chunk's index, length and values as it
//! arrives. No checksum is added: QUIC's AEAD already authenticates every
//! byte.

use rand::Rng;

use crate::{UpdateEncoding, encoding::EncodingError, frame};

/// How a vector of `total` values is cut into chunks of `chunk_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkPlan {
    pub total: usize,
    pub chunk_len: usize,
}

impl ChunkPlan {
    /// `chunk_len` of 0 is treated as 1 so the plan is always finite.
    pub fn new(total: usize, chunk_len: u32) -> Self {
        Self {
            total,
            chunk_len: (chunk_len as usize).max(1),
        }
    }

    pub fn chunks(&self) -> usize {
        self.total.div_ceil(self.chunk_len)
    }

    pub fn range(&self, index: usize) -> std::ops::Range<usize> {
        let start = index * self.chunk_len;
        start..(start + self.chunk_len).min(self.total)
    }

    /// Bytes the whole vector takes on the wire in `encoding`, headers included.
    pub fn wire_bytes(&self, encoding: UpdateEncoding) -> u64 {
        let per_chunk = (frame::HEADER_LEN + 4) as u64;
        let int8_scales = if encoding == UpdateEncoding::Int8 {
            4
        } else {
            0
        };
        let values = encoding.encoded_len(self.total) as u64
            - if encoding == UpdateEncoding::Int8 {
                4
            } else {
                0
            };
        self.chunks() as u64 * (per_chunk + int8_scales) + values
    }

    /// Largest chunk frame body this plan produces in `encoding`.
    pub fn max_frame_body(&self, encoding: UpdateEncoding) -> usize {
        1 + 4 + encoding.encoded_len(self.chunk_len.min(self.total))
    }
}

/// Appends chunk frame `index` of `values` to `out`.
pub fn encode_chunk(
    values: &[f32],
    plan: ChunkPlan,
    index: usize,
    encoding: UpdateEncoding,
    rng: &mut impl Rng,
    out: &mut Vec<u8>,
) {
    let slice = &values[plan.range(index)];
    frame::encode_chunk_header(index as u32, encoding.encoded_len(slice.len()), out);
    encoding.encode(slice, rng, out);
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum AssembleError {
    #[error("chunk {got} arrived where chunk {expected} was due")]
    OutOfOrder { expected: usize, got: u32 },
    #[error("chunk {index} is past the last of {chunks} chunks")]
    TooMany { index: u32, chunks: usize },
    #[error("chunk {index}: {source}")]
    Encoding { index: u32, source: EncodingError },
    #[error("chunk {index} holds a non-finite value")]
    NonFinite { index: u32 },
}

/// Receives the chunks of one tensor vector, in order, checking each one.
#[derive(Debug)]
pub struct Assembler {
    plan: ChunkPlan,
    encoding: UpdateEncoding,
    next: usize,
    values: Vec<f32>,
}

impl Assembler {
    pub fn new(plan: ChunkPlan, encoding: UpdateEncoding) -> Self {
        Self {
            plan,
            encoding,
            next: 0,
            values: vec![0.0; plan.total],
        }
    }

    /// Decodes one chunk; returns true once the last chunk is in.
    pub fn push(&mut self, index: u32, payload: &[u8]) -> Result<bool, AssembleError> {
        if self.next >= self.plan.chunks() {
            return Err(AssembleError::TooMany {
                index,
                chunks: self.plan.chunks(),
            });
        }
        if index as usize != self.next {
            return Err(AssembleError::OutOfOrder {
                expected: self.next,
                got: index,
            });
        }
        let out = &mut self.values[self.plan.range(self.next)];
        self.encoding
            .decode(payload, out)
            .map_err(|source| AssembleError::Encoding { index, source })?;
        if out.iter().any(|v| !v.is_finite()) {
            return Err(AssembleError::NonFinite { index });
        }
        self.next += 1;
        Ok(self.is_complete())
    }

    pub fn is_complete(&self) -> bool {
        self.next == self.plan.chunks()
    }

    pub fn chunks_received(&self) -> usize {
        self.next
    }

    /// The values, once every chunk is in.
    pub fn finish(self) -> Option<Vec<f32>> {
        self.is_complete().then_some(self.values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Frame, FrameLimits, decode};
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    proptest! {
        #[test]
        fn vectors_stream_through_chunks(
            values in proptest::collection::vec(-100f32..100.0, 0..1000),
            chunk_len in 1u32..300,
        ) {
            let plan = ChunkPlan::new(values.len(), chunk_len);
            let mut rng = ChaCha8Rng::seed_from_u64(1);
            let mut wire = Vec::new();
            for i in 0..plan.chunks() {
                encode_chunk(&values, plan, i, UpdateEncoding::F32, &mut rng, &mut wire);
            }
            let mut asm = Assembler::new(plan, UpdateEncoding::F32);
            let mut at = 0;
            while let Some((frame, used)) = decode(&wire[at..], FrameLimits::default()).unwrap() {
                at += used;
                let Frame::Chunk { index, payload } = frame else { panic!("not a chunk") };
                asm.push(index, &payload).unwrap();
            }
            prop_assert_eq!(at, wire.len());
            prop_assert_eq!(plan.wire_bytes(UpdateEncoding::F32), wire.len() as u64);
            prop_assert_eq!(asm.finish().unwrap(), values);
        }
    }

    #[test]
    fn out_of_order_extra_and_nan_chunks_are_refused() {
        let plan = ChunkPlan::new(4, 2);
        let enc = UpdateEncoding::F32;
        let ok = [1f32, 2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>();
        let mut asm = Assembler::new(plan, enc);
        assert_eq!(
            asm.push(1, &ok),
            Err(AssembleError::OutOfOrder {
                expected: 0,
                got: 1
            })
        );
        let nan = [1f32, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>();
        assert_eq!(
            asm.push(0, &nan),
            Err(AssembleError::NonFinite { index: 0 })
        );

        let mut asm = Assembler::new(plan, enc);
        assert_eq!(asm.push(0, &ok), Ok(false));
        assert!(matches!(
            asm.push(1, &ok[..4]),
            Err(AssembleError::Encoding { index: 1, .. })
        ));
        assert_eq!(asm.push(1, &ok), Ok(true));
        assert_eq!(
            asm.push(2, &ok),
            Err(AssembleError::TooMany {
                index: 2,
                chunks: 2
            })
        );
        assert_eq!(asm.finish().unwrap(), vec![1.0, 2.0, 1.0, 2.0]);
    }
}
