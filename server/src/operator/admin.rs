//! The operator API: the same QUIC port and CA as training, under its own
//! ALPN, for certificates that carry a role. Each request is one JSON
//! document on its own stream, answered on that stream. The role bound to
//! the certificate decides what it may do, and every request, allowed or
//! not, goes into the audit trail under the caller's pseudonym.

use std::{fmt, net::SocketAddr, time::Duration};

use covey_protocol::{ADMIN_ALPN, identity::IdentityBundle};
// The requests are wire format, shared with the fuzz targets.
pub use covey_protocol::admin::{AdminRequest, Denied, MAX_REQUEST_BYTES, Role};
use serde::{Deserialize, Serialize};

use crate::operator::status::Report;

/// The largest answer a client reads (an audit export of a long run).
pub const MAX_RESPONSE_BYTES: usize = 256 << 20;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum AdminReply {
    Status(Box<Report>),
    Report {
        json: String,
        html: String,
    },
    AuditExport {
        jsonl: String,
    },
    AuditPublicKey {
        text: String,
    },
    /// The new identity bundle, as TOML.
    Enrolled {
        identity: String,
    },
    Revoked {
        certificates: usize,
    },
    Forgotten {
        enrollments: usize,
    },
    /// A dashboard login; the token is shown once and never stored.
    DashboardLogin {
        token: String,
        expires_unix: i64,
    },
    DashboardLoggedOut {
        logins: usize,
    },
}

/// The answer on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AdminResponse {
    Ok { reply: AdminReply },
    Refused { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("identity: {0}")]
    Identity(String),
    #[error("cannot reach the server at {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("the server refused: {0}")]
    Refused(String),
    #[error("the connection failed: {0}")]
    Stream(String),
    #[error("the server's answer is not valid: {0}")]
    Malformed(String),
}

/// One request over a fresh connection, with the identity's certificate.
pub async fn call(
    identity: &IdentityBundle,
    request: &AdminRequest,
) -> Result<AdminReply, AdminClientError> {
    let config =
        covey_client::session::client_config_for(identity, Duration::from_secs(30), ADMIN_ALPN)
            .map_err(|e| AdminClientError::Identity(e.to_string()))?;
    let addr: SocketAddr = tokio::net::lookup_host(&identity.server_addr)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| AdminClientError::Connect {
            addr: identity.server_addr.clone(),
            detail: "cannot resolve the address".into(),
        })?;
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0"
            .parse()
            .map_err(|_| AdminClientError::Identity("bind".into()))?
    } else {
        "0.0.0.0:0"
            .parse()
            .map_err(|_| AdminClientError::Identity("bind".into()))?
    };
    let connect_err = |detail: String| AdminClientError::Connect {
        addr: identity.server_addr.clone(),
        detail,
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| connect_err(e.to_string()))?;
    endpoint.set_default_client_config(config);
    let conn = endpoint
        .connect(addr, &identity.server_name)
        .map_err(|e| connect_err(e.to_string()))?
        .await
        .map_err(|e| match e {
            quinn::ConnectionError::ApplicationClosed(c) => {
                AdminClientError::Refused(String::from_utf8_lossy(&c.reason).into_owned())
            }
            other => connect_err(other.to_string()),
        })?;
    // The server may close the connection with its reason at any step.
    let stream = |e: &dyn fmt::Display| match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            AdminClientError::Refused(String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => AdminClientError::Stream(e.to_string()),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| stream(&e))?;
    let body = serde_json::to_vec(request).map_err(|e| stream(&e))?;
    send.write_all(&body).await.map_err(|e| stream(&e))?;
    send.finish().map_err(|e| stream(&e))?;
    let answer = recv
        .read_to_end(MAX_RESPONSE_BYTES)
        .await
        .map_err(|e| stream(&e))?;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    match serde_json::from_slice(&answer).map_err(|e| AdminClientError::Malformed(e.to_string()))? {
        AdminResponse::Ok { reply } => Ok(reply),
        AdminResponse::Refused { reason } => Err(AdminClientError::Refused(reason)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_nest_and_devices_have_no_api() {
        let read = AdminRequest::Report;
        let enroll = AdminRequest::Enroll {
            name: "d".into(),
            days: 1,
            role: Role::Device,
        };
        let grant = AdminRequest::Enroll {
            name: "a".into(),
            days: 1,
            role: Role::Auditor,
        };
        let revoke = AdminRequest::Revoke { name: "d".into() };
        let forget = AdminRequest::Forget { name: "d".into() };
        for r in [&read, &enroll, &grant, &revoke, &forget] {
            assert!(Role::Device.may(r).is_err());
            assert!(Role::Admin.may(r).is_ok());
        }
        assert!(Role::Auditor.may(&read).is_ok());
        let denied = Role::Auditor.may(&revoke).unwrap_err();
        assert_eq!(denied.needed, Role::Operator);
        assert!(denied.to_string().contains("auditor role may not revoke"));
        assert!(Role::Operator.may(&enroll).is_ok());
        assert!(Role::Operator.may(&revoke).is_ok());
        assert!(Role::Operator.may(&grant).is_err());
        assert!(Role::Operator.may(&forget).is_err());
    }

    #[test]
    fn requests_are_strict_json() {
        let r: AdminRequest = serde_json::from_str(r#"{"request":"revoke","name":"x"}"#).unwrap();
        assert_eq!(r, AdminRequest::Revoke { name: "x".into() });
        assert!(serde_json::from_str::<AdminRequest>(r#"{"request":"drop_tables"}"#).is_err());
        let smuggled = r#"{"request":"revoke","name":"x","as":"root"}"#;
        assert!(serde_json::from_str::<AdminRequest>(smuggled).is_err());
        assert_eq!("admin".parse::<Role>().unwrap(), Role::Admin);
        assert!("root".parse::<Role>().is_err());
    }
}
