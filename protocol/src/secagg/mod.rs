//! Secure aggregation: SecAgg+ (Bell et al. 2020) on Bonawitz et al. 2017.
//! The server learns only the sum of the members' ring words.
//!
//! Four phases, each a request and a delayed answer on its own stream:
//! 1. *Advertise*: each member sends two X25519 public keys signed with its
//!    enrolled key; the server answers with the roster once the phase closes.
//! 2. *Share*: each member Shamir-shares its self-mask seed and its masking
//!    secret among its graph neighbours, encrypted end to end; the server
//!    answers with the ciphertexts addressed to it.
//! 3. *Masked input*: y = x + PRG(b) + Σ ±PRG(s_uv) mod 2^bits.
//! 4. *Unmask*: for each neighbour a survivor reveals one share, never two:
//!    the self-mask share of one that sent its input, the masking-key share
//!    of one that did not.
//!
//! [`Participant`] is the member's side and [`Session`] the server's; both
//! are plain state machines with no I/O.

pub mod graph;
pub mod keys;
pub mod participant;
pub mod prg;
pub mod session;
pub mod shamir;

use serde::{Deserialize, Serialize};

use crate::RoundId;

pub use keys::{KeySigner, PeerVerifier, PublicKeys};
pub use participant::Participant;
pub use session::{Session, SessionAbort};

/// The task's secure-aggregation settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SecAggParams {
    /// Graph degree k; each member shares its secrets with k neighbours.
    pub neighbors: u32,
    /// Shares needed to rebuild a secret.
    pub threshold: Threshold,
}

/// Shares needed to rebuild a member's secret, out of its neighbours.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Threshold {
    /// This fraction of the neighbours, rounded up.
    Fraction(f64),
    /// This many, at most the degree.
    Count(u32),
}

impl SecAggParams {
    /// The threshold for a graph of this degree. It must exceed half the
    /// degree: then no two disjoint sets of neighbours can each rebuild a
    /// secret, so a server cannot get both of one member's secrets.
    pub fn threshold_for(&self, degree: usize) -> Result<usize, SecAggError> {
        let t = match self.threshold {
            Threshold::Fraction(f) => (f * degree as f64).ceil() as usize,
            Threshold::Count(c) => c as usize,
        };
        if t * 2 <= degree || t > degree {
            return Err(SecAggError::UnsafeThreshold {
                threshold: t,
                degree,
            });
        }
        Ok(t)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.neighbors < 2 {
            return Err(format!(
                "secure aggregation needs at least 2 neighbours, got {}",
                self.neighbors
            ));
        }
        match self.threshold {
            Threshold::Fraction(f) if !(f > 0.5 && f <= 1.0) => Err(format!(
                "threshold fraction must be in (0.5, 1], got {f}: at or below half, a server could rebuild both of a member's secrets"
            )),
            Threshold::Count(c) if c as usize * 2 <= self.neighbors as usize => Err(format!(
                "threshold {c} must exceed half the {} neighbours",
                self.neighbors
            )),
            Threshold::Count(c) if c > self.neighbors => Err(format!(
                "threshold {c} exceeds the {} neighbours",
                self.neighbors
            )),
            _ => Ok(()),
        }
    }
}

/// Phase 1, member → server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Advertise {
    pub round: RoundId,
    pub keys: PublicKeys,
    /// Over [`PublicKeys::signed_message`] with the member's enrolled key.
    pub signature: Vec<u8>,
}

/// Phase 1, server → member: who takes part. Members are indexed in the
/// order of their keys, which the server does not choose.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Roster {
    pub round: RoundId,
    /// Every member's keys, sorted: the graph's seed is their hash.
    pub keys: Vec<PublicKeys>,
    /// Shares needed to rebuild a secret in this graph.
    pub threshold: u32,
    /// The recipient's neighbours, with what proves their keys.
    pub neighbours: Vec<RosterEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RosterEntry {
    pub index: u32,
    /// The neighbour's enrolled certificate (DER).
    pub certificate: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Phase 2, member → server: one ciphertext per neighbour.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShareKeys {
    pub round: RoundId,
    pub shares: Vec<Sealed>,
}

/// A ciphertext between two members; the server only relays it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sealed {
    pub from: u32,
    pub to: u32,
    pub ciphertext: Vec<u8>,
}

