//! Frames over async byte streams: the one place where protocol bytes meet
//! I/O. The drivers in server and client both use these.

use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{
    UpdateEncoding,
    frame::{self, Frame, FrameError, FrameLimits, HEADER_LEN},
    message::Message,
    tensor::{AssembleError, Assembler, ChunkPlan, WordAssembler, encode_chunk, encode_word_chunk},
};

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("tensor: {0}")]
    Tensor(#[from] AssembleError),
    #[error("stream ended before a whole frame arrived")]
    Truncated,
    #[error("expected {expected}, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
}

impl StreamError {
    /// Whether the peer, rather than the transport, is at fault.
    pub fn is_protocol_violation(&self) -> bool {
        !matches!(self, Self::Io(_))
    }
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    limits: FrameLimits,
) -> Result<Option<Frame>, StreamError> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let n = reader.read(&mut header[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(StreamError::Truncated)
            };
        }
        filled += n;
    }
    let header = frame::parse_header(header, limits)?;
    let mut body = vec![0u8; header.body_len];
    reader.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            StreamError::Truncated
        } else {
            StreamError::Io(e)
        }
    })?;
    Ok(Some(frame::parse_body(header, body)?))
}

/// Reads one frame that must be a message.
pub async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut R,
    limits: FrameLimits,
) -> Result<Message, StreamError> {
    match read_frame(reader, limits).await? {
        Some(Frame::Message(m)) => Ok(m),
        Some(Frame::Chunk { .. }) => Err(StreamError::Unexpected {
            expected: "a message",
            got: "a tensor chunk",
        }),
        None => Err(StreamError::Truncated),
    }
}

pub async fn write_message<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &Message,
) -> Result<u64, StreamError> {
    let mut buf = Vec::new();
    frame::encode_message(message, &mut buf);
    writer.write_all(&buf).await?;
    Ok(buf.len() as u64)
}

/// Streams `values` as chunk frames; returns the bytes written.
pub async fn write_tensor<W: AsyncWrite + Unpin>(
    writer: &mut W,
    values: &[f32],
    plan: ChunkPlan,
    encoding: UpdateEncoding,
    rng: &mut impl Rng,
) -> Result<u64, StreamError> {
    let mut buf = Vec::with_capacity(plan.max_frame_body(encoding) + HEADER_LEN);
    let mut total = 0;
    for index in 0..plan.chunks() {
        buf.clear();
        encode_chunk(values, plan, index, encoding, rng, &mut buf);
        writer.write_all(&buf).await?;
        total += buf.len() as u64;
    }
    Ok(total)
}

/// Reads the chunk frames of one tensor vector, checking each as it lands.
pub async fn read_tensor<R: AsyncRead + Unpin>(
    reader: &mut R,
    plan: ChunkPlan,
    encoding: UpdateEncoding,
    limits: FrameLimits,
) -> Result<Vec<f32>, StreamError> {
    let mut assembler = Assembler::new(plan, encoding);
    let done = assembler.is_complete();
    read_chunks(reader, limits, done, |index, payload| {
        assembler.push(index, payload)
    })
    .await?;
    assembler.finish().ok_or(StreamError::Truncated)
}

/// Feeds chunk frames to `push` until it reports the vector complete
/// (or at once when `done`); anything but a chunk is an error.
async fn read_chunks<R: AsyncRead + Unpin>(
    reader: &mut R,
    limits: FrameLimits,
    mut done: bool,
    mut push: impl FnMut(u32, &[u8]) -> Result<bool, AssembleError>,
) -> Result<(), StreamError> {
    while !done {
        match read_frame(reader, limits).await? {
            Some(Frame::Chunk { index, payload }) => done = push(index, &payload)?,
            Some(Frame::Message(m)) => {
                return Err(StreamError::Unexpected {
                    expected: "a tensor chunk",
                    got: m.kind(),
                });
            }
            None => return Err(StreamError::Truncated),
        }
    }
    Ok(())
}

/// Streams ring words as chunk frames; returns the bytes written.
pub async fn write_words<W: AsyncWrite + Unpin>(
    writer: &mut W,
    words: &[u32],
    plan: ChunkPlan,
) -> Result<u64, StreamError> {
    let mut buf = Vec::with_capacity(4 * plan.chunk_len + HEADER_LEN + 4);
    let mut total = 0;
    for index in 0..plan.chunks() {
        buf.clear();
        encode_word_chunk(words, plan, index, &mut buf);
        writer.write_all(&buf).await?;
        total += buf.len() as u64;
    }
    Ok(total)
}

/// Reads ring words of `bits` bits in `plan`'s chunks, checking each word.
pub async fn read_words<R: AsyncRead + Unpin>(
    reader: &mut R,
    plan: ChunkPlan,
    bits: u32,
    limits: FrameLimits,
) -> Result<Vec<u32>, StreamError> {
    let mut assembler = WordAssembler::new(plan, bits);
    let done = assembler.is_complete();
    read_chunks(reader, limits, done, |index, payload| {
        assembler.push(index, payload)
    })
    .await?;
    assembler.finish().ok_or(StreamError::Truncated)
}

/// Writes one chunk frame of raw bytes (an asset's); returns the bytes
/// written.
pub async fn write_bytes_chunk<W: AsyncWrite + Unpin>(
    writer: &mut W,
    index: u32,
    bytes: &[u8],
) -> Result<u64, StreamError> {
    let mut buf = Vec::with_capacity(HEADER_LEN + 4 + bytes.len());
    frame::encode_chunk_header(index, bytes.len(), &mut buf);
    buf.extend_from_slice(bytes);
    writer.write_all(&buf).await?;
    Ok(buf.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[tokio::test]
    async fn messages_and_tensors_cross_a_stream() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let plan = ChunkPlan::new(values.len(), 64);
        let mut wire = Vec::new();
        write_message(&mut wire, &Message::CheckIn).await.unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        write_tensor(&mut wire, &values, plan, UpdateEncoding::F32, &mut rng)
            .await
            .unwrap();
        let mut reader = wire.as_slice();
        let limits = FrameLimits::default();
        assert_eq!(
            read_message(&mut reader, limits).await.unwrap(),
            Message::CheckIn
        );
        let back = read_tensor(&mut reader, plan, UpdateEncoding::F32, limits)
            .await
            .unwrap();
        assert_eq!(back, values);
        assert!(read_frame(&mut reader, limits).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn truncation_and_misplaced_frames_are_errors() {
        let mut wire = Vec::new();
        write_message(&mut wire, &Message::CheckIn).await.unwrap();
        let cut = &wire[..wire.len() - 1];
        let err = read_message(&mut &cut[..], FrameLimits::default())
            .await
            .unwrap_err();
        assert!(matches!(err, StreamError::Truncated));

        let plan = ChunkPlan::new(10, 4);
        let err = read_tensor(
            &mut wire.as_slice(),
            plan,
            UpdateEncoding::F32,
            FrameLimits::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.to_string(), "expected a tensor chunk, got CheckIn");
    }
}
