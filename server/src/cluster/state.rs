//! What the root commits under its lease, in the root key's record: the
//! current version and where its weights are, the round it planned and for
//! which leaves, the privacy ledger, and whether the run is over.
//!
//! Every change is one swap of that key from the revision the root read,
//! so the state and the lease move together: a deposed root can change
//! neither, and a standby that takes over reads exactly what was committed
//! (the plan of a round in flight included, so leaves' reports still count).
//! Round ids come from `next_round`, which only grows, so no id is reused
//! across takeovers.
//!
//! The state also carries the audit trail's head and the entries this
//! state added to it ([`RootState::pending`]), so a trail entry is committed
//! with the change it records (`cluster::trail`). The key holds the state
//! sealed ([`RootState::seal`]): JetStream's files never see the ledger.

use std::collections::BTreeMap;

use covey_privacy::ClipNorm;
use covey_protocol::{ModelVersion, RoundId, round::FinishReason};
use serde::{Deserialize, Serialize};

use super::{
    at_rest::AtRest,
    objects::{ModelRef, MomentsRef},
    route::LeafId,
};
use crate::{
    rounds::dp::PrivacyLedger,
    state::{
        audit::{AuditEvent, AuditSigner, ChainHead, SealedEntry},
        sealing::SealError,
        store::{RoundRecord, round_event},
    },
};

/// The root state's slot in `AtRest`.
const SLOT: &str = "root";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RootState {
    pub version: ModelVersion,
    /// The committed version's record in the object store.
    pub model: ModelRef,
    /// The server optimizer's moments after `version`, for optimizers that
    /// keep them (FedAvgM, FedAdam, FedYogi): a standby goes on from them.
    pub moments: Option<MomentsRef>,
    /// The round that produced `version` (none for the initial model).
    pub committed_round: Option<RoundId>,
    /// Larger than every round id planned so far.
    pub next_round: RoundId,
    /// The round in flight, if any.
    pub plan: Option<RoundPlan>,
    /// Under DP: what the released versions spent, and the next clip.
    pub ledger: Option<PrivacyLedger>,
    pub finished: Option<Finished>,
    /// The last round that ended, committed or abandoned, as auditors see
    /// every round: aggregates only.
    pub last: Option<RoundRecord>,
    /// Where the audit trail goes on from.
    pub audit: ChainHead,
    /// SHA-256 of the `config.toml` the leading root runs under.
    pub config_sha256: String,
    /// The trail's entries this state added, the last ones before `audit`:
    /// stored in the trail before any state after this one is written.
    pub pending: Vec<SealedEntry>,
}

/// A round the root planned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundPlan {
    pub round: RoundId,
    pub base: ModelVersion,
    /// How many devices each leaf selects; leaves not named select none.
    pub quotas: BTreeMap<LeafId, usize>,
    /// How long a leaf collects, from when it sees the plan: durations,
    /// never instants, so no two machines' clocks are compared.
    pub collect_ms: u64,
    /// Central DP's clip for this round's updates.
    pub clip: Option<ClipNorm>,
}

/// Why the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Finished {
    TargetReached,
    BudgetExhausted,
}

impl From<Finished> for FinishReason {
    fn from(f: Finished) -> Self {
        match f {
            Finished::TargetReached => Self::TargetReached,
            Finished::BudgetExhausted => Self::BudgetExhausted,
        }
    }
}

/// Why the root key's state cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum CorruptState {
    #[error(
        "the cluster's state does not open with this state directory's data key: was this process provisioned from another directory (or is the bucket another federation's)? {0}"
    )]
    Sealed(String),
    #[error("the cluster's state opens but does not decode (written by another version?): {0}")]
    Decode(String),
}

impl RootState {
    /// The state before any round: `model` is version `version`.
    pub fn initial(model: ModelRef, ledger: Option<PrivacyLedger>, config_sha256: String) -> Self {
        Self {
            version: model.version,
            model,
            moments: None,
            committed_round: None,
            next_round: RoundId(1),
            plan: None,
            ledger,
            finished: None,
            last: None,
            config_sha256,
            audit: ChainHead::EMPTY,
            pending: Vec::new(),
        }
    }

