//! What the zone needs to check dataplane tokens without asking global: the token verifying
//! keys and the revoked token ids, obtained with KDS `GetTrust` after each connect and every
//! [`REFRESH_EVERY`] while connected. The last answer is kept while global is away, so
//! proxies keep being checked (revocations made meanwhile arrive on the next connect).

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tonic::transport::Channel;
use weft_core::token::{self, Claims, DataplaneClaims, Scope, VerifyingKey};
use weft_proto::kds::v1 as pb;

/// How often the zone asks global for the trust while connected.
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The zone has not heard from global since it started.
    #[error(
        "dataplane token: cannot be checked yet (the zone has not obtained the token keys from global)"
    )]
    NotYet,
    #[error(transparent)]
    Token(#[from] token::Error),
    #[error("dataplane token {jti} for {name:?} in mesh {mesh:?} was revoked")]
    Revoked {
        jti: String,
        name: String,
        mesh: String,
    },
    #[error(
        "zone token for {zone:?} has scope {scope}, not {want} (issue one with `weftctl generate zone-token --zone {zone} --scope {want}`)"
    )]
    Scope {
        zone: String,
        scope: Scope,
        want: Scope,
    },
    #[error(
        "zone token is for zone {zone:?}, not this zone {want:?} (issue one with `weftctl generate zone-token --zone {want} --scope ingress`)"
    )]
    OtherZone { zone: String, want: String },
    #[error("zone token {jti} for {zone:?} was revoked")]
    ZoneRevoked { jti: String, zone: String },
}

#[derive(Default)]
struct Known {
    keys: Vec<VerifyingKey>,
    revoked: HashSet<String>,
    /// When global last answered.
    at: Option<SystemTime>,
}

/// The zone's copy of global's token trust, shared by the KDS client (which fills it) and
/// whatever checks dataplane tokens.
#[derive(Default)]
pub struct Trust {
    known: RwLock<Known>,
}

impl Trust {
    pub fn new() -> Arc<Trust> {
        Arc::default()
    }

    /// Replace what is known with global's answer.
    pub fn set(&self, resp: pb::GetTrustResponse) -> Result<(), token::Error> {
        let keys = resp
            .token_keys
            .iter()
            .map(|k| VerifyingKey::from_bytes(k))
            .collect::<Result<Vec<_>, _>>()?;
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        *known = Known {
            keys,
            revoked: resp.revoked_ids.into_iter().collect(),
            at: Some(SystemTime::now()),
        };
        Ok(())
    }

    /// When global last answered, if ever.
    pub fn updated_at(&self) -> Option<SystemTime> {
        self.known.read().unwrap_or_else(|e| e.into_inner()).at
    }

    /// Check a dataplane token a proxy presents as dataplane `name` of `mesh` serving
    /// `service`: signature, expiry, mesh/name/service, and revocation as last known.
    pub fn verify_dataplane(
        &self,
        token: &str,
        mesh: &str,
        name: &str,
        service: &str,
    ) -> Result<DataplaneClaims, Error> {
        self.verify_dataplane_at(token, SystemTime::now(), mesh, name, service)
    }

    /// [`Trust::verify_dataplane`] at a given time.
    pub fn verify_dataplane_at(
        &self,
        token: &str,
        now: SystemTime,
        mesh: &str,
        name: &str,
        service: &str,
    ) -> Result<DataplaneClaims, Error> {
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        if known.at.is_none() {
            return Err(Error::NotYet);
        }
        let claims = token::verify_dataplane(token, &known.keys, now, mesh, name, service)?;
        if known.revoked.contains(&claims.jti) {
            return Err(Error::Revoked {
                jti: claims.jti,
                name: claims.sub,
                mesh: claims.mesh,
            });
        }
        Ok(claims)
    }

    /// Check a zone token presented to this zone `zone` for `scope` (a zone ingress:
    /// [`Scope::Ingress`]): signature, expiry, scope, zone, and revocation as last known.
    pub fn verify_zone_token(
        &self,
        token: &str,
        scope: Scope,
        zone: &str,
    ) -> Result<Claims, Error> {
        self.verify_zone_token_at(token, SystemTime::now(), scope, zone)
    }

    /// [`Trust::verify_zone_token`] at a given time.
    pub fn verify_zone_token_at(
        &self,
        token: &str,
        now: SystemTime,
        scope: Scope,
        zone: &str,
    ) -> Result<Claims, Error> {
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        if known.at.is_none() {
            return Err(Error::NotYet);
        }
        let claims = token::verify(token, &known.keys, now)?;
        if claims.scope != scope {
            return Err(Error::Scope {
                zone: claims.sub,
                scope: claims.scope,
                want: scope,
            });
        }
        if claims.sub != zone {
            return Err(Error::OtherZone {
                zone: claims.sub,
                want: zone.to_string(),
            });
        }
        if known.revoked.contains(&claims.jti) {
            return Err(Error::ZoneRevoked {
                jti: claims.jti,
                zone: claims.sub,
            });
        }
        Ok(claims)
    }

