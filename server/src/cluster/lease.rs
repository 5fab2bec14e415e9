//! The root coordinator's lease, sans-IO: which replica may commit, and the
//! fenced state it commits.
//!
//! The lease and the root's state live in one key of a store with
//! compare-and-swap on revisions (JetStream KV). Every write the root makes
//! (a renewal, a takeover, a commit) is a swap from the revision it last
//! read, so a replica that lost the lease, however long it was paused or
//! partitioned, cannot write: the key moved on when the new holder took it.
//! That one swap is both the fence and the commit point.
//!
//! Nobody compares clocks across machines. A standby measures how long the
//! key has stood still on its own monotonic clock, from when it saw the
//! key's current revision, and takes over after the lease's duration. The
//! holder counts its lease from when it *sent* its last successful write,
//! which precedes any standby's sighting of it, and gives it up a margin
//! early, so the two never both believe they lead.
//!
//! [`Lease`] is driven by events: what the key holds ([`Lease::observed`]),
//! the outcome of a write it asked for ([`Lease::written`]), and time
//! ([`Lease::poll`]). `cluster::jetstream` moves the bytes.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What the root's key holds: who leads, in which term, and the state the
/// leader commits (opaque here; the round coordinator's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootRecord {
    /// The holder's instance id: a replica's name and a random suffix, so a
    /// restarted replica is a new holder and waits for the lease to lapse.
    pub holder: String,
    /// Grows by one with every takeover.
    pub term: u64,
    pub state: Vec<u8>,
}

/// How long a lease lasts and how often its holder renews it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    duration: Duration,
    renew_every: Duration,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("the lease must last at least 100 ms, got {0:?}")]
    TooShort(Duration),
    #[error(
        "renewals every {renew_every:?} leave no room for a retry within a {duration:?} lease: renew at most every third of it"
    )]
    RenewTooSlow {
        duration: Duration,
        renew_every: Duration,
    },
}

impl Timing {
    pub fn new(duration: Duration, renew_every: Duration) -> Result<Self, TimingError> {
        if duration < Duration::from_millis(100) {
            return Err(TimingError::TooShort(duration));
        }
        if renew_every.is_zero() || renew_every * 3 > duration {
            return Err(TimingError::RenewTooSlow {
                duration,
                renew_every,
            });
        }
        Ok(Self {
            duration,
            renew_every,
        })
    }

    pub fn duration(&self) -> Duration {
        self.duration
    }

    pub fn renew_every(&self) -> Duration {
        self.renew_every
    }

    /// How long before its lease lapses the holder stops acting on it: a
    /// tenth, for clock-rate drift between machines.
    fn margin(&self) -> Duration {
        self.duration / 10
    }
}

/// A write the lease asks its driver to make to the root's key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// The key does not exist yet: create it.
    Create(RootRecord),
    /// Swap the key from `expected` (the revision last read) to `record`.
    Swap { record: RootRecord, expected: u64 },
}

impl Request {
    pub fn record(&self) -> &RootRecord {
        match self {
            Self::Create(record) | Self::Swap { record, .. } => record,
        }
    }
}

/// Why a requested write did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Someone else wrote the key first (a compare-and-swap lost).
    Conflict,
    /// The store could not be reached or did not answer; the write may or
    /// may not have been applied.
    Unavailable,
}

/// What a write's outcome meant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// This replica now leads (it created, took over or reclaimed the key).
    Elected { term: u64 },
    /// A proposed state was committed at this revision.
    Committed { state: Vec<u8>, revision: u64 },
    /// A proposal was not committed: the lease was lost, or the write's
    /// fate is unknown. The caller re-reads the state before proposing again.
    NotCommitted,
    /// This replica no longer leads.
    Deposed,
    /// A renewal went through, or failed without consequence yet.
    Quiet,
}

#[derive(Debug)]
struct Seen {
    revision: u64,
    record: Option<RootRecord>,
    /// When this replica first saw this revision (its own clock).
    at: Instant,
}

#[derive(Debug)]
struct Held {
    term: u64,
    revision: u64,
    /// When the write that established or renewed it was sent.
    sent_at: Instant,
}

#[derive(Debug)]
enum Purpose {
    Acquire,
    Renew,
    Commit,
}

#[derive(Debug)]
struct Pending {
    request: Request,
    purpose: Purpose,
    sent_at: Instant,
}

/// One replica's view of the root lease.
#[derive(Debug)]
pub struct Lease {
    me: String,
    timing: Timing,
    seen: Option<Seen>,
    held: Option<Held>,
    pending: Option<Pending>,
    /// A state the leader wants committed, sent at the next poll.
    proposal: Option<Vec<u8>>,
    /// Until when a failed write is not retried.
    backoff_until: Option<Instant>,
}