    /// The state as the root key holds it: encoded, then sealed.
    pub fn seal(&self, at_rest: &AtRest) -> Result<Vec<u8>, SealError> {
        // Plain data with no maps keyed by non-strings: encoding cannot fail.
        let plain = postcard::to_allocvec(self).unwrap_or_default();
        at_rest.seal(SLOT, &plain)
    }

    /// `None` for the empty state a new lease starts with.
    pub fn open(at_rest: &AtRest, sealed: &[u8]) -> Result<Option<Self>, CorruptState> {
        if sealed.is_empty() {
            return Ok(None);
        }
        let plain = at_rest
            .open(SLOT, sealed)
            .map_err(|e| CorruptState::Sealed(e.to_string()))?;
        postcard::from_bytes(&plain)
            .map(Some)
            .map_err(|e| CorruptState::Decode(e.to_string()))
    }

    /// What the audit trail records of the change from `before` to this
    /// state: the round that ended, then the round that was planned.
    pub fn events_since(&self, before: &RootState) -> Vec<AuditEvent> {
        let mut events = Vec::new();
        if self.last != before.last
            && let Some(record) = &self.last
        {
            events.extend(round_event(record));
        }
        if let Some(plan) = &self.plan
            && before.plan.as_ref().map(|p| p.round) != Some(plan.round)
        {
            events.push(AuditEvent::RoundStarted {
                round: plan.round.0,
                base_version: plan.base.0,
                selected: plan.quotas.values().sum(),
            });
        }
        events
    }

    /// This state with `events` sealed onto the trail as its own entries,
    /// replacing those of the state it came from.
    pub fn audited(
        mut self,
        signer: &AuditSigner,
        time_unix_ms: u64,
        events: Vec<AuditEvent>,
    ) -> Self {
        let (entries, head) = signer.seal(self.audit, time_unix_ms, events);
        self.pending = entries;
        self.audit = head;
        self
    }

    /// Plans the next round on the current version.
    pub fn planned(
        &self,
        quotas: BTreeMap<LeafId, usize>,
        collect_ms: u64,
        clip: Option<ClipNorm>,
    ) -> Self {
        let round = self.next_round;
        Self {
            next_round: round.next(),
            plan: Some(RoundPlan {
                round,
                base: self.version,
                quotas,
                collect_ms,
                clip,
            }),
            ..self.clone()
        }
    }

    /// The planned round released `model`.
    pub fn committed(
        &self,
        model: ModelRef,
        moments: Option<MomentsRef>,
        ledger: Option<PrivacyLedger>,
        record: RoundRecord,
        finished: Option<Finished>,
    ) -> Self {
        Self {
            version: model.version,
            model,
            moments,
            committed_round: self.plan.as_ref().map(|p| p.round),
            plan: None,
            ledger,
            finished,
            last: Some(record),
            ..self.clone()
        }
    }

    /// The planned round released nothing; the next plan retries it.
    pub fn abandoned(&self, record: RoundRecord) -> Self {
        Self {
            plan: None,
            last: Some(record),
            ..self.clone()
        }
    }

