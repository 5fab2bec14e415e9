//! Connection and rate limits, so that a flood of connections or requests,
//! from strangers or from one enrolled client, cannot starve the others.
//!
//! Strangers are turned away before their TLS handshake once the server is
//! full; enrolled clients are limited by pseudonym, which the TLS handshake
//! proves, so one device cannot spend another's allowance.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use covey_privacy::Pseudonym;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::Network;

/// Why a connection or request was turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` are open.
    ServerFull,
    /// This client holds `max_connections_per_client` already.
    TooManyConnections,
    /// This client is over its request rate.
    RateLimited,
}

impl Refusal {
    pub const ALL: [Self; 3] = [
        Self::ServerFull,
        Self::TooManyConnections,
        Self::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ServerFull => "server full",
            Self::TooManyConnections => "too many connections from one client",
            Self::RateLimited => "client over its rate limit",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub struct Limits {
    max_connections: usize,
    open: AtomicUsize,
    max_per_client: usize,
    /// Open connections per client; entries leave when they reach zero.
    per_client: Mutex<HashMap<Pseudonym, usize>>,
    /// Holds one bucket per client seen; `retain_recent` drops full ones.
    rate: DefaultKeyedRateLimiter<Pseudonym>,
}

impl Limits {
    pub fn new(network: &Network) -> Self {
        let period = Duration::from_secs_f64(1.0 / network.client_requests_per_sec);
        let burst = NonZeroU32::new(network.client_request_burst).unwrap_or(NonZeroU32::MIN);
        // The config checked the rate is positive and finite; a period too
        // small to represent means "unlimited in practice".
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        Self {
            max_connections: network.max_connections,
            open: AtomicUsize::new(0),
            max_per_client: network.max_connections_per_client,
            per_client: Mutex::new(HashMap::new()),
            rate: RateLimiter::keyed(quota),
        }
    }

    /// A connection attempt, before its handshake: refused when full.
    pub fn admit(self: &Arc<Self>) -> Result<Slot, Refusal> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_connections).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(Slot {
                limits: self.clone(),
            }),
            Err(_) => Err(Refusal::ServerFull),
        }
    }

    /// Connections open now, handshakes included.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Whether the server is loaded enough to ask for address validation
    /// (a QUIC retry) before spending a handshake on an unproven address.
    pub fn under_pressure(&self) -> bool {
        self.open() * 2 >= self.max_connections
    }

    /// An authenticated client's connection: counted against its own
    /// limits, and charged one request.
    pub fn admit_client(self: &Arc<Self>, client: Pseudonym) -> Result<ClientSlot, Refusal> {
        self.allow_request(client)?;
        let mut per_client = self
            .per_client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let open = per_client.entry(client).or_default();
        if *open >= self.max_per_client {
            return Err(Refusal::TooManyConnections);
        }
        *open += 1;
        Ok(ClientSlot {
            limits: self.clone(),
            client,
        })
    }

    /// One request (a stream) from `client`.
    pub fn allow_request(&self, client: Pseudonym) -> Result<(), Refusal> {
        self.rate
            .check_key(&client)
            .map_err(|_| Refusal::RateLimited)?;
        if self.rate.len() > 4 * self.max_connections.max(1024) {
            // Buckets that refilled carry no state worth keeping.
            self.rate.retain_recent();
        }
        Ok(())
    }
}

/// One open connection; released on drop.
pub struct Slot {
    limits: Arc<Limits>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limits.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One open connection of an authenticated client; released on drop.
pub struct ClientSlot {
    limits: Arc<Limits>,
    client: Pseudonym,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut per_client = self
            .limits
            .per_client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(open) = per_client.get_mut(&self.client) {
            *open -= 1;
            if *open == 0 {
                per_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ServerConfig;

    fn limits(max: usize, per_client: usize, rate: f64, burst: u32) -> Arc<Limits> {
        let mut network = ServerConfig::default().server;
        network.max_connections = max;
        network.max_connections_per_client = per_client;
        network.client_requests_per_sec = rate;
        network.client_request_burst = burst;
        Arc::new(Limits::new(&network))
    }

    fn client(n: u8) -> Pseudonym {
        Pseudonym::from_bytes([n; 8])
    }

    #[test]
    fn the_server_refuses_past_max_connections_and_frees_slots_on_drop() {
        let l = limits(2, 4, 100.0, 100);
        let a = l.admit().unwrap();
        let _b = l.admit().unwrap();
        assert_eq!(l.admit().err(), Some(Refusal::ServerFull));
        assert!(l.under_pressure());
        drop(a);
        assert_eq!(l.open(), 1);
        assert!(l.admit().is_ok());
    }

    #[test]
    fn one_client_is_held_to_its_own_connection_limit() {
        let l = limits(100, 2, 100.0, 100);
        let a1 = l.admit_client(client(1)).unwrap();
        let _a2 = l.admit_client(client(1)).unwrap();
        assert_eq!(
            l.admit_client(client(1)).err(),
            Some(Refusal::TooManyConnections)
        );
        // Another client is unaffected.
        assert!(l.admit_client(client(2)).is_ok());
        drop(a1);
        assert!(l.admit_client(client(1)).is_ok());
    }

    #[test]
    fn a_burst_past_the_bucket_is_refused_for_that_client_only() {
        let l = limits(100, 4, 0.001, 5);
        for _ in 0..5 {
            l.allow_request(client(1)).unwrap();
        }
        assert_eq!(l.allow_request(client(1)), Err(Refusal::RateLimited));
        assert_eq!(l.admit_client(client(1)).err(), Some(Refusal::RateLimited));
        assert!(l.allow_request(client(2)).is_ok());
    }
}
