//! A member's side of secure aggregation: a state machine that only ever
//! moves forward, so each secret is used as the protocol allows and an
//! unmask request is answered at most once.

use std::collections::{BTreeMap, BTreeSet};

use rand::RngCore;

use crate::RoundId;

use super::{
    Advertise, IncomingShares, PublicKeys, Roster, RosterEntry, Sealed, SecAggError, SecAggParams,
    ShareKeys, SharePair, UnmaskRequest, UnmaskShares, graph, graph_seed,
    keys::{Channel, KeyPairs, pairwise_seed},
    prg::{Sign, apply_mask},
    shamir,
};

/// Largest plaintext of a share pair: two shares, postcard-encoded.
const MAX_SHARE_BYTES: usize = 256;

struct Peer {
    keys: PublicKeys,
    channel: Channel,
}

/// What the member knows once the roster arrived.
struct Placed {
    me: u32,
    threshold: usize,
    peers: BTreeMap<u32, Peer>,
    /// Neighbours whose shares arrived: the ones it masks against.
    active: BTreeSet<u32>,
    /// The shares they sent, by sender.
    held: BTreeMap<u32, SharePair>,
}

enum Stage {
    Advertised,
    Shared(Placed),
    Ready(Placed),
    Masked(Placed),
    Done,
}

impl Stage {
    fn name(&self) -> &'static str {
        match self {
            Self::Advertised => "the roster",
            Self::Shared(_) => "incoming shares",
            Self::Ready(_) => "masking",
            Self::Masked(_) => "the unmask request",
            Self::Done => "a message after the round ended",
        }
    }
}

/// One member's secure-aggregation state for one round.
pub struct Participant {
    round: RoundId,
    params: SecAggParams,
    bits: u32,
    keys: KeyPairs,
    self_seed: [u8; 32],
    stage: Stage,
}

impl Participant {
    /// `secrets` are the channel key, masking key and self-mask seed: 96
    /// bytes from a cryptographically secure source.
    pub fn new(round: RoundId, params: SecAggParams, bits: u32, secrets: [[u8; 32]; 3]) -> Self {
        let [channel, masking, self_seed] = secrets;
        Self {
            round,
            params,
            bits,
            keys: KeyPairs::from_bytes(channel, masking),
            self_seed,
            stage: Stage::Advertised,
        }
    }

    pub fn public_keys(&self) -> PublicKeys {
        self.keys.public()
    }

    /// The advertisement, signed by `sign` (the member's enrolled key).
    pub fn advertise(
        &self,
        sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, SecAggError>,
    ) -> Result<Advertise, SecAggError> {
        let keys = self.public_keys();
        Ok(Advertise {
            round: self.round,
            keys,
            signature: sign(&keys.signed_message(self.round))?,
        })
    }

    fn check_round(&self, got: RoundId) -> Result<(), SecAggError> {
        if got != self.round {
            return Err(SecAggError::WrongRound {
                expected: self.round,
                got,
            });
        }
        Ok(())
    }

    /// Checks the roster and shares this member's secrets among its
    /// neighbours. `verify` checks that an entry's certificate is enrolled
    /// and signed the neighbour's keys.
    pub fn on_roster(
        &mut self,
        roster: &Roster,
        verify: impl Fn(&RosterEntry, &PublicKeys) -> bool,
        rng: &mut impl RngCore,
    ) -> Result<ShareKeys, SecAggError> {
        self.check_round(roster.round)?;
        if !matches!(self.stage, Stage::Advertised) {
            return Err(SecAggError::OutOfOrder("a roster"));
        }
        if roster.keys.windows(2).any(|w| w[0] >= w[1]) {
            return Err(SecAggError::UnsortedRoster);
        }
        let own = self.public_keys();
        let me = roster
            .keys
            .binary_search(&own)
            .map_err(|_| SecAggError::NotInRoster)? as u32;
        let graph = graph::neighbours(
            graph_seed(self.round, &roster.keys),
            roster.keys.len(),
            self.params.neighbors as usize,
        );
        let expected = &graph[me as usize];
        let given: Vec<u32> = roster.neighbours.iter().map(|e| e.index).collect();
        if &given != expected {
            return Err(SecAggError::WrongNeighbours);
        }
        let threshold = self.params.threshold_for(expected.len())?;
        if roster.threshold as usize != threshold {
            return Err(SecAggError::ThresholdMismatch {
                expected: threshold,
                got: roster.threshold as usize,
            });
        }
        let mut peers = BTreeMap::new();
        for entry in &roster.neighbours {
            let keys = roster.keys[entry.index as usize];
            if !verify(entry, &keys) {
                return Err(SecAggError::BadSignature(entry.index));
            }
            let channel = Channel::new(
                self.keys.channel_secret(),
                &keys.channel,
                self.round,
                me,
                entry.index,
            )?;
            peers.insert(entry.index, Peer { keys, channel });
        }
        let xs: Vec<u32> = expected.iter().map(|&i| i + 1).collect();
        let self_mask = shamir::split(&self.self_seed, threshold, &xs, rng)?;
        let masking_key = shamir::split(&self.keys.masking_secret(), threshold, &xs, rng)?;
        let mut shares = Vec::with_capacity(xs.len());
        for ((to, self_mask), masking_key) in expected.iter().zip(self_mask).zip(masking_key) {
            let plain = postcard::to_stdvec(&SharePair {
                self_mask,
                masking_key,
            })
            .map_err(|e| SecAggError::Malformed(e.to_string()))?;
            shares.push(Sealed {
                from: me,
                to: *to,
                ciphertext: peers[to].channel.seal(me, *to, plain),
            });
        }
        self.stage = Stage::Shared(Placed {
            me,
            threshold,
            peers,
            active: BTreeSet::new(),
            held: BTreeMap::new(),
        });
        Ok(ShareKeys {
            round: self.round,
            shares,
        })
    }

