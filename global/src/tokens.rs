//! Zone tokens on global: the signing key, issuing, revocation, and the `/_tokens` API.
//!
//! The Ed25519 signing key is made on the first start and kept in the store (system key
//! `kds/signing-key`, base64 PKCS#8), so every replica signs and verifies with the same key.
//! Revocations are an append-only log in the store: entry `n` is the system key
//! `kds/revoked/<n>`, written with `system_init`, so concurrent revokes through different
//! replicas never overwrite each other (the loser of a slot takes the next one). Each replica
//! caches the log; [`Tokens::verify`] first reads the slot after the last one it knows (one
//! store read), so a revocation made through any replica is seen by the next check.
//! The token format itself is `weft_core::token`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use weft_core::Invalid;
use weft_core::store::{self, Store};
use weft_core::token::{self, Claims, Scope, SigningKey, VerifyingKey};

use crate::api::{ApiError, State};

/// System key of the signing key (base64 of the PKCS#8 DER).
pub const SIGNING_KEY: &str = "kds/signing-key";
/// Prefix of the revocation log's entries: `kds/revoked/0`, `kds/revoked/1`, ...
pub const REVOKED_PREFIX: &str = "kds/revoked/";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Token(#[from] token::Error),
    #[error("zone token {jti} for zone {zone:?} was revoked at {}", rfc3339(at))]
    Revoked {
        jti: String,
        zone: String,
        at: DateTime<Utc>,
    },
    #[error(
        "invalid zone token id {0:?} (expected 32 hex digits: the id printed by `weftctl generate zone-token`)"
    )]
    InvalidId(String),
    /// Reading or writing the revocation log failed: transient unless the store says
    /// otherwise.
    #[error("zone tokens: {0}")]
    Store(#[from] store::Error),
}

impl Error {
    /// The check could not be made (the store is unreachable); retry later. Every other
    /// error is a refusal.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Store(store::Error::Backend(_)))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One revoked token id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revoked {
    pub jti: String,
    pub revoked_at: DateTime<Utc>,
}

/// What this replica knows of the revocation log.
#[derive(Default)]
struct Log {
    /// The next slot to read.
    next: u64,
    /// In log order, first revocation of each id only.
    entries: Vec<Revoked>,
    by_id: HashMap<String, DateTime<Utc>>,
}

impl Log {
    /// Add slot `slot` if it is the next one (a concurrent refresh may have added it).
    fn add(&mut self, slot: u64, raw: &str) {
        if slot != self.next {
            return;
        }
        self.next += 1;
        match serde_json::from_str::<Revoked>(raw) {
            Ok(r) => {
                if !self.by_id.contains_key(&r.jti) {
                    self.by_id.insert(r.jti.clone(), r.revoked_at);
                    self.entries.push(r);
                }
            }
            Err(e) => {
                tracing::error!(key = %slot_key(slot), error = %e, "unreadable zone token revocation; skipping it");
            }
        }
    }
}

/// `2026-11-22T10:00:00Z`.
fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn slot_key(slot: u64) -> String {
    format!("{REVOKED_PREFIX}{slot}")
}

