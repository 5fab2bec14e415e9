//! Rules an auditor holds the server to, whatever the operator configures
//! elsewhere: the smallest cohort any released aggregate may come from, and
//! how long round records and old model versions are kept.

use std::{fmt, num::NonZeroUsize, time::Duration};

/// How long the store keeps what it may delete. The audit trail is kept
/// whole: it is the record of what was deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Round records older than this (by their end) are deleted.
    pub rounds: Option<Duration>,
    /// Only this many of the newest model versions are kept; the current
    /// one always is.
    pub versions: Option<NonZeroUsize>,
}

impl Retention {
    pub fn is_forever(&self) -> bool {
        self.rounds.is_none() && self.versions.is_none()
    }
}

/// k: no model version and no metric is released from fewer participants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MinCohort(usize);

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("must be at least 1, got {0}")]
pub struct ZeroCohort(usize);

/// A release refused because too few took part.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "withheld: {contributors} participant(s), below the minimum cohort of {k} (compliance.min_cohort)"
)]
pub struct BelowMinCohort {
    pub contributors: usize,
    pub k: usize,
}

impl MinCohort {
    pub fn new(k: usize) -> Result<Self, ZeroCohort> {
        if k == 0 {
            return Err(ZeroCohort(k));
        }
        Ok(Self(k))
    }

    pub fn get(self) -> usize {
        self.0
    }

    /// Whether an aggregate of `contributors` participants may be released.
    pub fn check(self, contributors: usize) -> Result<(), BelowMinCohort> {
        if contributors < self.0 {
            return Err(BelowMinCohort {
                contributors,
                k: self.0,
            });
        }
        Ok(())
    }
}

impl fmt::Display for MinCohort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn retention_defaults_to_keeping_everything() {
        assert!(super::Retention::default().is_forever());
    }

    use super::*;

    #[test]
    fn releases_need_k_contributors() {
        let k = MinCohort::new(3).unwrap();
        assert!(k.check(3).is_ok());
        assert!(k.check(30).is_ok());
        let err = k.check(2).unwrap_err();
        assert_eq!(
            err,
            BelowMinCohort {
                contributors: 2,
                k: 3
            }
        );
        assert!(err.to_string().contains("compliance.min_cohort"));
        assert!(k.check(0).is_err());
        assert!(MinCohort::new(0).is_err());
    }
}
