//! Arbitrary secure-aggregation messages from arbitrary cohort members,
//! interleaved with the server closing phases: the server-side session must
//! refuse what is wrong without panicking.
#![no_main]

use covey_protocol::{
    RoundId,
    secagg::{SecAggMessage, SecAggParams, Session, Threshold},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let params = SecAggParams {
        neighbors: 2,
        threshold: Threshold::Count(2),
    };
    let mut session = Session::new(RoundId(1), params, 16, 8, 0u8..4, 2);
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        let member = op >> 4 & 3;
        match op & 0x0f {
            0 => session.drop_member(member),
            1 => {
                if session.close_advertise().is_err() {
                    return;
                }
            }
            2 => {
                if session.close_share().is_err() {
                    return;
                }
            }
            3 => {
                if session.close_masked_input().is_err() {
                    return;
                }
            }
            4 => {
                let words: Vec<u32> = rest
                    .chunks_exact(2)
                    .take(8)
                    .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
                    .collect();
                rest = &rest[(2 * words.len()).min(rest.len())..];
                let _ = session.masked_input(member, &words);
            }
            _ => {
                let Ok((message, tail)) = postcard::take_from_bytes::<SecAggMessage>(rest) else {
                    return;
                };
                rest = tail;
                let _ = match message {
                    SecAggMessage::Advertise(ad) => session.advertise(member, ad, tail),
                    SecAggMessage::ShareKeys(shares) => session.share_keys(member, shares),
                    SecAggMessage::UnmaskShares(shares) => session.unmask(member, shares),
                    _ => Ok(()),
                };
            }
        }
    }
    let _ = session.finish();
});
