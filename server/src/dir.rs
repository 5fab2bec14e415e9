//! The state directory an operator points every command at.
//!
//! ```text
//! D/config.toml    settings, documented
//! D/ca.pem         enrollment CA certificate (public)
//! D/ca.key         enrollment CA key (0600)
//! D/server.pem     server certificate (public)
//! D/server.key     server key (0600)
//! D/db/            sled database
//! D/kek.key        default key-encryption key for the database (0600)
//! D/audit.pub      the audit trail's public key (public)
//! D/status.json    snapshot written by a running server for `status`
//! D/control/       requests for a running server, and its answers
//! ```

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use covey_privacy::Pseudonym;
use covey_protocol::{
    SERVER_NAME, admin::Role, identity::IdentityBundle, message::RenewedCertificate,
};

use crate::{
    admission::pki::{self, PkiError, ServerIdentity},
    config::{ConfigError, ServerConfig},
    state::store::{Enrollment, Store, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} already holds a covey-server state directory; refusing to overwrite it")]
    Exists(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Seal(#[from] crate::state::sealing::SealError),
    #[error(
        "enrollment name must be 1 to 64 characters of letters, digits, '-', '_' or '.', got {0:?}"
    )]
    BadName(String),
    #[error("a client named '{0}' is already enrolled; revoke it first")]
    AlreadyEnrolled(String),
    #[error("no active enrollment named '{0}'")]
    NotEnrolled(String),
    #[error("no enrollment named '{0}' (already forgotten, or never enrolled)")]
    NeverEnrolled(String),
    #[error(transparent)]
    Asset(#[from] covey_client::assets::AssetError),
    #[error("version 0 has {got} values; the {spec} model needs {expected}")]
    InitialWeights {
        spec: String,
        expected: usize,
        got: usize,
    },
}

/// One live certificate per name. An expired or revoked one does not
/// count, so a device re-enrolls under the same CA and name.
pub(crate) fn refuse_duplicate(store: &Store, name: &str) -> Result<(), DirError> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if store
        .enrollments()?
        .iter()
        .any(|e| e.name == name && e.revoked_unix.is_none() && e.not_after_unix > now)
    {
        return Err(DirError::AlreadyEnrolled(name.to_owned()));
    }
    Ok(())
}

/// Records a signed certificate in the registry under its pseudonym.
pub(crate) fn register(
    store: &Store,
    name: &str,
    cert_pem: &str,
    not_after_unix: i64,
    role: Role,
) -> Result<Pseudonym, DirError> {
    let der = pki::parse_cert(cert_pem, "device certificate")?;
    let key = covey_privacy::PseudonymKey::from_bytes(&store.pseudonym_key()?)
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let pseudonym = key.pseudonym_of(&der);
    store.enroll(&Enrollment {
        name: name.to_owned(),
        pseudonym,
        role,
        enrolled_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
        not_after_unix,
        revoked_unix: None,
    })?;
    Ok(pseudonym)
}

pub(crate) fn check_name(name: &str) -> Result<(), DirError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(DirError::BadName(name.to_owned()))
    }
}

pub struct StateDir {
    root: PathBuf,
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DirError + '_ {
    move |source| DirError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub(crate) fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), DirError> {
    fs::write(path, contents).map_err(io_err(path))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err(path))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    Ok(())
}

/// Writes `path` through a temporary file and a rename, so a crash leaves
/// either the old contents or the new, never half of each.
pub(crate) fn replace_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), DirError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    write_file(&tmp, contents, secret)?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

