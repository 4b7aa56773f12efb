//! The admin endpoint (HTTP/1, meant for localhost): `GET /ready`, `GET /config`,
//! `GET /metrics` (OpenMetrics).
//!
//! It starts before anything else, so `/ready` says what the ingress still waits for:
//! registration, then the first routing table; and `draining` after SIGTERM.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::{CONTENT_TYPE, Metrics};
use crate::session;
use crate::table::Routes;

/// What the admin endpoint shows.
pub struct Admin {
    pub name: String,
    pub routes: Routes,
    pub metrics: Arc<Metrics>,
    pub session: Arc<session::Status>,
    pub draining: CancellationToken,
    /// Egress mode: the per-mesh certificates (shown in `/config`).
    pub certs: Option<Arc<crate::egress::Certs>>,
}

impl Admin {
    /// `Ok` when the ingress routes traffic; otherwise what it waits for.
    pub fn ready(&self) -> Result<(), String> {
        if self.draining.is_cancelled() {
            return Err("draining".into());
        }
        match self.session.progress().waiting_for() {
            Some(why) => Err(why.into()),
            None => Ok(()),
        }
    }

    /// The `/config` document: who, which zone, and the routing table.
    pub fn config(&self) -> Value {
        let table = self.routes.current();
        let services: Vec<Value> = table
            .services
            .values()
            .map(|s| serde_json::to_value(&**s).unwrap_or(Value::Null))
            .collect();
        let (acks, nacks) = self.session.answers();
        let certificates: Vec<Value> = self
            .certs
            .iter()
            .flat_map(|c| c.summary())
            .map(|(mesh, id, not_after)| json!({"mesh": mesh, "identity": id, "notAfterUnix": not_after}))
            .collect();
        json!({
            "certificates": certificates,
            "name": self.name,
            "zone": table.zone,
            "connected": self.session.connected(),
            "generation": table.generation,
            "nonce": table.nonce,
            "acks": acks,
            "nacks": nacks,
            "services": services,
        })
    }
}

/// The admin routes.
pub fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/ready", get(ready))
        .route("/config", get(config))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: try /ready, /config or /metrics\n",
            )
        })
        .with_state(admin)
}

async fn ready(State(admin): State<Arc<Admin>>) -> Response {
    match admin.ready() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn config(State(admin): State<Arc<Admin>>) -> Response {
    axum::Json(admin.config()).into_response()
}

async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        admin.metrics.render(),
    )
        .into_response()
}

/// Serve the admin endpoint on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    axum::serve(listener, router(admin))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|e| anyhow::anyhow!("admin endpoint: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_and_config() {
        let admin = Admin {
            name: "ingress-1".into(),
            routes: Routes::new(),
            metrics: Arc::new(Metrics::new()),
            session: Arc::new(session::Status::default()),
            draining: CancellationToken::new(),
            certs: None,
        };
        assert_eq!(
            admin.ready().unwrap_err(),
            "not registered with the zone yet"
        );
        let c = admin.config();
        assert_eq!(c["name"], "ingress-1");
        assert_eq!(c["zone"], "");
        assert_eq!(c["generation"], 0);
        assert_eq!(c["services"], json!([]));
        admin.draining.cancel();
        assert_eq!(admin.ready().unwrap_err(), "draining");
    }
}
