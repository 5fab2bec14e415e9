//! Arbitrary bytes through everything the server decodes from the network:
//! frame headers and bodies, messages, and tensor chunks in every encoding.
#![no_main]

use covey_protocol::{
    UpdateEncoding,
    frame::{self, Frame, FrameLimits},
    tensor::{Assembler, ChunkPlan},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = FrameLimits { max_frame: 1 << 16 };
    let mut at = 0;
    let mut assemblers: Vec<Assembler> = UpdateEncoding::ALL
        .iter()
        .map(|&e| Assembler::new(ChunkPlan::new(1000, 64), e))
        .collect();
    while let Ok(Some((frame, used))) = frame::decode(&data[at..], limits) {
        at += used;
        if let Frame::Chunk { index, payload } = frame {
            for a in &mut assemblers {
                let _ = a.push(index, &payload);
            }
        }
    }
});
