//! Keyed pseudonyms: the only name under which a client appears in logs,
//! stored records and reports.

use std::fmt;

use ring::hmac;
use serde::{Deserialize, Serialize};

/// Length of the secret that keys pseudonyms, in bytes.
pub const KEY_LEN: usize = 32;

/// A server secret that turns certificate fingerprints into pseudonyms.
///
/// Without it, a pseudonym cannot be linked back to a certificate, even by
/// someone who holds every certificate the CA ever issued.
pub struct PseudonymKey(hmac::Key);

#[derive(Debug, thiserror::Error)]
pub enum PseudonymKeyError {
    #[error("pseudonym key must be {KEY_LEN} bytes, got {0}")]
    WrongLength(usize),
}

impl PseudonymKey {
    pub fn from_bytes(secret: &[u8]) -> Result<Self, PseudonymKeyError> {
        if secret.len() != KEY_LEN {
            return Err(PseudonymKeyError::WrongLength(secret.len()));
        }
        Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, secret)))
    }

    /// HMAC-SHA256 of the certificate (DER), truncated to 64 bits.
    pub fn pseudonym_of(&self, certificate_der: &[u8]) -> Pseudonym {
        let tag = hmac::sign(&self.0, certificate_der);
        let mut short = [0u8; 8];
        short.copy_from_slice(&tag.as_ref()[..8]);
        Pseudonym(short)
    }
}

impl fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PseudonymKey(..)")
    }
}

/// A client's stable, non-identifying name: 64 bits of a keyed hash.
///
/// 64 bits keep collisions negligible for any realistic population
/// (under 1e-7 for a million clients) while staying short in logs.
///
/// Text formats (JSON, TOML) carry the `c-…` form; binary formats the bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pseudonym([u8; 8]);

impl Serialize for Pseudonym {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for Pseudonym {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            Self::parse(&text).ok_or_else(|| {
                serde::de::Error::custom(format!("`{text}` is not a pseudonym (c-<16 hex digits>)"))
            })
        } else {
            <[u8; 8]>::deserialize(deserializer).map(Self)
        }
    }
}

impl Pseudonym {
    pub fn from_bytes(bytes: [u8; 8]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 8] {
        &self.0
    }

    /// Parses the `c-<16 hex digits>` form that `Display` prints.
    pub fn parse(text: &str) -> Option<Self> {
        let hex_part = text.strip_prefix("c-")?;
        let bytes = hex::decode(hex_part).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Display for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c-{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_certificate_same_pseudonym_and_key_matters() {
        let a = PseudonymKey::from_bytes(&[1; 32]).unwrap();
        let b = PseudonymKey::from_bytes(&[2; 32]).unwrap();
        assert_eq!(a.pseudonym_of(b"cert"), a.pseudonym_of(b"cert"));
        assert_ne!(a.pseudonym_of(b"cert"), a.pseudonym_of(b"cert2"));
        assert_ne!(a.pseudonym_of(b"cert"), b.pseudonym_of(b"cert"));
    }

    #[test]
    fn display_round_trips_and_bad_text_is_refused() {
        let key = PseudonymKey::from_bytes(&[7; 32]).unwrap();
        let p = key.pseudonym_of(b"x");
        let shown = p.to_string();
        assert_eq!(shown.len(), 18);
        assert_eq!(Pseudonym::parse(&shown), Some(p));
        assert_eq!(Pseudonym::parse("c-zz"), None);
        assert_eq!(Pseudonym::parse("0011223344556677"), None);
    }

    #[test]
    fn serde_is_text_in_json_and_bytes_in_postcard() {
        let p = Pseudonym::from_bytes([1, 2, 3, 4, 5, 6, 7, 8]);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, "\"c-0102030405060708\"");
        assert_eq!(serde_json::from_str::<Pseudonym>(&json).unwrap(), p);
        assert!(serde_json::from_str::<Pseudonym>("\"alice\"").is_err());
        let bytes = postcard::to_stdvec(&p).unwrap();
        assert_eq!(bytes, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(postcard::from_bytes::<Pseudonym>(&bytes).unwrap(), p);
    }

    #[test]
    fn wrong_key_length_is_refused() {
        assert!(matches!(
            PseudonymKey::from_bytes(&[0; 16]),
            Err(PseudonymKeyError::WrongLength(16))
        ));
    }
}