    /// The run is over (the budget is spent) without another round.
    pub fn finish(&self, why: Finished) -> Self {
        Self {
            plan: None,
            finished: Some(why),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::RoundOutcome;

    fn model(version: u64) -> ModelRef {
        ModelRef {
            version: ModelVersion(version),
            bytes: 10,
            sha256: [version as u8; 32],
        }
    }

    fn record(round: u64) -> RoundRecord {
        RoundRecord {
            round: RoundId(round),
            base: ModelVersion(0),
            outcome: RoundOutcome::InFlight,
            selected: 3,
            accepted: 3,
            dropped: 0,
            started_unix_ms: 1,
            ended_unix_ms: None,
            mean_client_loss: None,
            test_accuracy: None,
            test_loss: None,
            bytes_up: 0,
            bytes_down: 0,
            clip: None,
            epsilon: None,
            rejected: Default::default(),
        }
    }

    #[test]
    fn round_ids_only_grow_through_plans_commits_and_abandons() {
        let s = RootState::initial(model(0), None, String::new());
        let quotas = BTreeMap::from([(LeafId("a".into()), 3)]);
        let p1 = s.planned(quotas.clone(), 1000, None);
        assert_eq!(p1.plan.as_ref().map(|p| p.round), Some(RoundId(1)));
        let a1 = p1.abandoned(record(1));
        assert_eq!((a1.plan.clone(), a1.version), (None, ModelVersion(0)));
        let p2 = a1.planned(quotas, 1000, None);
        assert_eq!(
            p2.plan.as_ref().map(|p| (p.round, p.base)),
            Some((RoundId(2), ModelVersion(0)))
        );
        let c2 = p2.committed(model(1), None, None, record(2), None);
        assert_eq!(c2.version, ModelVersion(1));
        assert_eq!(c2.committed_round, Some(RoundId(2)));
        assert_eq!(c2.next_round, RoundId(3));
        assert!(c2.plan.is_none());
    }

    fn at_rest() -> AtRest {
        AtRest::new(crate::state::sealing::DataKey::generate().unwrap(), "t")
    }

    fn signer() -> AuditSigner {
        AuditSigner::from_pkcs8(&AuditSigner::generate().unwrap()).unwrap()
    }

    #[test]
    fn states_round_trip_sealed_and_garbage_is_named() {
        let signer = signer();
        let s = RootState::initial(model(4), None, String::new()).planned(
            BTreeMap::from([(LeafId("a".into()), 3), (LeafId("b".into()), 2)]),
            500,
            ClipNorm::new(1.5).ok(),
        );
        let events = s.events_since(&RootState::initial(model(4), None, String::new()));
        let s = s.audited(&signer, 7, events);
        let key = at_rest();
        let sealed = s.seal(&key).unwrap();
        assert_eq!(RootState::open(&key, &sealed).unwrap(), Some(s));
        assert_eq!(RootState::open(&key, &[]).unwrap(), None);
        assert!(RootState::open(&key, &[0xff; 7]).is_err());
        assert!(
            matches!(
                RootState::open(&at_rest(), &sealed),
                Err(CorruptState::Sealed(_))
            ),
            "another directory's key does not open it"
        );
        let garbage = key.seal(SLOT, &[0xff; 7]).unwrap();
        assert!(matches!(
            RootState::open(&key, &garbage),
            Err(CorruptState::Decode(_))
        ));
    }

    #[test]
    fn each_change_adds_what_it_did_to_the_trail_and_nothing_twice() {
        let signer = signer();
        let quotas = BTreeMap::from([(LeafId("a".into()), 2), (LeafId("b".into()), 1)]);
        let s0 = RootState::initial(model(0), None, String::new());
        let s0 = s0.clone().audited(
            &signer,
            1,
            vec![AuditEvent::Initialised {
                model: "m".into(),
                parameters: 1,
            }],
        );
        let step = |before: &RootState, after: RootState| {
            let events = after.events_since(before);
            after.audited(&signer, 2, events)
        };
        let p1 = step(&s0, s0.planned(quotas.clone(), 10, None));
        let mut done = record(1);
        done.outcome = RoundOutcome::Committed {
            version: ModelVersion(1),
        };
        let c1 = step(&p1, p1.committed(model(1), None, None, done, None));
        let p2 = step(&c1, c1.planned(quotas, 10, None));
        // A renewal writes the same state: it adds nothing.
        assert!(p2.events_since(&p2).is_empty());
        let kinds: Vec<_> = [&s0, &p1, &c1, &p2]
            .iter()
            .map(|s| {
                s.pending
                    .iter()
                    .map(|e| e.entry().unwrap().event)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert!(matches!(kinds[0][..], [AuditEvent::Initialised { .. }]));
        assert!(matches!(
            kinds[1][..],
            [AuditEvent::RoundStarted {
                round: 1,
                base_version: 0,
                selected: 3
            }]
        ));
        assert!(matches!(
            kinds[2][..],
            [AuditEvent::RoundCommitted {
                round: 1,
                version: 1,
                ..
            }]
        ));
        assert!(matches!(
            kinds[3][..],
            [AuditEvent::RoundStarted {
                round: 2,
                base_version: 1,
                ..
            }]
        ));
        // The entries of all four states are one chain.
        let mut check = crate::state::audit::ChainCheck::new(signer.public_key());
        for s in [&s0, &p1, &c1, &p2] {
            for e in &s.pending {
                check.push(&e.json, &e.hash, &e.signature).unwrap();
            }
        }
        assert_eq!(check.entries(), p2.audit.next_seq);
    }
}