    /// Ask global now and every [`REFRESH_EVERY`] until the future is dropped (the KDS
    /// session ends). Failures are logged; what is known stays.
    pub async fn run(
        &self,
        client: pb::kds_client::KdsClient<Channel>,
        zone: String,
        token: String,
    ) {
        let mut tick = tokio::time::interval(REFRESH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match get(client.clone(), &token, &zone).await {
                Ok(resp) => {
                    let revoked = resp.revoked_ids.len();
                    match self.set(resp) {
                        Ok(()) => tracing::debug!(revoked, "token trust refreshed from global"),
                        Err(e) => {
                            tracing::warn!(error = %e, "global sent unusable token keys (keeping the last ones)")
                        }
                    }
                }
                Err(s) => {
                    tracing::warn!(error = %s.message(), code = ?s.code(), "no token trust from global (keeping the last one)")
                }
            }
        }
    }
}

/// Call `GetTrust` as zone `zone` with `token`.
pub async fn get(
    mut client: pb::kds_client::KdsClient<Channel>,
    token: &str,
    zone: &str,
) -> Result<pb::GetTrustResponse, tonic::Status> {
    let mut req = tonic::Request::new(pb::GetTrustRequest {});
    let bad =
        |what: &str| tonic::Status::invalid_argument(format!("{what} is not valid header text"));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| bad("the zone token"))?,
    );
    req.metadata_mut().insert(
        crate::kds::ZONE_HEADER,
        zone.parse().map_err(|_| bad("the zone name"))?,
    );
    req.set_timeout(Duration::from_secs(10));
    Ok(client.get_trust(req).await?.into_inner())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyRequest {
    token: String,
    mesh: String,
    name: String,
    service: String,
}

/// The zone's operator/debug route `POST /_tokens/dataplane/verify {token, mesh, name,
/// service}`: `{ok: true}`, or 403 with the reason. Needs the admin token.
pub fn routes(trust: Arc<Trust>) -> axum::Router<weft_global::api::State> {
    use axum::http::StatusCode;
    use weft_global::api::ApiError;
    axum::Router::new().route(
        "/_tokens/dataplane/verify",
        axum::routing::post(move |body: axum::body::Bytes| {
            let trust = trust.clone();
            async move {
                let req: VerifyRequest = serde_json::from_slice(&body).map_err(|e| {
                    ApiError::from(weft_core::Invalid::one(
                        "",
                        format!("expected {{token, mesh, name, service}} ({e})"),
                    ))
                })?;
                trust
                    .verify_dataplane(&req.token, &req.mesh, &req.name, &req.service)
                    .map_err(|e| {
                        ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
                    })?;
                Ok::<_, ApiError>(axum::Json(serde_json::json!({"ok": true})))
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::token::SigningKey;

    #[test]
    fn checks_against_the_last_answer() {
        let trust = Trust::default();
        let key = SigningKey::generate();
        let (t, c) = key
            .issue_dataplane(
                "default",
                "web-1",
                "web",
                Duration::from_secs(60),
                SystemTime::now(),
            )
            .unwrap();
        assert!(matches!(
            trust.verify_dataplane(&t, "default", "web-1", "web"),
            Err(Error::NotYet)
        ));
        let answer = |revoked: Vec<String>| pb::GetTrustResponse {
            token_keys: vec![key.public().as_bytes().to_vec()],
            revoked_ids: revoked,
        };
        trust.set(answer(vec![])).unwrap();
        assert_eq!(
            trust
                .verify_dataplane(&t, "default", "web-1", "web")
                .unwrap(),
            c
        );
        assert!(
            trust
                .verify_dataplane(&t, "default", "web-1", "api")
                .is_err()
        );
        trust.set(answer(vec![c.jti.clone()])).unwrap();
        let e = trust
            .verify_dataplane(&t, "default", "web-1", "web")
            .unwrap_err();
        assert!(matches!(e, Error::Revoked { .. }), "{e}");
        assert!(e.to_string().contains("was revoked"), "{e}");
        assert!(
            trust
                .set(pb::GetTrustResponse {
                    token_keys: vec![vec![1; 3]],
                    revoked_ids: vec![]
                })
                .is_err()
        );
        // An unusable answer changes nothing.
        assert!(matches!(
            trust.verify_dataplane(&t, "default", "web-1", "web"),
            Err(Error::Revoked { .. })
        ));
    }
}
