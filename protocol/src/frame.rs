//! Length-prefixed frames with a hard size cap.
//!
//! ```text
//! frame   = length:u32le kind:u8 body        (length counts kind + body)
//! kind 1  = a postcard-encoded Message
//! kind 2  = a tensor chunk: index:u32le, then encoded values
//! ```
//! The length is checked against the cap before anything is allocated, so a
//! peer cannot make us reserve memory it does not send.

use crate::message::Message;

pub const HEADER_LEN: usize = 5;
const KIND_MESSAGE: u8 = 1;
const KIND_CHUNK: u8 = 2;

/// Frame size limits, set by whoever reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest accepted frame body (kind byte included), in bytes.
    pub max_frame: usize,
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self { max_frame: 4 << 20 }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Message(Message),
    Chunk { index: u32, payload: Vec<u8> },
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {length} bytes exceeds the {max} byte limit")]
    TooLarge { length: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("chunk frame of {0} bytes is shorter than its 4-byte index")]
    ShortChunk(usize),
    #[error("undecodable message: {0}")]
    BadMessage(String),
}

/// Parsed frame header: what follows and how long it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    /// Bytes of body that follow the header.
    pub body_len: usize,
}

/// Checks a frame header against the limits before the body is read.
pub fn parse_header(bytes: [u8; HEADER_LEN], limits: FrameLimits) -> Result<Header, FrameError> {
    let length = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    if length == 0 {
        return Err(FrameError::Empty);
    }
    if length > limits.max_frame {
        return Err(FrameError::TooLarge {
            length,
            max: limits.max_frame,
        });
    }
    let kind = bytes[4];
    if kind != KIND_MESSAGE && kind != KIND_CHUNK {
        return Err(FrameError::UnknownKind(kind));
    }
    Ok(Header {
        kind,
        body_len: length - 1,
    })
}

/// Parses the body announced by `header`.
pub fn parse_body(header: Header, body: Vec<u8>) -> Result<Frame, FrameError> {
    match header.kind {
        KIND_MESSAGE => postcard::from_bytes(&body)
            .map(Frame::Message)
            .map_err(|e| FrameError::BadMessage(e.to_string())),
        KIND_CHUNK => {
            if body.len() < 4 {
                return Err(FrameError::ShortChunk(body.len()));
            }
            let index = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
            let mut payload = body;
            payload.drain(..4);
            Ok(Frame::Chunk { index, payload })
        }
        other => Err(FrameError::UnknownKind(other)),
    }
}

/// Decodes one frame from the front of `buf`: `Ok(None)` when more bytes
/// are needed, otherwise the frame and the bytes it used.
pub fn decode(buf: &[u8], limits: FrameLimits) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(head) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let mut bytes = [0u8; HEADER_LEN];
    bytes.copy_from_slice(head);
    let header = parse_header(bytes, limits)?;
    let end = HEADER_LEN + header.body_len;
    let Some(body) = buf.get(HEADER_LEN..end) else {
        return Ok(None);
    };
    Ok(Some((parse_body(header, body.to_vec())?, end)))
}

/// Appends a message frame to `out`.
pub fn encode_message(message: &Message, out: &mut Vec<u8>) {
    // Our messages hold only plain data, which postcard always serializes.
    let body = postcard::to_stdvec(message).expect("Message serialization is infallible");
    let length = (1 + body.len()) as u32;
    out.extend_from_slice(&length.to_le_bytes());
    out.push(KIND_MESSAGE);
    out.extend_from_slice(&body);
}