pub(crate) fn read_file(path: &Path) -> Result<String, DirError> {
    fs::read_to_string(path).map_err(io_err(path))
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    pub fn db_path(&self) -> PathBuf {
        self.root.join("db")
    }

    /// Where the files devices fetch by hash live (a LoRA base, a
    /// tokenizer.json).
    pub fn assets_dir(&self) -> PathBuf {
        self.root.join("assets")
    }

    pub fn assets(&self) -> Result<covey_client::assets::AssetCache, DirError> {
        Ok(covey_client::assets::AssetCache::new(self.assets_dir())?)
    }

    /// Refuses a directory that already holds a state directory.
    pub fn check_new(&self) -> Result<(), DirError> {
        if self.config_path().exists() || self.db_path().exists() {
            return Err(DirError::Exists(self.root.display().to_string()));
        }
        Ok(())
    }

    pub fn status_path(&self) -> PathBuf {
        self.root.join("status.json")
    }

    /// Requests for a running server, which holds the database locked.
    pub fn control_path(&self) -> PathBuf {
        self.root.join("control")
    }

    fn ca_cert_path(&self) -> PathBuf {
        self.root.join("ca.pem")
    }

    fn ca_key_path(&self) -> PathBuf {
        self.root.join("ca.key")
    }

    /// Creates the directory: config, CA, server certificate, database with
    /// the initial model (version 0) and a fresh pseudonym secret.
    pub fn init(&self, config: &ServerConfig) -> Result<(), DirError> {
        let settings = config.settings()?;
        let weights = settings.spec.initial_weights(config.model.init_seed);
        self.init_with(config, weights, &[])
    }

    /// Creates the directory with `weights` as version 0 and `assets`
    /// (files the devices fetch) in its asset store; files already under
    /// [`Self::assets_dir`] are moved, others copied.
    pub fn init_with(
        &self,
        config: &ServerConfig,
        weights: Vec<f32>,
        assets: &[PathBuf],
    ) -> Result<(), DirError> {
        let settings = config.settings()?;
        self.check_new()?;
        if weights.len() != settings.spec.param_count() {
            return Err(DirError::InitialWeights {
                spec: settings.spec.to_string(),
                expected: settings.spec.param_count(),
                got: weights.len(),
            });
        }
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        crate::state::model::store_assets(&self.assets()?, assets, &self.assets_dir())?;
        let ca = pki::create_ca()?;
        let server = pki::issue_server_cert(&ca.key_pem)?;
        write_file(&self.ca_cert_path(), ca.cert_pem.as_bytes(), false)?;
        write_file(&self.ca_key_path(), ca.key_pem.as_bytes(), true)?;
        write_file(
            &self.root.join("server.pem"),
            server.cert_pem.as_bytes(),
            false,
        )?;
        write_file(
            &self.root.join("server.key"),
            server.key_pem.as_bytes(),
            true,
        )?;
        let kek = config.storage.kek_source()?;
        kek.create_if_missing(&self.root)?;
        let store = Store::open(&self.db_path(), &kek.load(&self.root)?)?;
        let secret: [u8; 32] = rand::random();
        store.initialise(&settings.spec, weights, &secret)?;
        self.publish_audit_key(&store)?;
        // The config goes last: its presence marks a complete directory.
        write_file(
            &self.config_path(),
            config.to_documented_toml().as_bytes(),
            false,
        )?;
        Ok(())
    }

    pub fn config(&self) -> Result<ServerConfig, DirError> {
        Ok(ServerConfig::load(&self.config_path())?)
    }

    /// Replaces config.toml with `config`, documented, once it checks out;
    /// a refused or interrupted write leaves the old file in place.
    pub fn replace_config(&self, config: &ServerConfig) -> Result<(), DirError> {
        config.settings()?;
        replace_file(
            &self.config_path(),
            config.to_documented_toml().as_bytes(),
            false,
        )
    }

    pub fn open_store(&self) -> Result<Store, DirError> {
        if !self.config_path().exists() {
            return Err(StoreError::NotInitialised("config.toml").into());
        }
        let kek = self.config()?.storage.kek_source()?.load(&self.root)?;
        Ok(Store::open(&self.db_path(), &kek)?)
    }

    pub fn ca_cert_pem(&self) -> Result<String, DirError> {
        read_file(&self.ca_cert_path())
    }

    pub fn server_identity(&self) -> Result<ServerIdentity, DirError> {
        Ok(ServerIdentity {
            cert_pem: read_file(&self.root.join("server.pem"))?,
            key_pem: read_file(&self.root.join("server.key"))?,
        })
    }

    /// Issues a device identity and registers it under its pseudonym.
    pub fn enroll(
        &self,
        store: &Store,
        name: &str,
        lifetime: Duration,
        server_addr: Option<&str>,
    ) -> Result<IdentityBundle, DirError> {
        self.enroll_as(store, name, lifetime, server_addr, Role::Device)
            .map(|(bundle, _)| bundle)
    }

    /// Issues an identity with `role` and registers it; returns the bundle
    /// and its pseudonym.
    pub fn enroll_as(
        &self,
        store: &Store,
        name: &str,
        lifetime: Duration,
        server_addr: Option<&str>,
        role: Role,
    ) -> Result<(IdentityBundle, Pseudonym), DirError> {
        check_name(name)?;
        refuse_duplicate(store, name)?;
        let (bundle, not_after_unix) = self.issue_identity(name, lifetime, server_addr)?;
        let pseudonym = register(store, name, &bundle.cert_pem, not_after_unix, role)?;
        Ok((bundle, pseudonym))
    }

    /// Signs a device certificate without touching the database (the CA
    /// key is a file); returns the bundle and the certificate's expiry.
    pub fn issue_identity(
        &self,
        name: &str,
        lifetime: Duration,
        server_addr: Option<&str>,
    ) -> Result<(IdentityBundle, i64), DirError> {
        check_name(name)?;
        let config = self.config()?;
        let ca_key = read_file(&self.ca_key_path())?;
        let issued = pki::issue_client_cert(&ca_key, name, lifetime)?;
        let bundle = IdentityBundle {
            server_addr: server_addr
                .map(str::to_owned)
                .unwrap_or(config.server.public_addr),
            server_name: SERVER_NAME.to_owned(),
            ca_cert_pem: self.ca_cert_pem()?,
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
            issued_unix: Some(time::OffsetDateTime::now_utc().unix_timestamp()),
            not_after_unix: Some(issued.not_after_unix),
        };
        Ok((bundle, issued.not_after_unix))
    }

    /// Renews the live enrollment `current` onto the device's new P-256
    /// key, for the same lifetime, name and role. The old certificate stays
    /// valid until it expires, so a device that lost the answer can retry.
    /// Returns the new certificate and its pseudonym.
    pub fn renew(
        &self,
        store: &Store,
        current: &Enrollment,
        public_key: &[u8],
    ) -> Result<(RenewedCertificate, Pseudonym), DirError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let lifetime = (current.not_after_unix - current.enrolled_unix).max(60) as u64;
        let ca_key = read_file(&self.ca_key_path())?;
        let (cert_pem, _, not_after_unix) = pki::issue_client_cert_for(
            &ca_key,
            &current.name,
            public_key,
            Duration::from_secs(lifetime),
        )?;
        let pseudonym = register(
            store,
            &current.name,
            &cert_pem,
            not_after_unix,
            current.role,
        )?;
        store.audit([crate::state::audit::AuditEvent::Renewed {
            from: current.pseudonym,
            to: pseudonym,
            not_after_unix,
        }])?;
        Ok((
            RenewedCertificate {
                cert_pem,
                issued_unix: now,
                not_after_unix,
            },
            pseudonym,
        ))
    }

    /// Re-wraps the data key under the KEK `to` (`file:` or `env:`), then
    /// points config.toml at it.
    pub fn rotate_kek(&self, store: &Store, to: &str) -> Result<(), DirError> {
        let source =
            crate::state::sealing::KekSource::parse(to).map_err(|e| ConfigError::Invalid {
                setting: "--to",
                problem: e,
            })?;
        source.create_if_missing(&self.root)?;
        let new = source.load(&self.root)?;
        let path = self.config_path();
        let text = read_file(&path)?;
        let line = format!("kek = \"{to}\"");
        let mut replaced = false;
        let mut lines: Vec<String> = text
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("kek =") || l.trim_start().starts_with("kek=") {
                    replaced = true;
                    line.clone()
                } else {
                    l.to_owned()
                }
            })
            .collect();
        if !replaced {
            lines.extend(["".into(), "[storage]".into(), line]);
        }
        let updated = lines.join("\n") + "\n";
        let parsed: ServerConfig =
            toml::from_str(&updated).map_err(|source| ConfigError::Parse {
                path: path.display().to_string(),
                source: Box::new(source),
            })?;
        parsed.settings()?;
        // The database first: if the config write fails, the error names
        // the new key, which the operator then sets by hand.
        store.rotate_kek(&new)?;
        replace_file(&path, updated.as_bytes(), false)
    }

    /// Where the audit public key is published.
    pub fn audit_public_key_path(&self) -> PathBuf {
        self.root.join("audit.pub")
    }

    /// Publishes the store's audit public key next to the CA certificate,
    /// so it can be read while a running server holds the database.
    pub fn publish_audit_key(&self, store: &Store) -> Result<(), DirError> {
        let text = store.audit_public_key()?;
        let path = self.audit_public_key_path();
        if fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            write_file(&path, text.as_bytes(), false)?;
        }
        Ok(())
    }

    /// SHA-256 of `config.toml` as written, for the audit trail.
    pub fn config_sha256(&self) -> Result<String, DirError> {
        let path = self.config_path();
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        Ok(hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            &bytes,
        )))
    }

    /// Exports the audit trail to `out` (written whole, then renamed into
    /// place); returns the number of entries.
    pub fn export_audit(&self, store: &Store, out: &Path) -> Result<u64, DirError> {
        let tmp = out.with_extension("partial");
        let file = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        let mut writer = std::io::BufWriter::new(file);
        let entries = store.export_audit(&mut writer)?;
        drop(writer);
        fs::rename(&tmp, out).map_err(io_err(out))?;
        Ok(entries)
    }

    pub fn revoke(&self, store: &Store, name: &str) -> Result<Vec<Pseudonym>, DirError> {
        check_name(name)?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let revoked = store.revoke(name, now)?;
        if revoked.is_empty() {
            return Err(DirError::NotEnrolled(name.to_owned()));
        }
        Ok(revoked)
    }

    pub fn forget(&self, store: &Store, name: &str) -> Result<Vec<Pseudonym>, DirError> {
        check_name(name)?;
        let forgotten = store.forget(name)?;
        if forgotten.is_empty() {
            return Err(DirError::NeverEnrolled(name.to_owned()));
        }
        Ok(forgotten)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_config_is_read_back_and_a_bad_one_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let mut config = ServerConfig::default();
        config.rounds.rounds = 5;
        state.init(&config).unwrap();

        config.rounds.rounds = 9;
        state.replace_config(&config).unwrap();
        assert_eq!(state.config().unwrap(), config);

        let before = fs::read(state.config_path()).unwrap();
        let mut bad = config.clone();
        bad.rounds.clients_per_round = 0;
        let err = state.replace_config(&bad).unwrap_err().to_string();
        assert!(err.contains("clients_per_round"), "{err}");
        assert_eq!(fs::read(state.config_path()).unwrap(), before);
        let leftovers: Vec<_> = fs::read_dir(state.root())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
