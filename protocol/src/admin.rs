//! The operator API's requests (ALPN `covey-admin/1`): one JSON document
//! per stream, and the role a certificate needs to make each one. The
//! answers carry server state and live with the server.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// The largest request a server reads; requests are a few hundred bytes.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// What a certificate is for. Devices train; the others use the API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    #[default]
    Device,
    /// Reads status, reports and the audit trail; changes nothing.
    Auditor,
    /// Also enrolls devices and revokes them.
    Operator,
    /// Also grants roles and erases enrollments.
    Admin,
}

impl Role {
    /// Whether this role may make `request`.
    pub fn may(self, request: &AdminRequest) -> Result<(), Denied> {
        let needed = match request {
            AdminRequest::Status
            | AdminRequest::Report
            | AdminRequest::AuditExport
            | AdminRequest::AuditPublicKey
            | AdminRequest::DashboardLogin { .. }
            | AdminRequest::DashboardLogout => Role::Auditor,
            AdminRequest::Enroll {
                role: Role::Device, ..
            }
            | AdminRequest::Revoke { .. } => Role::Operator,
            AdminRequest::Enroll { .. } | AdminRequest::Forget { .. } => Role::Admin,
        };
        if self.rank() >= needed.rank() && self != Role::Device {
            Ok(())
        } else {
            Err(Denied {
                role: self,
                action: request.action(),
                needed,
            })
        }
    }

    fn rank(self) -> u8 {
        match self {
            Self::Device => 0,
            Self::Auditor => 1,
            Self::Operator => 2,
            Self::Admin => 3,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Device => "device",
            Self::Auditor => "auditor",
            Self::Operator => "operator",
            Self::Admin => "admin",
        })
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "device" => Ok(Self::Device),
            "auditor" => Ok(Self::Auditor),
            "operator" => Ok(Self::Operator),
            "admin" => Ok(Self::Admin),
            other => Err(format!(
                "unknown role {other:?}: expected device, auditor, operator or admin"
            )),
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the {role} role may not {action}; it needs the {needed} role")]
pub struct Denied {
    pub role: Role,
    pub action: &'static str,
    pub needed: Role,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    Status,
    Report,
    AuditExport,
    AuditPublicKey,
    /// Issue an identity with `role` (devices: operators; others: admins).
    Enroll {
        name: String,
        days: u64,
        role: Role,
    },
    Revoke {
        name: String,
    },
    Forget {
        name: String,
    },
    /// Issue a login for the web dashboard, in the caller's own role,
    /// valid for `hours`.
    DashboardLogin {
        hours: u64,
    },
    /// Revoke every dashboard login the caller was issued.
    DashboardLogout,
}

impl AdminRequest {
    /// The request's name in the audit trail; never its arguments.
    pub fn action(&self) -> &'static str {
        match self {
            Self::Status => "read status",
            Self::Report => "read the compliance report",
            Self::AuditExport => "export the audit trail",
            Self::AuditPublicKey => "read the audit public key",
            Self::Enroll {
                role: Role::Device, ..
            } => "enroll a device",
            Self::Enroll { .. } => "grant a role",
            Self::Revoke { .. } => "revoke an enrollment",
            Self::Forget { .. } => "erase an enrollment",
            Self::DashboardLogin { .. } => "issue a dashboard login",
            Self::DashboardLogout => "revoke own dashboard logins",
        }
    }
}