/// Appends the header of a chunk frame whose `payload_len` encoded bytes
/// the caller appends next.
pub fn encode_chunk_header(index: u32, payload_len: usize, out: &mut Vec<u8>) {
    let length = (1 + 4 + payload_len) as u32;
    out.extend_from_slice(&length.to_le_bytes());
    out.push(KIND_CHUNK);
    out.extend_from_slice(&index.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ModelVersion, RoundId, UpdateEncoding,
        message::{
            CloseCode, ErrorReport, EvalReport, EvalTask, Hello, Hyperparameters, LocalMetrics,
            Payload, RejectReason, Task, UpdateHeader, UpdatePrivacy, UpdateReceipt, Welcome,
        },
        model::{Architecture, ModelSpec},
    };
    use proptest::prelude::*;

    fn arb_message() -> impl Strategy<Value = Message> {
        let arch = prop_oneof![
            Just(Architecture::LogReg),
            Just(Architecture::Mlp2nn),
            Just(Architecture::Cnn)
        ];
        let enc = prop_oneof![
            Just(UpdateEncoding::F32),
            Just(UpdateEncoding::F16),
            Just(UpdateEncoding::Bf16),
            Just(UpdateEncoding::Int8)
        ];
        prop_oneof![
            (any::<u16>(), ".{0,20}")
                .prop_map(|(protocol, software)| Message::Hello(Hello { protocol, software })),
            (any::<u16>(), ".{0,20}")
                .prop_map(|(protocol, software)| Message::Welcome(Welcome { protocol, software })),
            Just(Message::CheckIn),
            (
                any::<u64>(),
                any::<u64>(),
                arch,
                enc.clone(),
                any::<u32>(),
                -1e3f32..1e3
            )
                .prop_map(
                    |(round, version, architecture, update_encoding, chunk_len, lr)| {
                        Message::Task(Task {
                            round: RoundId(round),
                            base_version: ModelVersion(version),
                            spec: if version % 3 == 0 {
                                ModelSpec::External(crate::model::ExternalSpec {
                                    tensors: vec![crate::model::TensorSpec::new(
                                        "fc.weight",
                                        &[(version % 50 + 1) as usize, 3],
                                    )],
                                })
                            } else {
                                ModelSpec::mnist(architecture)
                            },
                            hyper: Hyperparameters {
                                epochs: 5,
                                batch_size: 10,
                                learning_rate: lr,
                                proximal_mu: 0.0,
                                optimizer: Default::default(),
                            },
                            update_encoding,
                            chunk_len,
                            deadline_ms: round ^ version,
                            seed: version,
                            privacy: if lr > 0.0 {
                                UpdatePrivacy::Clipped {
                                    clip: covey_privacy::ClipNorm::new(f64::from(lr)).unwrap(),
                                }
                            } else if lr < -500.0 {
                                UpdatePrivacy::Distributed {
                                    clip: covey_privacy::ClipNorm::new(1.0).unwrap(),
                                    quantizer: covey_privacy::quantize::Quantizer::new(
                                        version % 1000 + 1,
                                        1.0,
                                        f64::from(-lr) * 1e-6,
                                        20,
                                        Some(round),
                                    )
                                    .unwrap(),
                                    noise_sigma: f64::from(-lr),
                                }
                            } else {
                                UpdatePrivacy::Plain
                            },
                            secure_aggregation: (lr < -500.0).then_some(
                                crate::secagg::SecAggParams {
                                    neighbors: (version % 100) as u32,
                                    threshold: if round % 2 == 0 {
                                        crate::secagg::Threshold::Fraction(0.6)
                                    } else {
                                        crate::secagg::Threshold::Count(round as u32)
                                    },
                                },
                            ),
                            config: crate::message::FitConfig(vec![
                                (
                                    "decay".into(),
                                    crate::message::ConfigValue::Float(f64::from(lr)),
                                ),
                                (
                                    "tag".into(),
                                    crate::message::ConfigValue::Text(format!("r{round}")),
                                ),
                                ("n".into(), crate::message::ConfigValue::Int(version as i64)),
                                ("on".into(), crate::message::ConfigValue::Bool(lr > 0.0)),
                            ]),
                        })
                    }
                ),
            any::<u64>().prop_map(|v| Message::RunFinished {
                final_version: ModelVersion(v)
            }),
            (any::<u64>(), any::<u64>(), enc, any::<u64>(), -1e3f32..1e3).prop_map(
                |(round, n, encoding, count, loss)| Message::Update(UpdateHeader {
                    round: RoundId(round),
                    base_version: ModelVersion(round / 2),
                    payload: if count % 5 == 0 {
                        Payload::Ring {
                            bits: (count % 32) as u32,
                        }
                    } else {
                        Payload::Floats(encoding)
                    },
                    param_count: count,
                    num_examples: n,
                    metrics: LocalMetrics {
                        loss,
                        accuracy: 0.5
                    },
                    within_clip: (count % 3 != 0).then_some(count % 2 == 0),
                })
            ),
            (
                any::<u64>(),
                any::<[u8; 32]>(),
                proptest::collection::vec(any::<u8>(), 0..80)
            )
                .prop_map(|(round, key, signature)| {
                    Message::SecAgg(crate::secagg::SecAggMessage::Advertise(
                        crate::secagg::Advertise {
                            round: RoundId(round),
                            keys: crate::secagg::PublicKeys {
                                channel: key,
                                masking: [key[0]; 32],
                            },
                            signature,
                        },
                    ))
                }),
            (
                any::<u64>(),
                proptest::collection::vec(any::<u32>(), 0..20),
                proptest::collection::vec(any::<u32>(), 0..20)
            )
                .prop_map(|(round, survivors, dropped)| {
                    Message::SecAgg(crate::secagg::SecAggMessage::UnmaskRequest(
                        crate::secagg::UnmaskRequest {
                            round: RoundId(round),
                            survivors,
                            dropped,
                        },
                    ))
                }),
            Just(Message::UpdateReceipt(UpdateReceipt::Accepted)),
            Just(Message::UpdateReceipt(UpdateReceipt::Rejected(
                RejectReason::NonFinite
            ))),
            (any::<u64>(), proptest::collection::vec(any::<u64>(), 0..3)).prop_map(|(id, v)| {
                Message::Evaluate(EvalTask {
                    id,
                    spec: ModelSpec::mnist(Architecture::Mlp2nn),
                    versions: v.into_iter().map(ModelVersion).collect(),
                    chunk_len: 64,
                })
            }),
            (any::<u64>(), any::<u64>(), 0f32..1.0).prop_map(|(id, examples, accuracy)| {
                Message::EvalReport(EvalReport {
                    id,
                    examples,
                    results: vec![LocalMetrics {
                        loss: 0.5,
                        accuracy,
                    }],
                })
            }),
            ".{0,40}".prop_map(|detail| Message::Error(ErrorReport {
                code: CloseCode::MalformedFrame,
                detail
            })),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip(msg in arb_message()) {
            let mut buf = Vec::new();
            encode_message(&msg, &mut buf);
            let (frame, used) = decode(&buf, FrameLimits::default()).unwrap().unwrap();
            prop_assert_eq!(used, buf.len());
            prop_assert_eq!(frame, Frame::Message(msg));
        }

        #[test]
        fn chunks_round_trip(index in any::<u32>(), payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = Vec::new();
            encode_chunk_header(index, payload.len(), &mut buf);
            buf.extend_from_slice(&payload);
            let (frame, used) = decode(&buf, FrameLimits::default()).unwrap().unwrap();
            prop_assert_eq!(used, buf.len());
            prop_assert_eq!(frame, Frame::Chunk { index, payload });
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes, FrameLimits { max_frame: 256 });
        }

        #[test]
        fn every_prefix_asks_for_more(msg in arb_message()) {
            let mut buf = Vec::new();
            encode_message(&msg, &mut buf);
            for cut in 0..buf.len() {
                prop_assert_eq!(decode(&buf[..cut], FrameLimits::default()).unwrap(), None);
            }
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_reading_the_body() {
        let mut buf = (10_000u32).to_le_bytes().to_vec();
        buf.push(KIND_MESSAGE);
        let err = decode(&buf, FrameLimits { max_frame: 4096 }).unwrap_err();
        assert_eq!(
            err.to_string(),
            "frame of 10000 bytes exceeds the 4096 byte limit"
        );
    }

    #[test]
    fn unknown_kinds_and_garbage_are_named() {
        assert_eq!(
            decode(&[1, 0, 0, 0, 9], FrameLimits::default()).unwrap_err(),
            FrameError::UnknownKind(9)
        );
        assert_eq!(
            decode(&[0, 0, 0, 0, 1], FrameLimits::default()).unwrap_err(),
            FrameError::Empty
        );
        let err = decode(&[3, 0, 0, 0, 1, 0xff, 0xff], FrameLimits::default()).unwrap_err();
        assert!(matches!(err, FrameError::BadMessage(_)));
        assert_eq!(
            decode(&[3, 0, 0, 0, 2, 1, 2], FrameLimits::default()).unwrap_err(),
            FrameError::ShortChunk(2)
        );
    }
}