/// A proposal from a replica that does not lead.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("this replica does not hold the root lease")]
pub struct NotLeader;

impl Lease {
    pub fn new(me: impl Into<String>, timing: Timing) -> Self {
        Self {
            me: me.into(),
            timing,
            seen: None,
            held: None,
            pending: None,
            proposal: None,
            backoff_until: None,
        }
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Whether a proposal is waiting to be sent or to be answered.
    pub fn proposing(&self) -> bool {
        self.proposal.is_some()
            || self
                .pending
                .as_ref()
                .is_some_and(|p| matches!(p.purpose, Purpose::Commit))
    }

    /// The key holds `entry` (revision and record; `None` if it does not
    /// exist), read or watched at `now`.
    pub fn observed(&mut self, entry: Option<(u64, RootRecord)>, now: Instant) {
        let (revision, record) = match entry {
            Some((revision, record)) => (revision, Some(record)),
            None => (0, None),
        };
        if self.seen.as_ref().is_some_and(|s| s.revision == revision) {
            return;
        }
        if self.seen.as_ref().is_some_and(|s| s.revision > revision) {
            // A stale read (a lagging replica of the stream); keep the newer.
            return;
        }
        if let Some(held) = &mut self.held {
            match &record {
                Some(r) if r.holder == self.me && r.term == held.term => {
                    // Our own write, seen back (perhaps one whose answer was lost).
                    held.revision = held.revision.max(revision);
                }
                _ => self.held = None,
            }
        }
        self.seen = Some(Seen {
            revision,
            record,
            at: now,
        });
    }

    /// Whether this replica leads at `now`, and in which term.
    pub fn leading(&self, now: Instant) -> Option<u64> {
        let held = self.held.as_ref()?;
        let until = held.sent_at + self.timing.duration - self.timing.margin();
        (now < until).then_some(held.term)
    }

    /// The state in the key as last seen.
    pub fn state(&self) -> Option<&[u8]> {
        self.seen
            .as_ref()
            .and_then(|s| s.record.as_ref())
            .map(|r| r.state.as_slice())
    }

    /// Asks for `state` to be committed, fenced by the lease.
    pub fn propose(&mut self, state: Vec<u8>, now: Instant) -> Result<(), NotLeader> {
        if self.leading(now).is_none() {
            return Err(NotLeader);
        }
        self.proposal = Some(state);
        Ok(())
    }

    /// The write to make now, if any. One write is in flight at a time.
    pub fn poll(&mut self, now: Instant) -> Option<Request> {
        if self.pending.is_some() || self.backoff_until.is_some_and(|t| now < t) {
            return None;
        }
        let seen = self.seen.as_ref()?;
        let (request, purpose) = if let Some(held) = &self.held {
            let Some(record) = &seen.record else {
                return None;
            };
            if self.leading(now).is_none() {
                // Lapsed without a word from the store: stop leading; the
                // key decides who leads next.
                self.held = None;
                self.proposal = None;
                return None;
            }
            if let Some(state) = self.proposal.take() {
                let record = RootRecord {
                    holder: self.me.clone(),
                    term: held.term,
                    state,
                };
                (
                    Request::Swap {
                        record,
                        expected: held.revision,
                    },
                    Purpose::Commit,
                )
            } else if now >= held.sent_at + self.timing.renew_every {
                (
                    Request::Swap {
                        record: record.clone(),
                        expected: held.revision,
                    },
                    Purpose::Renew,
                )
            } else {
                return None;
            }
        } else {
            match &seen.record {
                None => (
                    Request::Create(RootRecord {
                        holder: self.me.clone(),
                        term: 1,
                        state: Vec::new(),
                    }),
                    Purpose::Acquire,
                ),
                // Still ours (a renewal's answer was lost): nobody wrote
                // since, so a swap from here keeps the same term.
                Some(record) if record.holder == self.me => (
                    Request::Swap {
                        record: record.clone(),
                        expected: seen.revision,
                    },
                    Purpose::Acquire,
                ),
                Some(record) if now >= seen.at + self.timing.duration => (
                    Request::Swap {
                        record: RootRecord {
                            holder: self.me.clone(),
                            term: record.term + 1,
                            state: record.state.clone(),
                        },
                        expected: seen.revision,
                    },
                    Purpose::Acquire,
                ),
                Some(_) => return None,
            }
        };
        self.pending = Some(Pending {
            request: request.clone(),
            purpose,
            sent_at: now,
        });
        Some(request)
    }

    /// The outcome of the write [`poll`](Self::poll) asked for: the key's
    /// new revision, or why it was refused.
    pub fn written(&mut self, result: Result<u64, Refused>, now: Instant) -> Outcome {
        let Some(pending) = self.pending.take() else {
            return Outcome::Quiet;
        };
        let was_leading = self.held.is_some();
        match result {
            Ok(revision) => {
                self.backoff_until = None;
                let record = pending.request.record().clone();
                self.held = Some(Held {
                    term: record.term,
                    revision,
                    sent_at: pending.sent_at,
                });
                let state = record.state.clone();
                self.seen = Some(Seen {
                    revision,
                    record: Some(record.clone()),
                    at: now,
                });
                match pending.purpose {
                    Purpose::Acquire => Outcome::Elected { term: record.term },
                    Purpose::Renew => Outcome::Quiet,
                    Purpose::Commit => Outcome::Committed { state, revision },
                }
            }
            Err(refused) => {
                if refused == Refused::Conflict {
                    // The key moved on without us: whoever wrote it leads.
                    self.held = None;
                    self.proposal = None;
                } else {
                    // Try again soon; the lease's clock keeps running.
                    self.backoff_until = Some(now + self.timing.renew_every / 4);
                }
                match pending.purpose {
                    // Lost, or its fate unknown: the driver re-reads.
                    Purpose::Commit => Outcome::NotCommitted,
                    _ if was_leading && self.held.is_none() => Outcome::Deposed,
                    _ => Outcome::Quiet,
                }
            }
        }
    }

    /// When [`poll`](Self::poll) may have something to do.
    pub fn wake(&self, now: Instant) -> Instant {
        let mut at = now + self.timing.renew_every;
        if let Some(held) = &self.held {
            at = at.min(held.sent_at + self.timing.renew_every);
        } else if let Some(seen) = &self.seen {
            at = at.min(seen.at + self.timing.duration);
        }
        if let Some(t) = self.backoff_until {
            at = at.max(t);
        }
        at.max(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing::new(Duration::from_secs(3), Duration::from_millis(500)).unwrap()
    }

    /// A compare-and-swap key in memory, like JetStream KV's.
    #[derive(Default)]
    struct Key {
        revision: u64,
        record: Option<RootRecord>,
    }

    impl Key {
        fn apply(&mut self, request: &Request) -> Result<u64, Refused> {
            let ok = match request {
                Request::Create(_) => self.record.is_none(),
                Request::Swap { expected, .. } => *expected == self.revision,
            };
            if !ok {
                return Err(Refused::Conflict);
            }
            self.revision += 1;
            self.record = Some(request.record().clone());
            Ok(self.revision)
        }

        fn entry(&self) -> Option<(u64, RootRecord)> {
            self.record.clone().map(|r| (self.revision, r))
        }
    }

    fn step(lease: &mut Lease, key: &mut Key, now: Instant) -> Option<Outcome> {
        lease.observed(key.entry(), now);
        let request = lease.poll(now)?;
        Some(lease.written(key.apply(&request), now))
    }

    #[test]
    fn timings_that_leave_no_room_are_refused() {
        assert!(Timing::new(Duration::from_millis(50), Duration::from_millis(10)).is_err());
        assert!(Timing::new(Duration::from_secs(3), Duration::from_secs(2)).is_err());
        assert!(Timing::new(Duration::from_secs(3), Duration::ZERO).is_err());
    }

    #[test]
    fn the_first_replica_creates_the_key_and_the_second_waits() {
        let t0 = Instant::now();
        let mut key = Key::default();
        let (mut a, mut b) = (Lease::new("a", timing()), Lease::new("b", timing()));
        assert_eq!(
            step(&mut a, &mut key, t0),
            Some(Outcome::Elected { term: 1 })
        );
        assert_eq!(step(&mut b, &mut key, t0), None);
        assert_eq!(a.leading(t0), Some(1));
        assert_eq!(b.leading(t0), None);
        assert_eq!(b.propose(vec![1], t0), Err(NotLeader));
    }

    #[test]
    fn a_renewing_leader_keeps_the_lease_for_as_long_as_it_renews() {
        let t0 = Instant::now();
        let mut key = Key::default();
        let (mut a, mut b) = (Lease::new("a", timing()), Lease::new("b", timing()));
        step(&mut a, &mut key, t0);
        for i in 1..40u32 {
            let now = t0 + Duration::from_millis(250) * i;
            step(&mut a, &mut key, now);
            assert_eq!(step(&mut b, &mut key, now), None, "b took over at step {i}");
            assert_eq!(a.leading(now), Some(1));
        }
    }

    #[test]
    fn a_standby_takes_over_a_silent_leader_in_the_next_term_with_its_state() {
        let t0 = Instant::now();
        let mut key = Key::default();
        let (mut a, mut b) = (Lease::new("a", timing()), Lease::new("b", timing()));
        step(&mut a, &mut key, t0);
        a.propose(b"round 7".to_vec(), t0).unwrap();
        assert!(matches!(
            step(&mut a, &mut key, t0),
            Some(Outcome::Committed { .. })
        ));
        // a falls silent; b watches the key stand still for the duration.
        step(&mut b, &mut key, t0);
        let just_before = t0 + timing().duration() - Duration::from_millis(1);
        assert_eq!(step(&mut b, &mut key, just_before), None);
        let after = t0 + timing().duration();
        assert_eq!(
            step(&mut b, &mut key, after),
            Some(Outcome::Elected { term: 2 })
        );
        assert_eq!(b.state(), Some(&b"round 7"[..]));
        // a's own clock already told it to stop before b took over.
        assert_eq!(a.leading(after), None);
        assert!(
            a.leading(t0 + timing().duration() - timing().margin())
                .is_none()
        );
    }

    #[test]
    fn a_paused_leaders_write_is_refused_after_the_takeover() {
        let t0 = Instant::now();
        let mut key = Key::default();
        let (mut a, mut b) = (Lease::new("a", timing()), Lease::new("b", timing()));
        step(&mut a, &mut key, t0);
        step(&mut b, &mut key, t0);
        // a decides to commit, then stalls (a pause, a partition) before the
        // write reaches the store.
        a.propose(b"version 2".to_vec(), t0).unwrap();
        let stalled = a.poll(t0).unwrap();
        let later = t0 + timing().duration();
        assert_eq!(
            step(&mut b, &mut key, later),
            Some(Outcome::Elected { term: 2 })
        );
        // The stalled write arrives: the key moved on, so it is refused.
        let outcome = a.written(key.apply(&stalled), later);
        assert_eq!(outcome, Outcome::NotCommitted);
        assert_eq!(a.leading(later), None);
        assert_eq!(key.record.as_ref().unwrap().holder, "b");
        assert!(key.record.as_ref().unwrap().state.is_empty());
        assert_eq!(a.propose(vec![1], later), Err(NotLeader));
    }

    #[test]
    fn a_lost_answer_is_recovered_from_the_key_without_a_new_term() {
        let t0 = Instant::now();
        let mut key = Key::default();
        let mut a = Lease::new("a", timing());
        step(&mut a, &mut key, t0);
        let renew_at = t0 + Duration::from_millis(600);
        a.observed(key.entry(), renew_at);
        let renewal = a.poll(renew_at).unwrap();
        // The write lands but its answer is lost.
        key.apply(&renewal).unwrap();
        assert_eq!(
            a.written(Err(Refused::Unavailable), renew_at),
            Outcome::Quiet
        );
        assert_eq!(a.leading(renew_at), Some(1));
        // The next read shows our own write: still leading, same term.
        let next = renew_at + Duration::from_millis(200);
        a.observed(key.entry(), next);
        assert_eq!(a.leading(next), Some(1));
        // Its lease still counts from the last answered write, so it renews
        // at once, from the revision it just read.
        assert_eq!(step(&mut a, &mut key, next), Some(Outcome::Quiet));
        assert_eq!((key.revision, key.record.as_ref().unwrap().term), (3, 1));
    }

    #[test]
    fn a_leader_that_cannot_reach_the_store_stops_leading_on_its_own_clock() {
        let t0 = Instant::now();
        let mut key = Key::default();
        let mut a = Lease::new("a", timing());
        step(&mut a, &mut key, t0);
        let mut now = t0;
        while a.leading(now).is_some() {
            now += Duration::from_millis(100);
            if let Some(_request) = a.poll(now) {
                a.written(Err(Refused::Unavailable), now);
            }
        }
        assert!(now <= t0 + timing().duration() - timing().margin());
        assert_eq!(a.propose(vec![1], now), Err(NotLeader));
    }

    #[test]
    fn a_restarted_replica_is_a_new_holder_and_waits() {
        let t0 = Instant::now();
        let mut key = Key::default();
        let mut a = Lease::new("a/1", timing());
        step(&mut a, &mut key, t0);
        let mut again = Lease::new("a/2", timing());
        assert_eq!(step(&mut again, &mut key, t0), None);
        let later = t0 + timing().duration();
        assert_eq!(
            step(&mut again, &mut key, later),
            Some(Outcome::Elected { term: 2 })
        );
    }
}
