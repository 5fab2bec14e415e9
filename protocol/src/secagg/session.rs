//! The server's side of secure aggregation for one round: it checks and
//! relays keys and ciphertexts, sums masked inputs, and removes the masks
//! from the sum once enough shares are in. It never holds an individual's
//! input unmasked.

use std::collections::{BTreeMap, BTreeSet};

use crate::RoundId;

use super::{
    Advertise, IncomingShares, PublicKeys, Roster, RosterEntry, Sealed, SecAggError, SecAggParams,
    ShareKeys, UnmaskRequest, UnmaskShares, graph, graph_seed,
    keys::{masking_public, pairwise_seed, verify_signature},
    prg::{BLOCK_WORDS, Sign, apply_mask_from, ring_mask},
    shamir,
};

/// The longest ciphertext a member may relay to one neighbour.
const MAX_SEALED_BYTES: usize = 512;

/// The four phases; a session only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Advertise,
    Share,
    MaskedInput,
    Unmask,
    Closed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Advertise => "advertise",
            Self::Share => "share",
            Self::MaskedInput => "masked input",
            Self::Unmask => "unmask",
            Self::Closed => "closed",
        }
    }
}

/// Why a round's secure aggregation ended without a sum. Nothing that
/// could unmask an individual was requested or learned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionAbort {
    #[error("{survivors} members remained after the {phase} phase; {needed} are needed")]
    TooFewSurvivors {
        phase: &'static str,
        survivors: usize,
        needed: usize,
    },
    #[error("a member's {secret} has {got} shares, below the threshold {threshold}")]
    TooFewShares {
        secret: &'static str,
        got: usize,
        threshold: usize,
    },
    #[error("the shares of a member's masking key rebuild a key it did not advertise")]
    CorruptShares,
    #[error("the degree-{degree} graph admits no safe threshold")]
    NoThreshold { degree: usize },
    #[error("the session cannot unmask in the {0} phase")]
    NotUnmasking(&'static str),
}

struct Member {
    keys: PublicKeys,
    certificate: Vec<u8>,
    signature: Vec<u8>,
}

/// One round's secure aggregation, keyed by `C` (a pseudonym in the server).
pub struct Session<C> {
    round: RoundId,
    params: SecAggParams,
    bits: u32,
    len: usize,
    min_survivors: usize,
    phase: Phase,
    cohort: BTreeSet<C>,
    gone: BTreeSet<C>,
    advertised: BTreeMap<C, Member>,
    /// Members in index order, fixed when advertising closes.
    members: Vec<C>,
    index: BTreeMap<C, u32>,
    keys: Vec<PublicKeys>,
    graph: Vec<Vec<u32>>,
    threshold: usize,
    /// Phase 2: each sender's ciphertexts.
    shared: BTreeMap<u32, Vec<Sealed>>,
    /// Phase 3: who sent masked input, and the running sum.
    masked: BTreeSet<u32>,
    sum: Vec<u32>,
    requests: BTreeMap<u32, UnmaskRequest>,
    answers: BTreeMap<u32, UnmaskShares>,
}

impl<C: Copy + Ord> Session<C> {
    /// A session over `cohort` for inputs of `len` words modulo 2^bits. A
    /// phase that ends with fewer than `min_survivors` members aborts.
    pub fn new(
        round: RoundId,
        params: SecAggParams,
        bits: u32,
        len: usize,
        cohort: impl IntoIterator<Item = C>,
        min_survivors: usize,
    ) -> Self {
        Self {
            round,
            params,
            bits,
            len,
            min_survivors: min_survivors.max(2),
            phase: Phase::Advertise,
            cohort: cohort.into_iter().collect(),
            gone: BTreeSet::new(),
            advertised: BTreeMap::new(),
            members: Vec::new(),
            index: BTreeMap::new(),
            keys: Vec::new(),
            graph: Vec::new(),
            threshold: 0,
            shared: BTreeMap::new(),
            masked: BTreeSet::new(),
            sum: Vec::new(),
            requests: BTreeMap::new(),
            answers: BTreeMap::new(),
        }
    }

