//! Sealing at rest for what the cluster keeps in JetStream: the root's
//! state (its privacy ledger included), its audit trail, model versions and
//! leaves' partial sums. JetStream's own file storage is plaintext, and its
//! operators need not be trusted with the model or the ledger any more than
//! a disk is. Values are sealed with the state directory's data key
//! (AES-256-GCM), which every provisioned copy of the directory unwraps with
//! its KEK, and each is bound to its bucket and key, so a value copied to
//! another key, or another cluster's bucket, no longer opens.

use std::sync::Arc;

use crate::state::sealing::{DataKey, SEAL_OVERHEAD, SealError};

/// The data key, and the bucket prefix the cluster's values live under.
#[derive(Clone, Debug)]
pub struct AtRest {
    key: Arc<DataKey>,
    bucket: String,
}

impl AtRest {
    pub fn new(key: DataKey, bucket: &str) -> Self {
        Self {
            key: Arc::new(key),
            bucket: bucket.to_owned(),
        }
    }

    /// What sealing adds to a value's length.
    pub const OVERHEAD: usize = SEAL_OVERHEAD;

    fn location(&self, slot: &str) -> Vec<u8> {
        format!("cluster/{}/{slot}", self.bucket).into_bytes()
    }

    /// Seals `plain` for `slot`: a key or object name in this cluster.
    pub fn seal(&self, slot: &str, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        self.key.seal(&self.location(slot), plain)
    }

    /// Opens what was sealed for `slot`; an error if it was sealed for
    /// another slot, under another key, or altered.
    pub fn open(&self, slot: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        self.key.open(&self.location(slot), sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_opens_only_in_its_slot_of_its_cluster_under_its_key() {
        let key = DataKey::generate().unwrap();
        let a = AtRest::new(key.clone(), "covey");
        let sealed = a.seal("root", b"state").unwrap();
        assert_eq!(sealed.len(), 5 + AtRest::OVERHEAD);
        assert_eq!(a.open("root", &sealed).unwrap(), b"state");
        assert!(a.open("model-1", &sealed).is_err(), "another slot");
        let other = AtRest::new(key, "elsewhere");
        assert!(other.open("root", &sealed).is_err(), "another cluster");
        let stranger = AtRest::new(DataKey::generate().unwrap(), "covey");
        assert!(stranger.open("root", &sealed).is_err(), "another key");
        let mut altered = sealed.clone();
        altered[20] ^= 1;
        assert!(a.open("root", &altered).is_err(), "altered");
        assert!(
            !sealed.windows(5).any(|w| w == b"state"),
            "the plaintext does not show"
        );
    }
}
