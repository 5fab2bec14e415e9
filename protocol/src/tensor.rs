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

    /// Bytes of the vector as ring words (4 bytes each), headers included.
    pub fn ring_wire_bytes(&self) -> u64 {
        self.chunks() as u64 * (frame::HEADER_LEN + 4) as u64 + 4 * self.total as u64
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

/// Appends chunk frame `index` of ring words (u32 little-endian) to `out`.
pub fn encode_word_chunk(words: &[u32], plan: ChunkPlan, index: usize, out: &mut Vec<u8>) {
    let slice = &words[plan.range(index)];
    frame::encode_chunk_header(index as u32, 4 * slice.len(), out);
    slice
        .iter()
        .for_each(|w| out.extend_from_slice(&w.to_le_bytes()));
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
    #[error("chunk {index} of ring words is {actual} bytes, expected {expected}")]
    WordLength {
        index: u32,
        expected: usize,
        actual: usize,
    },
    #[error("chunk {index} holds {value}, outside the ring of {bits} bits")]
    OutOfRing { index: u32, value: u32, bits: u32 },
}

/// Which chunk may come next: the order check both assemblers share.
#[derive(Debug)]
struct Cursor {
    plan: ChunkPlan,
    next: usize,
}

impl Cursor {
    /// The value range chunk `index` fills, if it is the one due.
    fn admit(&self, index: u32) -> Result<std::ops::Range<usize>, AssembleError> {
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
        Ok(self.plan.range(self.next))
    }

    fn is_complete(&self) -> bool {
        self.next == self.plan.chunks()
    }
}

/// Receives ring words (values mod 2^bits) chunk by chunk, refusing any
/// word outside the ring.
#[derive(Debug)]
pub struct WordAssembler {
    cursor: Cursor,
    bits: u32,
    values: Vec<u32>,
}

impl WordAssembler {
    pub fn new(plan: ChunkPlan, bits: u32) -> Self {
        Self {
            cursor: Cursor { plan, next: 0 },
            bits,
            values: vec![0; plan.total],
        }
    }

    /// Decodes one chunk; returns true once the last chunk is in.
    pub fn push(&mut self, index: u32, payload: &[u8]) -> Result<bool, AssembleError> {
        let range = self.cursor.admit(index)?;
        let expected = 4 * range.len();
        if payload.len() != expected {
            return Err(AssembleError::WordLength {
                index,
                expected,
                actual: payload.len(),
            });
        }
        let limit = if self.bits >= 32 {
            u64::from(u32::MAX) + 1
        } else {
            1u64 << self.bits
        };
        for (out, bytes) in self.values[range].iter_mut().zip(payload.chunks_exact(4)) {
            let value = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            if u64::from(value) >= limit {
                return Err(AssembleError::OutOfRing {
                    index,
                    value,
                    bits: self.bits,
                });
            }
            *out = value;
        }
        self.cursor.next += 1;
        Ok(self.cursor.is_complete())
    }

    pub fn is_complete(&self) -> bool {
        self.cursor.is_complete()
    }

    /// The words, once every chunk is in.
    pub fn finish(self) -> Option<Vec<u32>> {
        self.is_complete().then_some(self.values)
    }
}

/// Receives the chunks of one tensor vector, in order, checking each one.
#[derive(Debug)]
pub struct Assembler {
    cursor: Cursor,
    encoding: UpdateEncoding,
    values: Vec<f32>,
}

impl Assembler {
    pub fn new(plan: ChunkPlan, encoding: UpdateEncoding) -> Self {
        Self {
            cursor: Cursor { plan, next: 0 },
            encoding,
            values: vec![0.0; plan.total],
        }
    }

    /// Decodes one chunk; returns true once the last chunk is in.
    pub fn push(&mut self, index: u32, payload: &[u8]) -> Result<bool, AssembleError> {
        let range = self.cursor.admit(index)?;
        let out = &mut self.values[range];
        self.encoding
            .decode(payload, out)
            .map_err(|source| AssembleError::Encoding { index, source })?;
        if out.iter().any(|v| !v.is_finite()) {
            return Err(AssembleError::NonFinite { index });
        }
        self.cursor.next += 1;
        Ok(self.is_complete())
    }

    pub fn is_complete(&self) -> bool {
        self.cursor.is_complete()
    }

    pub fn chunks_received(&self) -> usize {
        self.cursor.next
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

    proptest! {
        #[test]
        fn ring_words_stream_through_chunks(
            words in proptest::collection::vec(0u32..(1 << 20), 0..500),
            chunk_len in 1u32..100,
        ) {
            let plan = ChunkPlan::new(words.len(), chunk_len);
            let mut wire = Vec::new();
            for i in 0..plan.chunks() {
                encode_word_chunk(&words, plan, i, &mut wire);
            }
            prop_assert_eq!(plan.ring_wire_bytes(), wire.len() as u64);
            let mut asm = WordAssembler::new(plan, 20);
            let mut at = 0;
            while let Some((frame, used)) = decode(&wire[at..], FrameLimits::default()).unwrap() {
                at += used;
                let Frame::Chunk { index, payload } = frame else { panic!("not a chunk") };
                asm.push(index, &payload).unwrap();
            }
            prop_assert_eq!(asm.finish().unwrap(), words);
        }
    }

    #[test]
    fn words_outside_the_ring_are_refused() {
        let plan = ChunkPlan::new(2, 2);
        let mut asm = WordAssembler::new(plan, 16);
        let bad: Vec<u8> = [5u32, 1 << 16]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(
            asm.push(0, &bad),
            Err(AssembleError::OutOfRing {
                index: 0,
                value: 1 << 16,
                bits: 16
            })
        );
        assert!(matches!(
            asm.push(0, &bad[..4]),
            Err(AssembleError::WordLength { .. })
        ));
        let good: Vec<u8> = [5u32, 65535].iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(asm.push(0, &good), Ok(true));
        assert_eq!(asm.finish().unwrap(), vec![5, 65535]);
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