    pub fn round(&self) -> RoundId {
        self.round
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Everyone selected for the round.
    pub fn cohort(&self) -> impl Iterator<Item = &C> {
        self.cohort.iter()
    }

    /// Members still expected to answer the current phase: neither
    /// answered nor gone.
    pub fn pending(&self) -> usize {
        let waiting = |c: &C, answered: bool| !answered && !self.gone.contains(c);
        match self.phase {
            Phase::Advertise => self
                .cohort
                .iter()
                .filter(|c| waiting(c, self.advertised.contains_key(c)))
                .count(),
            Phase::Share => self
                .members
                .iter()
                .enumerate()
                .filter(|(i, c)| waiting(c, self.shared.contains_key(&(*i as u32))))
                .count(),
            Phase::MaskedInput => self
                .shared
                .keys()
                .filter(|&&i| waiting(&self.members[i as usize], self.masked.contains(&i)))
                .count(),
            Phase::Unmask => self
                .requests
                .keys()
                .filter(|&&i| waiting(&self.members[i as usize], self.answers.contains_key(&i)))
                .count(),
            Phase::Closed => 0,
        }
    }

    /// The client disconnected or gave up: the current phase stops
    /// waiting for it. What it already sent still counts.
    pub fn drop_member(&mut self, client: C) {
        self.gone.insert(client);
    }

    fn check_phase(&self, phase: Phase, round: RoundId) -> Result<(), SecAggError> {
        if round != self.round {
            return Err(SecAggError::WrongRound {
                expected: self.round,
                got: round,
            });
        }
        if self.phase != phase {
            return Err(SecAggError::OutOfOrder(phase.as_str()));
        }
        Ok(())
    }

    fn member_index(&self, client: &C) -> Result<u32, SecAggError> {
        self.index
            .get(client)
            .copied()
            .ok_or(SecAggError::OutOfOrder("a message from a non-member"))
    }

    /// Phase 1: a cohort member's keys, signed by the certificate it
    /// connected with.
    pub fn advertise(
        &mut self,
        client: C,
        advertise: Advertise,
        certificate: &[u8],
    ) -> Result<(), SecAggError> {
        self.check_phase(Phase::Advertise, advertise.round)?;
        if !self.cohort.contains(&client) || self.advertised.contains_key(&client) {
            return Err(SecAggError::OutOfOrder(
                "a second or unsolicited advertisement",
            ));
        }
        let message = advertise.keys.signed_message(self.round);
        if !verify_signature(certificate, &message, &advertise.signature) {
            return Err(SecAggError::Identity(
                "the keys are not signed by the connection's certificate".into(),
            ));
        }
        if self.advertised.values().any(|m| m.keys == advertise.keys) {
            return Err(SecAggError::Malformed("keys already advertised".into()));
        }
        self.advertised.insert(
            client,
            Member {
                keys: advertise.keys,
                certificate: certificate.to_vec(),
                signature: advertise.signature,
            },
        );
        Ok(())
    }

    fn survivors_or_abort(&mut self, phase: Phase, survivors: usize) -> Result<(), SessionAbort> {
        if survivors < self.min_survivors {
            self.phase = Phase::Closed;
            return Err(SessionAbort::TooFewSurvivors {
                phase: phase.as_str(),
                survivors,
                needed: self.min_survivors,
            });
        }
        Ok(())
    }

    /// Ends phase 1: the roster each advertiser receives.
    pub fn close_advertise(&mut self) -> Result<BTreeMap<C, Roster>, SessionAbort> {
        if self.phase != Phase::Advertise {
            return Ok(BTreeMap::new());
        }
        self.survivors_or_abort(Phase::Advertise, self.advertised.len())?;
        let mut order: Vec<(PublicKeys, C)> =
            self.advertised.iter().map(|(c, m)| (m.keys, *c)).collect();
        order.sort();
        self.keys = order.iter().map(|(k, _)| *k).collect();
        self.members = order.iter().map(|(_, c)| *c).collect();
        self.index = self
            .members
            .iter()
            .enumerate()
            .map(|(i, c)| (*c, i as u32))
            .collect();
        let n = self.members.len();
        self.graph = graph::neighbours(
            graph_seed(self.round, &self.keys),
            n,
            self.params.neighbors as usize,
        );
        let degree = self.graph[0].len();
        self.threshold = match self.params.threshold_for(degree) {
            Ok(t) => t,
            Err(_) => {
                self.phase = Phase::Closed;
                return Err(SessionAbort::NoThreshold { degree });
            }
        };
        self.phase = Phase::Share;
        Ok(self
            .members
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let neighbours = self.graph[i]
                    .iter()
                    .map(|&j| {
                        let m = &self.advertised[&self.members[j as usize]];
                        RosterEntry {
                            index: j,
                            certificate: m.certificate.clone(),
                            signature: m.signature.clone(),
                        }
                    })
                    .collect();
                (
                    *c,
                    Roster {
                        round: self.round,
                        keys: self.keys.clone(),
                        threshold: self.threshold as u32,
                        neighbours,
                    },
                )
            })
            .collect())
    }

    /// Phase 2: a member's encrypted shares, one for each neighbour.
    pub fn share_keys(&mut self, client: C, shares: ShareKeys) -> Result<(), SecAggError> {
        self.check_phase(Phase::Share, shares.round)?;
        let me = self.member_index(&client)?;
        if self.shared.contains_key(&me) {
            return Err(SecAggError::OutOfOrder("a second set of shares"));
        }
        let recipients: Vec<u32> = shares.shares.iter().map(|s| s.to).collect();
        if recipients != self.graph[me as usize] {
            return Err(SecAggError::Malformed(
                "shares must go to each neighbour once, in order".into(),
            ));
        }
        if let Some(bad) = shares
            .shares
            .iter()
            .find(|s| s.from != me || s.ciphertext.len() > MAX_SEALED_BYTES)
        {
            return Err(SecAggError::Malformed(format!(
                "share for {} is mislabelled or too long",
                bad.to
            )));
        }
        self.shared.insert(me, shares.shares);
        Ok(())
    }

    /// Ends phase 2: what each member that shared receives.
    pub fn close_share(&mut self) -> Result<BTreeMap<C, IncomingShares>, SessionAbort> {
        if self.phase != Phase::Share {
            return Ok(BTreeMap::new());
        }
        self.survivors_or_abort(Phase::Share, self.shared.len())?;
        let mut inbox: BTreeMap<u32, Vec<Sealed>> = BTreeMap::new();
        for sealed in self.shared.values().flatten() {
            if self.shared.contains_key(&sealed.to) {
                inbox.entry(sealed.to).or_default().push(sealed.clone());
            }
        }
        self.phase = Phase::MaskedInput;
        self.sum = vec![0; self.len];
        Ok(self
            .shared
            .keys()
            .map(|&i| {
                (
                    self.members[i as usize],
                    IncomingShares {
                        round: self.round,
                        shares: inbox.remove(&i).unwrap_or_default(),
                    },
                )
            })
            .collect())
    }

    /// May this client send masked input now?
    pub fn accepts_input(&self, client: &C) -> bool {
        self.phase == Phase::MaskedInput
            && self
                .index
                .get(client)
                .is_some_and(|i| self.shared.contains_key(i) && !self.masked.contains(i))
    }

    /// Phase 3: folds a member's masked input into the sum.
    pub fn masked_input(&mut self, client: C, words: &[u32]) -> Result<(), SecAggError> {
        if self.phase != Phase::MaskedInput {
            return Err(SecAggError::OutOfOrder("masked input"));
        }
        if !self.accepts_input(&client) {
            return Err(SecAggError::OutOfOrder("masked input from a non-member"));
        }
        let me = self.member_index(&client)?;
        let mask = ring_mask(self.bits);
        if words.len() != self.len || words.iter().any(|&w| w & !mask != 0) {
            return Err(SecAggError::Malformed(format!(
                "masked input must be {} words below 2^{}",
                self.len, self.bits
            )));
        }
        for (s, w) in self.sum.iter_mut().zip(words) {
            *s = s.wrapping_add(*w) & mask;
        }
        self.masked.insert(me);
        Ok(())
    }

    /// Ends phase 3: the request each member with masked input receives.
    pub fn close_masked_input(&mut self) -> Result<BTreeMap<C, UnmaskRequest>, SessionAbort> {
        if self.phase != Phase::MaskedInput {
            return Ok(BTreeMap::new());
        }
        self.survivors_or_abort(Phase::MaskedInput, self.masked.len())?;
        self.phase = Phase::Unmask;
        for &u in &self.masked {
            let (survivors, dropped) = self.graph[u as usize]
                .iter()
                .filter(|v| self.shared.contains_key(v))
                .partition(|v| self.masked.contains(v));
            self.requests.insert(
                u,
                UnmaskRequest {
                    round: self.round,
                    survivors,
                    dropped,
                },
            );
        }
        Ok(self
            .requests
            .iter()
            .map(|(&u, r)| (self.members[u as usize], r.clone()))
            .collect())
    }

    /// Phase 4: a member's shares, exactly as requested.
    pub fn unmask(&mut self, client: C, shares: UnmaskShares) -> Result<(), SecAggError> {
        self.check_phase(Phase::Unmask, shares.round)?;
        let me = self.member_index(&client)?;
        let Some(request) = self.requests.get(&me) else {
            return Err(SecAggError::OutOfOrder("unmask shares from a non-survivor"));
        };
        if self.answers.contains_key(&me) {
            return Err(SecAggError::AlreadyAnswered);
        }
        let named =
            |list: &[(u32, shamir::Share)]| list.iter().map(|(v, _)| *v).collect::<Vec<_>>();
        if named(&shares.self_mask) != request.survivors
            || named(&shares.masking_key) != request.dropped
            || shares
                .self_mask
                .iter()
                .chain(&shares.masking_key)
                .any(|(_, s)| s.x != me + 1)
        {
            return Err(SecAggError::Malformed(
                "unmask shares differ from the request".into(),
            ));
        }
        self.answers.insert(me, shares);
        Ok(())
    }

    /// Ends phase 4: rebuilds the secrets and removes every mask from the
    /// sum. Returns the sum of the masked-input members' inputs, mod 2^bits,
    /// and how many they were. This regenerates O(n + dropped·k) masks.
    pub fn finish(mut self) -> Result<(Vec<u32>, usize), SessionAbort> {
        if self.phase != Phase::Unmask {
            return Err(SessionAbort::NotUnmasking(self.phase.as_str()));
        }
        self.phase = Phase::Closed;
        let mut self_shares: BTreeMap<u32, Vec<shamir::Share>> = BTreeMap::new();
        let mut key_shares: BTreeMap<u32, Vec<shamir::Share>> = BTreeMap::new();
        for answer in std::mem::take(&mut self.answers).into_values() {
            for (v, s) in answer.self_mask {
                self_shares.entry(v).or_default().push(s);
            }
            for (v, s) in answer.masking_key {
                key_shares.entry(v).or_default().push(s);
            }
        }
        let rebuild = |shares: Option<&Vec<shamir::Share>>, secret: &'static str| {
            let shares = shares.map_or(&[][..], |s| s.as_slice());
            shamir::combine(shares, self.threshold).map_err(|e| match e {
                shamir::ShamirError::TooFewShares { got, threshold } => {
                    SessionAbort::TooFewShares {
                        secret,
                        got,
                        threshold,
                    }
                }
                _ => SessionAbort::CorruptShares,
            })
        };
        // Rebuild every secret before touching the sum.
        let mut self_seeds = Vec::with_capacity(self.masked.len());
        for &u in &self.masked {
            self_seeds.push(rebuild(self_shares.get(&u), "self-mask seed")?);
        }
        let mut pair_seeds = Vec::new();
        let dropped: Vec<u32> = self
            .shared
            .keys()
            .copied()
            .filter(|v| !self.masked.contains(v))
            .collect();
        for v in dropped {
            let masked_neighbours: Vec<u32> = self.graph[v as usize]
                .iter()
                .copied()
                .filter(|u| self.masked.contains(u))
                .collect();
            if masked_neighbours.is_empty() {
                continue;
            }
            let secret = rebuild(key_shares.get(&v), "masking key")?;
            if masking_public(&secret) != self.keys[v as usize].masking {
                return Err(SessionAbort::CorruptShares);
            }
            for u in masked_neighbours {
                let seed = pairwise_seed(&secret, &self.keys[u as usize].masking, self.round, v, u)
                    .map_err(|_| SessionAbort::CorruptShares)?;
                // u added +PRG(s_uv) when u < v; remove what it added.
                let sign = if u < v { Sign::Subtract } else { Sign::Add };
                pair_seeds.push((seed, sign));
            }
        }
        let mut masks: Vec<([u8; 32], Sign)> = self_seeds
            .into_iter()
            .map(|seed| (seed, Sign::Subtract))
            .collect();
        masks.extend(pair_seeds);
        let mut sum = std::mem::take(&mut self.sum);
        remove_masks(&masks, self.bits, &mut sum);
        Ok((sum, self.masked.len()))
    }
}

/// Applies every mask to `sum`, one slice per available core: each thread
/// regenerates all masks for its own range of words.
fn remove_masks(masks: &[([u8; 32], Sign)], bits: u32, sum: &mut [u32]) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let blocks = sum.len().div_ceil(BLOCK_WORDS);
    let per_thread = blocks.div_ceil(threads.max(1)).max(1) * BLOCK_WORDS;
    std::thread::scope(|scope| {
        for (i, slice) in sum.chunks_mut(per_thread).enumerate() {
            let first_block = i * per_thread / BLOCK_WORDS;
            scope.spawn(move || {
                for (seed, sign) in masks {
                    apply_mask_from(seed, bits, slice, *sign, first_block);
                }
            });
        }
    });
}