/// Phase 2, server → member: the shares its neighbours sent it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IncomingShares {
    pub round: RoundId,
    pub shares: Vec<Sealed>,
}

/// Phase 4, server → member: which of its neighbours sent masked input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    pub round: RoundId,
    pub survivors: Vec<u32>,
    pub dropped: Vec<u32>,
}

/// Phase 4, member → server: one share per neighbour named.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnmaskShares {
    pub round: RoundId,
    /// (neighbour, share of its self-mask seed), for survivors.
    pub self_mask: Vec<(u32, shamir::Share)>,
    /// (neighbour, share of its masking secret), for dropped members.
    pub masking_key: Vec<(u32, shamir::Share)>,
}

/// What a member sent its neighbour in phase 2 (the plaintext).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct SharePair {
    self_mask: shamir::Share,
    masking_key: shamir::Share,
}

/// Secure-aggregation messages, carried in [`crate::Message::SecAgg`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SecAggMessage {
    Advertise(Advertise),
    Roster(Roster),
    ShareKeys(ShareKeys),
    IncomingShares(IncomingShares),
    /// Member → server after its masked input was accepted: waits for the
    /// unmask request.
    AwaitUnmask {
        round: RoundId,
    },
    UnmaskRequest(UnmaskRequest),
    UnmaskShares(UnmaskShares),
    /// Server → member: the phase closed without it, or the round aborted.
    Aborted {
        round: RoundId,
        reason: String,
    },
    /// Server → member: the answer to its unmask shares.
    Done {
        round: RoundId,
    },
}

/// Why a member or the server refuses a step.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecAggError {
    #[error("a message for round {got} arrived in round {expected}")]
    WrongRound { expected: RoundId, got: RoundId },
    #[error("{0} arrived out of order")]
    OutOfOrder(&'static str),
    #[error("the roster does not contain this member's keys exactly once")]
    NotInRoster,
    #[error("the roster's keys are not sorted and distinct")]
    UnsortedRoster,
    #[error("the roster's neighbours differ from the graph its keys define")]
    WrongNeighbours,
    #[error("neighbour {0}'s keys are not signed by an enrolled certificate")]
    BadSignature(u32),
    #[error("threshold {threshold} is unsafe or impossible for degree {degree}")]
    UnsafeThreshold { threshold: usize, degree: usize },
    #[error("the roster's threshold {got} differs from the task's ({expected})")]
    ThresholdMismatch { expected: usize, got: usize },
    #[error("a public key is of low order")]
    WeakKey,
    #[error("the shares from member {from} do not decrypt")]
    BadCiphertext { from: u32 },
    #[error("member {0} is not a neighbour")]
    NotANeighbour(u32),
    #[error("both shares of neighbour {0} were requested; refusing to reveal either")]
    BothShares(u32),
    #[error("the unmask request was already answered this round")]
    AlreadyAnswered,
    #[error("{0} of the neighbours sent shares; at least the threshold must")]
    TooFewNeighbours(usize),
    #[error("malformed share: {0}")]
    Malformed(String),
    #[error("identity: {0}")]
    Identity(String),
    #[error(transparent)]
    Shamir(#[from] shamir::ShamirError),
}

/// The graph's seed: a hash of the round and every member's keys, which
/// each member can recompute from the roster.
pub fn graph_seed(round: RoundId, keys: &[PublicKeys]) -> [u8; 32] {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    h.update(b"covey secagg graph v1");
    h.update(&round.0.to_be_bytes());
    for k in keys {
        h.update(&k.channel);
        h.update(&k.masking);
    }
    let mut seed = [0u8; 32];
    seed.copy_from_slice(h.finish().as_ref());
    seed
}

#[cfg(test)]
mod tests;