    /// Opens the shares its neighbours sent. The neighbours that sent them
    /// are the ones whose pairwise masks this member adds.
    pub fn on_incoming(&mut self, incoming: IncomingShares) -> Result<(), SecAggError> {
        self.check_round(incoming.round)?;
        let Stage::Shared(placed) = &mut self.stage else {
            return Err(SecAggError::OutOfOrder("incoming shares"));
        };
        for sealed in incoming.shares {
            let from = sealed.from;
            let Some(peer) = placed.peers.get(&from) else {
                return Err(SecAggError::NotANeighbour(from));
            };
            if sealed.to != placed.me || placed.held.contains_key(&from) {
                return Err(SecAggError::Malformed(format!(
                    "shares from {from} are misaddressed or repeated"
                )));
            }
            if sealed.ciphertext.len() > MAX_SHARE_BYTES + 16 {
                return Err(SecAggError::Malformed(format!(
                    "shares from {from} are too long"
                )));
            }
            let plain = peer.channel.open(from, placed.me, sealed.ciphertext)?;
            let pair: SharePair = postcard::from_bytes(&plain)
                .map_err(|e| SecAggError::Malformed(format!("shares from {from}: {e}")))?;
            if pair.self_mask.x != placed.me + 1 || pair.masking_key.x != placed.me + 1 {
                return Err(SecAggError::Malformed(format!(
                    "shares from {from} were made for another member"
                )));
            }
            placed.active.insert(from);
            placed.held.insert(from, pair);
        }
        if placed.active.len() < placed.threshold {
            let n = placed.active.len();
            self.stage = Stage::Done;
            return Err(SecAggError::TooFewNeighbours(n));
        }
        let Stage::Shared(placed) = std::mem::replace(&mut self.stage, Stage::Done) else {
            return Err(SecAggError::OutOfOrder("incoming shares"));
        };
        self.stage = Stage::Ready(placed);
        Ok(())
    }

    /// Masks `words` (the quantized, possibly noised update) in place:
    /// y = x + PRG(b) + Σ ±PRG(s_uv) mod 2^bits.
    pub fn mask(&mut self, words: &mut [u32]) -> Result<(), SecAggError> {
        let Stage::Ready(placed) = std::mem::replace(&mut self.stage, Stage::Done) else {
            return Err(SecAggError::OutOfOrder("masking"));
        };
        apply_mask(&self.self_seed, self.bits, words, Sign::Add);
        let secret = self.keys.masking_secret();
        for &v in &placed.active {
            let seed = pairwise_seed(
                &secret,
                &placed.peers[&v].keys.masking,
                self.round,
                placed.me,
                v,
            )?;
            let sign = if placed.me < v {
                Sign::Add
            } else {
                Sign::Subtract
            };
            apply_mask(&seed, self.bits, words, sign);
        }
        self.stage = Stage::Masked(placed);
        Ok(())
    }

    /// Reveals one share per neighbour named. A neighbour named both as a
    /// survivor and as dropped, or one this member holds no shares of, is
    /// refused, and a second request is refused too.
    pub fn on_unmask(&mut self, request: &UnmaskRequest) -> Result<UnmaskShares, SecAggError> {
        self.check_round(request.round)?;
        let placed = match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Masked(placed) => placed,
            Stage::Done => return Err(SecAggError::AlreadyAnswered),
            other => {
                let name = other.name();
                self.stage = other;
                return Err(SecAggError::OutOfOrder(name));
            }
        };
        let survivors: BTreeSet<u32> = request.survivors.iter().copied().collect();
        let dropped: BTreeSet<u32> = request.dropped.iter().copied().collect();
        if let Some(&both) = survivors.intersection(&dropped).next() {
            return Err(SecAggError::BothShares(both));
        }
        if survivors.len() != request.survivors.len() || dropped.len() != request.dropped.len() {
            return Err(SecAggError::Malformed("repeated neighbour".into()));
        }
        let share = |v: &u32, pick: fn(&SharePair) -> &shamir::Share| {
            placed
                .held
                .get(v)
                .map(|p| (*v, pick(p).clone()))
                .ok_or(SecAggError::NotANeighbour(*v))
        };
        Ok(UnmaskShares {
            round: self.round,
            self_mask: survivors
                .iter()
                .map(|v| share(v, |p| &p.self_mask))
                .collect::<Result<_, _>>()?,
            masking_key: dropped
                .iter()
                .map(|v| share(v, |p| &p.masking_key))
                .collect::<Result<_, _>>()?,
        })
    }
}
