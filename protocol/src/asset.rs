//! Fetching a file by its hash: a LoRA run's frozen base or a
//! tokenizer.json, which a device downloads once and caches.
//!
//! ```text
//! client: FetchAsset { asset, offset }          (a stream of its own)
//! server: AssetFollows { offset }, then chunk frames 0, 1, … of raw bytes
//!         from offset to the asset's end, each at most ASSET_CHUNK bytes
//! ```
//! A download cut short resumes from the bytes the device already holds;
//! the device checks the whole file's SHA-256 before it uses it.

use serde::{Deserialize, Serialize};

use crate::model::AssetRef;

/// Largest chunk of an asset in one frame.
pub const ASSET_CHUNK: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssetRequest {
    pub asset: AssetRef,
    /// Bytes the device already holds.
    pub offset: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AssetStreamError {
    #[error("asset chunk {got} arrived where chunk {expected} was due")]
    OutOfOrder { expected: u32, got: u32 },
    #[error("asset chunk of {0} bytes is over the {ASSET_CHUNK} byte limit")]
    TooLarge(usize),
    #[error("asset chunks run {0} bytes past the asset's end")]
    PastEnd(u64),
    #[error("an empty asset chunk")]
    Empty,
}

/// The receiving side of one asset download: checks each chunk's place.
#[derive(Clone, Debug)]
pub struct AssetDownload {
    asset: AssetRef,
    next_index: u32,
    offset: u64,
}

impl AssetDownload {
    pub fn new(asset: AssetRef, offset: u64) -> Self {
        Self {
            asset,
            next_index: 0,
            offset,
        }
    }

    /// Where the next chunk's bytes go.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn is_complete(&self) -> bool {
        self.offset >= self.asset.bytes
    }

    /// Accepts chunk `index` of `len` bytes; returns the offset its bytes
    /// start at.
    pub fn accept(&mut self, index: u32, len: usize) -> Result<u64, AssetStreamError> {
        if index != self.next_index {
            return Err(AssetStreamError::OutOfOrder {
                expected: self.next_index,
                got: index,
            });
        }
        if len == 0 {
            return Err(AssetStreamError::Empty);
        }
        if len > ASSET_CHUNK {
            return Err(AssetStreamError::TooLarge(len));
        }
        let end = self.offset + len as u64;
        if end > self.asset.bytes {
            return Err(AssetStreamError::PastEnd(end - self.asset.bytes));
        }
        let at = self.offset;
        self.offset = end;
        self.next_index += 1;
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_must_arrive_in_order_and_stop_at_the_end() {
        let asset = AssetRef {
            sha256: [1; 32],
            bytes: 10,
        };
        let mut d = AssetDownload::new(asset, 4);
        assert_eq!(d.accept(0, 3), Ok(4));
        assert_eq!(
            d.accept(2, 1),
            Err(AssetStreamError::OutOfOrder {
                expected: 1,
                got: 2
            })
        );
        assert_eq!(d.accept(1, 4), Err(AssetStreamError::PastEnd(1)));
        assert_eq!(d.accept(1, 0), Err(AssetStreamError::Empty));
        assert_eq!(d.accept(1, 3), Ok(7));
        assert!(d.is_complete());
        let mut big = AssetDownload::new(
            AssetRef {
                sha256: [1; 32],
                bytes: u64::MAX,
            },
            0,
        );
        assert_eq!(
            big.accept(0, ASSET_CHUNK + 1),
            Err(AssetStreamError::TooLarge(ASSET_CHUNK + 1))
        );
    }
}
