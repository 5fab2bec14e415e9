//! The identity bundle a device receives at enrollment: everything it needs
//! to reach the server over mutual TLS, in one TOML file.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityBundle {
    /// `host:port` the device dials.
    pub server_addr: String,
    /// Name the server certificate must carry.
    pub server_name: String,
    /// The enrollment CA, the only root the device trusts.
    pub ca_cert_pem: String,
    /// The device's certificate, signed by the CA.
    pub cert_pem: String,
    /// The device's private key. Keep this file secret.
    pub key_pem: String,
}

impl std::fmt::Debug for IdentityBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityBundle")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read identity bundle {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("identity bundle {path} is not valid: {detail}")]
    Parse { path: String, detail: String },
}

impl IdentityBundle {
    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).unwrap_or_default();
        format!(
            "# Covey client identity. It holds a private key: keep it secret, give it to one device.\n{body}"
        )
    }

    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|detail| IdentityError::Parse {
            path: path.display().to_string(),
            detail,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let bundle: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        for (field, pem) in [
            ("ca_cert_pem", &bundle.ca_cert_pem),
            ("cert_pem", &bundle.cert_pem),
            ("key_pem", &bundle.key_pem),
        ] {
            if !pem.contains("-----BEGIN ") {
                return Err(format!("{field} holds no PEM block"));
            }
        }
        Ok(bundle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_round_trip_and_bad_ones_are_named() {
        let b = IdentityBundle {
            server_addr: "127.0.0.1:7443".into(),
            server_name: "covey-server".into(),
            ca_cert_pem: "-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----\n".into(),
            cert_pem: "-----BEGIN CERTIFICATE-----\nBB\n-----END CERTIFICATE-----\n".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----\nCC\n-----END PRIVATE KEY-----\n".into(),
        };
        assert_eq!(IdentityBundle::parse(&b.to_toml()).unwrap(), b);
        let broken = b.to_toml().replace("BEGIN PRIVATE KEY", "nothing");
        assert_eq!(
            IdentityBundle::parse(&broken).unwrap_err(),
            "key_pem holds no PEM block"
        );
        assert!(!format!("{b:?}").contains("CC"));
    }
}
