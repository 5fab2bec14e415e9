//! Which leaf serves a device: rendezvous (highest-random-weight) hashing
//! of its pseudonym over the live leaves (Thaler and Ravishankar 1998).
//! Every leaf scores every device and the highest score wins, so losing a
//! leaf moves only the devices it held, and adding one moves only the
//! devices it now wins; nobody else changes leaf. Any node computes the
//! same answer from the same list of leaves, in any order.
// By hand: a dozen lines over ring's SHA-256; the crates for it bring their own hashers.

use covey_privacy::Pseudonym;
use serde::{Deserialize, Serialize};

/// A leaf aggregator's stable name (a StatefulSet pod's, say).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeafId(pub String);

/// Why a leaf name was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "leaf name '{0}' is not 1 to 64 characters of letters, digits, '-' and '_' (it becomes a JetStream key)"
)]
pub struct BadLeafName(pub String);

impl LeafId {
    pub fn parse(name: &str) -> Result<Self, BadLeafName> {
        let ok = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(BadLeafName(name.to_owned()))
        }
    }
}

impl std::fmt::Display for LeafId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The leaf that serves `device`, or `None` when there are no leaves.
pub fn leaf_for<'a>(device: &Pseudonym, leaves: &'a [LeafId]) -> Option<&'a LeafId> {
    // Ties (a 2^-64 chance) go to the greater name, so order never matters.
    leaves
        .iter()
        .max_by_key(|leaf| (score(device, leaf), *leaf))
}

fn score(device: &Pseudonym, leaf: &LeafId) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"covey-route/1\0");
    ctx.update(device.as_bytes());
    ctx.update(leaf.0.as_bytes());
    let digest = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    #[test]
    fn leaf_names_are_safe_keys() {
        assert!(super::LeafId::parse("leaf-0_a").is_ok());
        for bad in ["", "a.b", "a b", "a>", "a*", &"x".repeat(65)] {
            assert!(super::LeafId::parse(bad).is_err(), "{bad:?}");
        }
    }

    use super::*;
    use proptest::prelude::*;

    fn leaves(n: usize) -> Vec<LeafId> {
        (0..n).map(|i| LeafId(format!("leaf-{i}"))).collect()
    }

    fn device(i: u64) -> Pseudonym {
        // Pseudonyms are keyed hashes; any spread of bytes stands in.
        let d = ring::digest::digest(&ring::digest::SHA256, &i.to_le_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&d.as_ref()[..8]);
        Pseudonym::from_bytes(b)
    }

    #[test]
    fn no_leaves_no_route() {
        assert_eq!(leaf_for(&device(1), &[]), None);
    }

    #[test]
    fn devices_spread_evenly_over_the_leaves() {
        let all = leaves(5);
        let mut counts = [0usize; 5];
        for i in 0..20_000 {
            let leaf = leaf_for(&device(i), &all).unwrap();
            counts[all.iter().position(|l| l == leaf).unwrap()] += 1;
        }
        for c in counts {
            // 4,000 each on average; binomial σ ≈ 57, so ±10% is > 7σ.
            assert!((3_600..=4_400).contains(&c), "{counts:?}");
        }
    }

    proptest! {
        #[test]
        fn the_order_of_the_leaves_does_not_matter(n in 1usize..12, rotate in 0usize..12, d in any::<u64>()) {
            let all = leaves(n);
            let mut shuffled = all.clone();
            shuffled.rotate_left(rotate % n);
            shuffled.reverse();
            prop_assert_eq!(leaf_for(&device(d), &all), leaf_for(&device(d), &shuffled));
        }

        #[test]
        fn losing_a_leaf_moves_only_its_own_devices(n in 2usize..10, lost in 0usize..10) {
            let all = leaves(n);
            let lost = lost % n;
            let mut rest = all.clone();
            let gone = rest.remove(lost);
            for i in 0..300 {
                let before = leaf_for(&device(i), &all).unwrap();
                let after = leaf_for(&device(i), &rest).unwrap();
                if *before != gone {
                    prop_assert_eq!(before, after);
                }
            }
        }

        #[test]
        fn adding_a_leaf_moves_devices_only_onto_it(n in 1usize..10) {
            let all = leaves(n);
            let mut more = all.clone();
            more.push(LeafId("leaf-new".into()));
            for i in 0..300 {
                let before = leaf_for(&device(i), &all).unwrap();
                let after = leaf_for(&device(i), &more).unwrap();
                prop_assert!(after == before || after.0 == "leaf-new");
            }
        }
    }
}
