//! API authentication: bearer tokens for two roles, admin and readonly.
//!
//! Tokens are random; the store keeps only their SHA-256 hashes (system keys
//! `auth/<role>-token-sha256`). On the first start against a store, global makes both tokens
//! and writes them to `<data-dir>/<role>-token` (mode 0600) for the operator.
//! `weft-global token rotate` replaces one; running replicas pick the new hash up within
//! [`REFRESH_INTERVAL`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use clap::ValueEnum;
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use weft_core::store::Store;

/// How often each replica re-reads the token hashes from the store.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Admin,
    Readonly,
}

impl Role {
    pub const ALL: [Role; 2] = [Role::Admin, Role::Readonly];

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Readonly => "readonly",
        }
    }

    fn key(self) -> String {
        format!("auth/{}-token-sha256", self.name())
    }

    pub fn can_write(self) -> bool {
        self == Role::Admin
    }
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn new_token(role: Role) -> String {
    format!(
        "weft-{}-{}",
        role.name(),
        hex::encode(rand::rng().random::<[u8; 24]>())
    )
}

/// Where a role's token file lives.
pub fn token_path(data_dir: &Path, role: Role) -> PathBuf {
    data_dir.join(format!("{}-token", role.name()))
}

#[derive(Clone)]
pub struct Auth {
    store: Arc<dyn Store>,
    /// (role, hash) pairs currently accepted.
    hashes: Arc<RwLock<Vec<(Role, String)>>>,
}

impl Auth {
    /// Load the token hashes, making the tokens on the first start.
    pub async fn bootstrap(store: Arc<dyn Store>, data_dir: &Path) -> anyhow::Result<Auth> {
        for role in Role::ALL {
            if store.system_get(&role.key()).await?.is_some() {
                continue;
            }
            let token = new_token(role);
            let h = hash(&token);
            // Several replicas may start at once: only the one whose hash was stored writes.
            if store.system_init(&role.key(), &h).await? == h {
                let path = token_path(data_dir, role);
                write_secret(&path, &token)?;
                tracing::info!(role = role.name(), path = %path.display(), "created API token; weftctl config control-planes add --token-file {}", path.display());
            }
        }
        let auth = Auth {
            store,
            hashes: Arc::default(),
        };
        auth.refresh().await?;
        Ok(auth)
    }

    /// Re-read the hashes from the store.
    pub async fn refresh(&self) -> anyhow::Result<()> {
        let mut fresh = Vec::new();
        for role in Role::ALL {
            if let Some(h) = self.store.system_get(&role.key()).await? {
                fresh.push((role, h));
            }
        }
        *self.hashes.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    pub async fn refresh_loop(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REFRESH_INTERVAL) => {}
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "refreshing API token hashes failed; keeping the last ones");
            }
        }
    }

    /// The role of a presented bearer token, if any.
    pub fn check(&self, token: &str) -> Option<Role> {
        let h = hash(token);
        let hashes = self.hashes.read().unwrap_or_else(|e| e.into_inner());
        hashes
            .iter()
            .find(|(_, stored)| constant_time_eq(stored.as_bytes(), h.as_bytes()))
            .map(|(r, _)| *r)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Replace a role's token in the store; returns the new token.
pub async fn rotate(store: &dyn Store, role: Role) -> anyhow::Result<String> {
    let token = new_token(role);
    store.system_set(&role.key(), &hash(&token)).await?;
    Ok(token)
}

/// Write a secret file readable only by its owner.
pub fn write_secret(path: &Path, contents: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        #[cfg(unix)]
        use std::os::unix::fs::OpenOptionsExt;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        opts.mode(0o600);
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(contents.as_bytes())?;
        f.write_all(b"\n")?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_start_makes_tokens_once_and_rotation_replaces_them() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(weft_core::store::Memory::new());
        let auth = Auth::bootstrap(store.clone(), dir.path()).await.unwrap();
        let admin = std::fs::read_to_string(token_path(dir.path(), Role::Admin)).unwrap();
        let ro = std::fs::read_to_string(token_path(dir.path(), Role::Readonly)).unwrap();
        assert_eq!(auth.check(admin.trim()), Some(Role::Admin));
        assert_eq!(auth.check(ro.trim()), Some(Role::Readonly));
        assert_eq!(auth.check("weft-admin-nope"), None);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(token_path(dir.path(), Role::Admin))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A second start on the same store keeps the tokens and does not rewrite the files.
        let dir2 = tempfile::tempdir().unwrap();
        let again = Auth::bootstrap(store.clone(), dir2.path()).await.unwrap();
        assert_eq!(again.check(admin.trim()), Some(Role::Admin));
        assert!(!token_path(dir2.path(), Role::Admin).exists());
        let new = rotate(&*store, Role::Admin).await.unwrap();
        auth.refresh().await.unwrap();
        assert_eq!(auth.check(&new), Some(Role::Admin));
        assert_eq!(auth.check(admin.trim()), None);
    }
}
