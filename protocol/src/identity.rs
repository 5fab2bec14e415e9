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
    /// When the certificate was issued and when it expires (unix seconds);
    /// the device renews it once two thirds of its life have passed.
    #[serde(default)]
    pub issued_unix: Option<i64>,
    #[serde(default)]
    pub not_after_unix: Option<i64>,
}

/// Domain separation for the proof that a renewing device holds its new key.
const RENEWAL_CONTEXT: &[u8] = b"covey certificate renewal v1\0";

/// What a renewing device signs with its new key: bound to the certificate
/// it renews, so the proof cannot be replayed for another device.
pub fn renewal_message(current_cert_der: &[u8]) -> Vec<u8> {
    let digest = ring::digest::digest(&ring::digest::SHA256, current_cert_der);
    [RENEWAL_CONTEXT, digest.as_ref()].concat()
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
    /// Whether two thirds of the certificate's life have passed at `now`.
    pub fn renewal_due(&self, now_unix: i64) -> bool {
        match (self.issued_unix, self.not_after_unix) {
            (Some(issued), Some(not_after)) if not_after > issued => {
                now_unix >= issued + (not_after - issued) * 2 / 3
            }
            _ => false,
        }
    }

    /// Writes the bundle to `path` whole (temporary file, then rename),
    /// readable by its owner only.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("renewing");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        std::io::Write::write_all(&mut options.open(&tmp)?, self.to_toml().as_bytes())?;
        std::fs::rename(&tmp, path)
    }

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
            issued_unix: Some(1_000),
            not_after_unix: Some(4_000),
        };
        assert_eq!(IdentityBundle::parse(&b.to_toml()).unwrap(), b);
        // Bundles from before renewal (no dates) still load, and never renew.
        let old = b
            .to_toml()
            .replace("issued_unix = 1000\n", "")
            .replace("not_after_unix = 4000\n", "");
        let old = IdentityBundle::parse(&old).unwrap();
        assert_eq!(old.not_after_unix, None);
        assert!(!old.renewal_due(i64::MAX));
        // Renewal comes due at two thirds of the certificate's life.
        assert!(!b.renewal_due(2_999));
        assert!(b.renewal_due(3_000));
        assert_ne!(renewal_message(b"a"), renewal_message(b"b"));
        let broken = b.to_toml().replace("BEGIN PRIVATE KEY", "nothing");
        assert_eq!(
            IdentityBundle::parse(&broken).unwrap_err(),
            "key_pem holds no PEM block"
        );
        assert!(!format!("{b:?}").contains("CC"));
    }
}
