//! The operator's live web dashboard, served by `covey-server run` (and
//! `covey-sim --dashboard`) from the same process.
//!
//! It reads only what the server keeps anyway: the store's round records,
//! enrollments and audit trail, the Prometheus counters, and a small
//! [`Live`] snapshot the hub publishes into a watch channel. Pages are
//! static files compiled in; the data comes as JSON, live over server-sent
//! events. On a loopback address it serves plain HTTP, and a browser with
//! no login sees the auditor's view (pseudonyms only); on any other address
//! it serves HTTPS with the server's certificate and requires a login.

mod http;
pub mod live;
pub mod logins;
mod view;

use std::{net::SocketAddr, sync::Arc};

pub use http::{BindError, bind, serve};
pub use live::Live;
pub use logins::LoginBook;
pub use view::{Board, Facts};

/// How the dashboard is reached, decided from its address at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposure {
    /// Plain HTTP on loopback; no login needed for the auditor's view, and
    /// requests must name a loopback host (against DNS rebinding).
    Loopback,
    /// HTTPS, a login for everything.
    Network,
}

impl Exposure {
    pub fn of(addr: SocketAddr) -> Self {
        if addr.ip().is_loopback() {
            Self::Loopback
        } else {
            Self::Network
        }
    }
}

/// A bound dashboard, ready to serve.
pub struct Listener {
    pub listener: std::net::TcpListener,
    pub exposure: Exposure,
    /// With [`Exposure::Network`], the server's certificate.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Listener {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The address to open in a browser.
    pub fn url(&self) -> std::io::Result<String> {
        let addr = self.local_addr()?;
        Ok(match self.exposure {
            Exposure::Loopback => format!("http://{addr}/"),
            Exposure::Network => format!("https://{addr}/"),
        })
    }
}