/// Issues and checks zone tokens; shared by the API and the KDS server.
pub struct Tokens {
    store: Arc<dyn Store>,
    key: SigningKey,
    log: Mutex<Log>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Tokens {
    /// Load the signing key, making it on the first start (replicas starting at once end up
    /// with the same key), and read the revocation log.
    pub async fn bootstrap(store: Arc<dyn Store>) -> anyhow::Result<Tokens> {
        let key = match store.system_get(SIGNING_KEY).await? {
            Some(stored) => stored,
            None => {
                let fresh = B64.encode(SigningKey::generate().to_pkcs8());
                let stored = store.system_init(SIGNING_KEY, &fresh).await?;
                if stored == fresh {
                    tracing::info!("created the zone token signing key");
                }
                stored
            }
        };
        let der = B64
            .decode(key.trim())
            .with_context(|| format!("system key {SIGNING_KEY} is not base64"))?;
        let key =
            SigningKey::from_pkcs8(&der).with_context(|| format!("system key {SIGNING_KEY}"))?;
        let tokens = Tokens {
            store,
            key,
            log: Mutex::default(),
        };
        tokens.refresh().await?;
        tracing::info!(kid = %tokens.key.key_id(), "zone token signing key loaded");
        Ok(tokens)
    }

    /// The keys tokens are checked against.
    pub fn verifying_keys(&self) -> Vec<VerifyingKey> {
        vec![self.key.public()]
    }

    /// Issue a token for `zone`, valid for `valid_for` from now.
    pub fn issue(&self, zone: &str, scope: Scope, valid_for: Duration) -> Result<(String, Claims)> {
        let (token, claims) = self.key.issue(zone, scope, valid_for, SystemTime::now())?;
        tracing::info!(zone, %scope, id = %claims.jti, expires = %token::rfc3339(claims.exp), "issued zone token");
        Ok((token, claims))
    }

    /// Issue a dataplane token for dataplane `name` of `mesh` serving `service`.
    pub fn issue_dataplane(
        &self,
        mesh: &str,
        name: &str,
        service: &str,
        valid_for: Duration,
    ) -> Result<(String, token::DataplaneClaims)> {
        let (token, claims) =
            self.key
                .issue_dataplane(mesh, name, service, valid_for, SystemTime::now())?;
        tracing::info!(%mesh, dataplane = %name, %service, id = %claims.jti, expires = %token::rfc3339(claims.exp), "issued dataplane token");
        Ok((token, claims))
    }

    /// Check a presented token now: signature, expiry, zone name, and revocation (reading
    /// the store for revocations made through other replicas).
    pub async fn verify(&self, token: &str) -> Result<Claims> {
        self.verify_at(token, SystemTime::now()).await
    }

    /// [`Tokens::verify`] at a given time.
    pub async fn verify_at(&self, token: &str, now: SystemTime) -> Result<Claims> {
        let claims = token::verify(token, &self.verifying_keys(), now)?;
        self.refresh().await?;
        let revoked_at = self.lock().by_id.get(&claims.jti).copied();
        match revoked_at {
            Some(at) => Err(Error::Revoked {
                jti: claims.jti,
                zone: claims.sub,
                at,
            }),
            None => Ok(claims),
        }
    }

    /// Revoke a token id; revoking an id twice keeps the first revocation.
    pub async fn revoke(&self, jti: &str) -> Result<Revoked> {
        if !token::is_id(jti) {
            return Err(Error::InvalidId(jti.to_string()));
        }
        let entry = Revoked {
            jti: jti.to_string(),
            revoked_at: Utc::now().trunc_subsecs(0),
        };
        let raw = serde_json::to_string(&entry).expect("a revocation serializes");
        loop {
            self.refresh().await?;
            let slot = {
                let log = self.lock();
                if let Some(at) = log.by_id.get(jti) {
                    return Ok(Revoked {
                        jti: jti.to_string(),
                        revoked_at: *at,
                    });
                }
                log.next
            };
            // Whoever initializes the slot first owns it; a loser reads it and tries the next.
            let stored = self.store.system_init(&slot_key(slot), &raw).await?;
            self.lock().add(slot, &stored);
            if stored == raw {
                tracing::info!(id = jti, "revoked zone token");
                return Ok(entry);
            }
        }
    }

    /// Every revoked id, oldest first.
    pub async fn revoked(&self) -> Result<Vec<Revoked>> {
        self.refresh().await?;
        Ok(self.lock().entries.clone())
    }

    /// Read the revocation log entries written since the last read (usually one store
    /// read that finds nothing).
    pub async fn refresh(&self) -> Result<(), store::Error> {
        let mut slot = self.lock().next;
        while let Some(raw) = self.store.system_get(&slot_key(slot)).await? {
            self.lock().add(slot, &raw);
            slot += 1;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// ---------------------------------------------------------------------------------------
// API

/// `POST /_tokens/zone`, `POST /_tokens/dataplane`, `POST /_tokens/revoke`, `GET /_tokens/revoked`; mounted behind
/// authentication (writes need the admin token).
pub fn routes() -> Router<State> {
    Router::new()
        .route("/_tokens/zone", post(issue))
        .route("/_tokens/dataplane", post(issue_dataplane))
        .route("/_tokens/revoke", post(revoke))
        .route("/_tokens/revoked", get(list_revoked))
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        match e {
            Error::Store(s) => ApiError::from(s),
            Error::InvalidId(_) => ApiError::from(Invalid::one("id", e.to_string())),
            Error::Token(token::Error::Zone(m)) => ApiError::from(Invalid::one("zone", m)),
            Error::Token(token::Error::DataplaneField { field, message }) => {
                ApiError::from(Invalid::one(field, message))
            }
            Error::Token(token::Error::Validity(_)) => {
                ApiError::from(Invalid::one("validFor", e.to_string()))
            }
            other => ApiError::new(StatusCode::BAD_REQUEST, "invalid token", other.to_string()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct IssueRequest {
    #[serde(default)]
    zone: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    valid_for: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DataplaneRequest {
    #[serde(default)]
    mesh: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    service: String,
    #[serde(default)]
    valid_for: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    id: String,
}

fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::from(Invalid::one("", format!("request body is not JSON ({e})"))))?;
    Ok(weft_core::validate::from_value("", value)?)
}

/// Parse `validFor`: a Go duration of at least a second.
pub fn parse_valid_for(s: &str) -> Result<Duration, String> {
    let d = s
        .parse::<weft_core::validate::Duration>()
        .map_err(|_| format!("invalid duration {s:?} (expected e.g. 720h, 24h, 30m)"))?
        .as_std();
    if d.as_secs() == 0 {
        return Err(format!(
            "{s:?} is too short (expected at least 1s, e.g. 720h)"
        ));
    }
    Ok(d)
}

async fn issue(Extract(state): Extract<State>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: IssueRequest = json_body(&body)?;
    let mut invalid = Invalid::default();
    if let Err(m) = weft_core::validate::check_dns_label(&req.zone) {
        invalid.add("zone", m);
    }
    let scope = match req.scope.as_deref().map(str::parse::<Scope>).transpose() {
        Ok(s) => s.unwrap_or(Scope::Zone),
        Err(m) => {
            invalid.add("scope", m);
            Scope::Zone
        }
    };
    let valid_for = match req.valid_for.as_deref().map(parse_valid_for).transpose() {
        Ok(d) => d.unwrap_or(token::DEFAULT_VALID_FOR),
        Err(m) => {
            invalid.add("validFor", m);
            token::DEFAULT_VALID_FOR
        }
    };
    invalid.into_result()?;
    let (token, claims) = state.tokens.issue(&req.zone, scope, valid_for)?;
    Ok(Json(json!({
        "token": token,
        "id": claims.jti,
        "zone": claims.sub,
        "scope": claims.scope,
        "expiresAt": token::rfc3339(claims.exp),
    })))
}

async fn issue_dataplane(
    Extract(state): Extract<State>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: DataplaneRequest = json_body(&body)?;
    let mut invalid = Invalid::default();
    for (field, value) in [("mesh", &req.mesh), ("name", &req.name)] {
        if let Err(m) = weft_core::validate::check_dns_label(value) {
            invalid.add(field, m);
        }
    }
    if let Err(m) = token::check_service(&req.service) {
        invalid.add("service", m);
    }
    let valid_for = match req.valid_for.as_deref().map(parse_valid_for).transpose() {
        Ok(d) => d.unwrap_or(token::DEFAULT_VALID_FOR),
        Err(m) => {
            invalid.add("validFor", m);
            token::DEFAULT_VALID_FOR
        }
    };
    invalid.into_result()?;
    let mesh = weft_core::Key::new(weft_core::Kind::Mesh, None, &req.mesh);
    if state.store.get(&mesh).await?.is_none() {
        return Err(ApiError::from(Invalid::one(
            "mesh",
            format!("mesh {:?} does not exist (create it first)", req.mesh),
        )));
    }
    let (token, claims) =
        state
            .tokens
            .issue_dataplane(&req.mesh, &req.name, &req.service, valid_for)?;
    Ok(Json(json!({
        "token": token,
        "id": claims.jti,
        "mesh": claims.mesh,
        "name": claims.sub,
        "service": claims.service,
        "expiresAt": token::rfc3339(claims.exp),
    })))
}

async fn revoke(Extract(state): Extract<State>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: RevokeRequest = json_body(&body)?;
    state.tokens.revoke(&req.id).await?;
    Ok(Json(json!({})))
}

async fn list_revoked(Extract(state): Extract<State>) -> Result<Json<Value>, ApiError> {
    let items: Vec<Value> = state
        .tokens
        .revoked()
        .await?
        .into_iter()
        .map(|r| json!({"id": r.jti, "revokedAt": rfc3339(&r.revoked_at)}))
        .collect();
    Ok(Json(json!({ "items": items })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_revokes_through_two_replicas_all_land() {
        let store: Arc<dyn Store> = Arc::new(weft_core::store::Memory::new());
        let a = Arc::new(Tokens::bootstrap(store.clone()).await.unwrap());
        let b = Arc::new(Tokens::bootstrap(store.clone()).await.unwrap());
        let ids: Vec<String> = (0..20).map(|i| format!("{i:032x}")).collect();
        let mut tasks = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let t = if i % 2 == 0 { a.clone() } else { b.clone() };
            let id = id.clone();
            tasks.push(tokio::spawn(async move { t.revoke(&id).await.unwrap() }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for t in [&a, &b] {
            let mut got: Vec<String> = t
                .revoked()
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.jti)
                .collect();
            got.sort();
            assert_eq!(got, ids);
        }
        // Twice is once.
        let first = a.revoke(&ids[0]).await.unwrap();
        assert_eq!(b.revoke(&ids[0]).await.unwrap(), first);
        assert_eq!(a.revoked().await.unwrap().len(), 20);
    }

    #[tokio::test]
    async fn unreadable_log_entries_are_skipped() {
        let store: Arc<dyn Store> = Arc::new(weft_core::store::Memory::new());
        store.system_init(&slot_key(0), "garbage").await.unwrap();
        let t = Tokens::bootstrap(store.clone()).await.unwrap();
        let id = "0123456789abcdef0123456789abcdef";
        t.revoke(id).await.unwrap();
        assert!(store.system_get(&slot_key(1)).await.unwrap().is_some());
        assert_eq!(t.revoked().await.unwrap()[0].jti, id);
    }
}
