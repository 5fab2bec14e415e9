//! Dashboard logins: issued over the operator API to an enrolled auditor,
//! operator or admin, in that holder's role, and checked on every request.
//! A login ends when it expires, when its holder signs out or revokes it,
//! or when the holder's certificate is revoked.

use std::{collections::HashMap, sync::Arc, sync::RwLock};

use covey_privacy::Pseudonym;
use covey_protocol::dashboard::{LoginDigest, LoginToken};

use crate::{
    admission::pki::Admitted,
    operator::admin::Role,
    state::store::{Login, Store, StoreError},
};

/// The longest a login may last: 30 days.
pub const MAX_HOURS: u64 = 720;

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("a login lasts 1 to {MAX_HOURS} hours, not {0}")]
    Hours(u64),
    #[error("devices cannot sign in to the dashboard")]
    Device,
    #[error("no system randomness for the token")]
    Random,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a presented login does not let its holder in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("unknown or revoked login")]
    Unknown,
    #[error("the login has expired")]
    Expired,
    #[error("the login's certificate is revoked or its role changed")]
    HolderRevoked,
}

/// The logins in force, kept in memory over the store.
pub struct LoginBook {
    store: Arc<Store>,
    admitted: Arc<Admitted>,
    logins: RwLock<HashMap<LoginDigest, Login>>,
}

impl LoginBook {
    pub fn load(store: Arc<Store>, admitted: Arc<Admitted>) -> Result<Self, StoreError> {
        let logins = store.logins()?.into_iter().collect();
        Ok(Self {
            store,
            admitted,
            logins: RwLock::new(logins),
        })
    }

    /// A new login for `actor` in `role`; returns the token (shown once,
    /// never stored) and when it expires.
    pub fn issue(
        &self,
        actor: Pseudonym,
        role: Role,
        hours: u64,
        now_unix: i64,
    ) -> Result<(LoginToken, i64), IssueError> {
        if hours == 0 || hours > MAX_HOURS {
            return Err(IssueError::Hours(hours));
        }
        if role == Role::Device {
            return Err(IssueError::Device);
        }
        let token = LoginToken::generate(&ring::rand::SystemRandom::new())
            .map_err(|_| IssueError::Random)?;
        let login = Login {
            actor,
            role,
            issued_unix: now_unix,
            expires_unix: now_unix + (hours * 3600) as i64,
        };
        let digest = token.digest();
        self.store.put_login(&digest, &login)?;
        self.write().insert(digest, login.clone());
        Ok((token, login.expires_unix))
    }

    /// Who holds `token`, if it lets them in at `now_unix`.
    pub fn check(
        &self,
        token: &LoginToken,
        now_unix: i64,
    ) -> Result<(LoginDigest, Login), Refusal> {
        let digest = token.digest();
        let login = self.read().get(&digest).cloned().ok_or(Refusal::Unknown)?;
        if login.expires_unix <= now_unix {
            return Err(Refusal::Expired);
        }
        if self.admitted.role(&login.actor) != Some(login.role) {
            return Err(Refusal::HolderRevoked);
        }
        Ok((digest, login))
    }

    /// Ends one login (signing out).
    pub fn sign_out(&self, digest: LoginDigest) -> Result<(), StoreError> {
        let Some(login) = self.read().get(&digest).cloned() else {
            return Ok(());
        };
        self.store.remove_logins(login.actor, &[digest])?;
        self.write().remove(&digest);
        Ok(())
    }

    /// Ends every login of `actor`, expired ones included; returns how many.
    pub fn revoke_all(&self, actor: Pseudonym) -> Result<usize, StoreError> {
        let digests: Vec<LoginDigest> = self
            .read()
            .iter()
            .filter(|(_, l)| l.actor == actor)
            .map(|(d, _)| *d)
            .collect();
        self.store.remove_logins(actor, &digests)?;
        let mut logins = self.write();
        for d in &digests {
            logins.remove(d);
        }
        Ok(digests.len())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<LoginDigest, Login>> {
        // A panic while holding the lock leaves a map that is still whole.
        self.logins.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<LoginDigest, Login>> {
        self.logins.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::sealing::Kek;

    fn book(dir: &std::path::Path, admitted: Arc<Admitted>) -> LoginBook {
        let store = Arc::new(Store::open(dir, &Kek::from_bytes([7; 32], "test")).unwrap());
        LoginBook::load(store, admitted).unwrap()
    }

    #[test]
    fn logins_expire_follow_their_holder_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let alice = Pseudonym::from_bytes([1; 8]);
        let bob = Pseudonym::from_bytes([2; 8]);
        let admitted = Arc::new(Admitted::new([
            (alice, Role::Auditor),
            (bob, Role::Operator),
        ]));
        let (token, expires) = {
            let logins = book(dir.path(), admitted.clone());
            let (token, expires) = logins.issue(alice, Role::Auditor, 2, 1_000).unwrap();
            assert_eq!(expires, 1_000 + 7_200);
            assert!(matches!(
                logins.issue(bob, Role::Device, 1, 0),
                Err(IssueError::Device)
            ));
            assert!(matches!(
                logins.issue(bob, Role::Operator, 721, 0),
                Err(IssueError::Hours(721))
            ));
            (token, expires)
        };
        // Reopened: the login is still there, by its digest alone.
        let logins = book(dir.path(), admitted.clone());
        let (digest, login) = logins.check(&token, expires - 1).unwrap();
        assert_eq!((digest, login.actor), (token.digest(), alice));
        assert_eq!(logins.check(&token, expires).unwrap_err(), Refusal::Expired);
        // Another role for the same certificate is not the login's role.
        admitted.insert(alice, Role::Operator);
        assert_eq!(
            logins.check(&token, 1_001).unwrap_err(),
            Refusal::HolderRevoked
        );
        admitted.remove(&alice);
        assert_eq!(
            logins.check(&token, 1_001).unwrap_err(),
            Refusal::HolderRevoked
        );
        admitted.insert(alice, Role::Auditor);
        assert!(logins.check(&token, 1_001).is_ok());
        assert_eq!(logins.revoke_all(alice).unwrap(), 1);
        assert_eq!(logins.check(&token, 1_001).unwrap_err(), Refusal::Unknown);
        drop(logins);
        let reopened = book(dir.path(), admitted);
        assert_eq!(reopened.check(&token, 1_001).unwrap_err(), Refusal::Unknown);
    }
}
