//! Arbitrary bytes through the decoder of masked and noised updates: frames
//! whose chunks carry ring words, checked against the ring's width.
#![no_main]

use covey_protocol::{
    frame::{self, Frame, FrameLimits},
    tensor::{ChunkPlan, WordAssembler},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&bits, rest)) = data.split_first() else {
        return;
    };
    let limits = FrameLimits { max_frame: 1 << 16 };
    // The server only ever builds assemblers for rings of 1 to 32 bits.
    let mut words = WordAssembler::new(ChunkPlan::new(1000, 64), u32::from(bits % 32) + 1);
    let mut at = 0;
    while let Ok(Some((frame, used))) = frame::decode(&rest[at..], limits) {
        at += used;
        if let Frame::Chunk { index, payload } = frame
            && words.push(index, &payload).is_err()
        {
            return;
        }
    }
    if words.is_complete() {
        let _ = words.finish();
    }
});
