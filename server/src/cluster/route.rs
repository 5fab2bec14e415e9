//! Which leaf serves a device: rendezvous (highest-random-weight) hashing
//! of its pseudonym over the live leaves (Thaler and Ravishankar 1998).
//! Every leaf scores every device and the highest score wins, so losing a
//! leaf moves only the devices it held, and adding one moves only the
//! devices it now wins; nobody else changes leaf. Any node computes the
//! same answer from the same list of leaves, in any order.
// By hand: a dozen lines over ring's SHA-256; the crates for it bring their own hashers.

use std::{collections::BTreeMap, time::Duration};

use covey_privacy::Pseudonym;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

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

/// How a leaf paces check-ins: past `max_waiting` devices waiting for a
/// task, newcomers are told to come back in about `every` (jittered by
/// ±50%, so they do not all return in the same second).
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub max_waiting: u64,
    pub every: Duration,
}

/// Which devices a leaf serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// Those the rendezvous hash gives it; others are sent to their leaf.
    Hashed,
    /// Whoever connects (leaves behind a load balancer that already
    /// spreads devices, by region say).
    Any,
}

/// A leaf's answer to a device at the handshake: serve it, send it to the
/// leaf that owns it, or ask it to come back later.
#[derive(Clone)]
pub struct Router {
    me: LeafId,
    /// Live leaves and the addresses devices reach them at.
    live: watch::Receiver<BTreeMap<LeafId, String>>,
    /// Devices waiting here for a task.
    waiting: watch::Receiver<u64>,
    pace: Pace,
    routing: Routing,
}

/// What the handshake tells a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Steer {
    Serve,
    /// To the leaf at this address.
    Move(String),
    /// Come back after this long.
    Later(Duration),
}

impl Router {
    pub fn new(
        me: LeafId,
        live: watch::Receiver<BTreeMap<LeafId, String>>,
        waiting: watch::Receiver<u64>,
        pace: Pace,
        routing: Routing,
    ) -> Self {
        Self {
            me,
            live,
            waiting,
            pace,
            routing,
        }
    }

    pub fn steer(&self, device: &Pseudonym) -> Steer {
        if self.routing == Routing::Hashed {
            let live = self.live.borrow();
            // Until this leaf sees its own beat it cannot know the map.
            if live.contains_key(&self.me) {
                let leaves: Vec<LeafId> = live.keys().cloned().collect();
                if let Some(owner) = leaf_for(device, &leaves)
                    && *owner != self.me
                    && let Some(addr) = live.get(owner)
                {
                    return Steer::Move(addr.clone());
                }
            }
        }
        if *self.waiting.borrow() >= self.pace.max_waiting {
            let jitter = rand::rng().random_range(0.5..1.5);
            return Steer::Later(self.pace.every.mul_f64(jitter));
        }
        Steer::Serve
    }
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
    fn a_router_serves_its_own_devices_moves_others_and_paces_a_crowd() {
        use super::*;
        let leaves: BTreeMap<LeafId, String> = ["a", "b", "c"]
            .iter()
            .map(|n| (LeafId(n.to_string()), format!("{n}.example:4433")))
            .collect();
        let (live_tx, live) = watch::channel(leaves.clone());
        let (waiting_tx, waiting) = watch::channel(0u64);
        let pace = Pace {
            max_waiting: 10,
            every: Duration::from_secs(30),
        };
        let router = Router::new(LeafId("a".into()), live, waiting, pace, Routing::Hashed);
        let (_, live_any) = watch::channel(leaves.clone());
        let (_, waiting_any) = watch::channel(0u64);
        let any = Router::new(
            LeafId("a".into()),
            live_any,
            waiting_any,
            pace,
            Routing::Any,
        );
        let ids: Vec<LeafId> = leaves.keys().cloned().collect();
        let (mut served, mut moved) = (0, 0);
        for i in 0..60u8 {
            let device = Pseudonym::from_bytes([i; 8]);
            let owner = leaf_for(&device, &ids).unwrap().clone();
            match router.steer(&device) {
                Steer::Serve => {
                    assert_eq!(owner.0, "a");
                    served += 1;
                }
                Steer::Move(addr) => {
                    assert_eq!(addr, leaves[&owner]);
                    moved += 1;
                }
                Steer::Later(_) => panic!("nobody waits yet"),
            }
        }
        assert!(served > 5 && moved > 20, "{served} served, {moved} moved");
        for i in 0..60u8 {
            assert_eq!(any.steer(&Pseudonym::from_bytes([i; 8])), Steer::Serve);
        }
        // A crowd: this leaf's own devices are told to come back later,
        // each at its own jittered time.
        waiting_tx.send(10).unwrap();
        let mine = (0..60u8)
            .map(|i| Pseudonym::from_bytes([i; 8]))
            .find(|d| leaf_for(d, &ids).is_some_and(|l| l.0 == "a"))
            .unwrap();
        let Steer::Later(after) = router.steer(&mine) else {
            panic!("expected pacing");
        };
        assert!(after >= Duration::from_secs(15) && after < Duration::from_secs(45));
        // Before this leaf sees its own beat, it serves whoever comes.
        live_tx.send(BTreeMap::new()).unwrap();
        waiting_tx.send(0).unwrap();
        let other = (0..60u8)
            .map(|i| Pseudonym::from_bytes([i; 8]))
            .find(|d| leaf_for(d, &ids).is_some_and(|l| l.0 != "a"))
            .unwrap();
        assert_eq!(router.steer(&other), Steer::Serve);
    }

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
