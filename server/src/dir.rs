//! The state directory an operator points every command at.
//!
//! ```text
//! D/config.toml    settings, documented
//! D/ca.pem         enrollment CA certificate (public)
//! D/ca.key         enrollment CA key (0600)
//! D/server.pem     server certificate (public)
//! D/server.key     server key (0600)
//! D/db/            sled database
//! D/status.json    snapshot written by a running server for `status`
//! ```

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use covey_protocol::{SERVER_NAME, identity::IdentityBundle};

use crate::{
    config::{ConfigError, ServerConfig},
    pki::{self, Issued, PkiError},
    store::{Enrollment, Store, StoreError},
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
    #[error(
        "enrollment name must be 1 to 64 characters of letters, digits, '-', '_' or '.', got {0:?}"
    )]
    BadName(String),
    #[error("a client named '{0}' is already enrolled; revoke it first")]
    AlreadyEnrolled(String),
    #[error("no active enrollment named '{0}'")]
    NotEnrolled(String),
}

pub struct StateDir {
    root: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DirError + '_ {
    move |source| DirError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), DirError> {
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

fn read_file(path: &Path) -> Result<String, DirError> {
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

    pub fn status_path(&self) -> PathBuf {
        self.root.join("status.json")
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
        if self.config_path().exists() || self.db_path().exists() {
            return Err(DirError::Exists(self.root.display().to_string()));
        }
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
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
        let store = Store::open(&self.db_path())?;
        let secret: [u8; 32] = rand::random();
        let weights = settings.spec.initial_weights(config.model.init_seed);
        store.initialise(settings.spec, weights, &secret)?;
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

    pub fn open_store(&self) -> Result<Store, DirError> {
        if !self.config_path().exists() {
            return Err(StoreError::NotInitialised("config.toml").into());
        }
        Ok(Store::open(&self.db_path())?)
    }

    pub fn ca_cert_pem(&self) -> Result<String, DirError> {
        read_file(&self.ca_cert_path())
    }

    pub fn server_identity(&self) -> Result<Issued, DirError> {
        Ok(Issued {
            cert_pem: read_file(&self.root.join("server.pem"))?,
            key_pem: read_file(&self.root.join("server.key"))?,
            cert_der: Vec::new(),
            not_after_unix: 0,
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
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            return Err(DirError::BadName(name.to_owned()));
        }
        if store
            .enrollments()?
            .iter()
            .any(|e| e.name == name && e.revoked_unix.is_none())
        {
            return Err(DirError::AlreadyEnrolled(name.to_owned()));
        }
        let config = self.config()?;
        let ca_key = read_file(&self.ca_key_path())?;
        let issued = pki::issue_client_cert(&ca_key, name, lifetime)?;
        let key = covey_privacy::PseudonymKey::from_bytes(&store.pseudonym_key()?)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        store.enroll(&Enrollment {
            name: name.to_owned(),
            pseudonym: key.pseudonym_of(&issued.cert_der),
            enrolled_unix: now,
            not_after_unix: issued.not_after_unix,
            revoked_unix: None,
        })?;
        Ok(IdentityBundle {
            server_addr: server_addr
                .map(str::to_owned)
                .unwrap_or(config.server.public_addr),
            server_name: SERVER_NAME.to_owned(),
            ca_cert_pem: self.ca_cert_pem()?,
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
        })
    }

    pub fn revoke(&self, store: &Store, name: &str) -> Result<usize, DirError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        match store.revoke(name, now)? {
            0 => Err(DirError::NotEnrolled(name.to_owned())),
            n => Ok(n),
        }
    }
}
