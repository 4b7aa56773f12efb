//! What the zone shows about its proxies: `GET /_inspect/dataplanes[?mesh=]` (every Dataplane
//! in the store, online or offline, with its session's status), `GET
//! /_inspect/dataplanes/{mesh}/{name}/config` (what the zone last sent that proxy), and the
//! `weft_dataplane_*` metrics, and [`fill_vips`]: the zone's VIPs in the answer of
//! `GET /_inspect/services` (served by weft-global's API on both planes, with `vip: null`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use axum::extract::{Path, Query};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use weft_core::Kind;
use weft_core::spec::{DataplaneSpec, SERVICE_TAG};
use weft_core::store::{self, ListQuery};
use weft_global::api::ApiError;

use super::Hub;

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// One row of `/_inspect/dataplanes`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Item {
    pub name: String,
    pub mesh: String,
    pub zone: String,
    pub service: String,
    /// `online` (a session is open now) or `offline`.
    pub status: String,
    pub connected_since: Option<String>,
    pub last_seen: Option<String>,
    pub version: String,
    pub cert_expires: Option<String>,
    pub last_acked_nonce: u64,
    pub last_sent_nonce: u64,
    pub last_nack: Option<Nack>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Nack {
    pub nonce: u64,
    pub reason: String,
}

#[derive(Deserialize)]
struct MeshQuery {
    mesh: Option<String>,
}

impl Hub {
    /// Every Dataplane in the store (of `mesh`, when given) with its session's status.
    pub async fn items(&self, mesh: Option<&str>) -> store::Result<Vec<Item>> {
        let query = match mesh {
            Some(m) => ListQuery::in_mesh(Kind::Dataplane, m),
            None => ListQuery::all(Kind::Dataplane),
        };
        let resources = store::list_all(&*self.store, query).await?;
        let ix = self.index();
        Ok(resources
            .into_iter()
            .map(|r| {
                let mesh = r.mesh.clone().unwrap_or_default();
                let known = ix.lookup(&(mesh.clone(), r.name.clone()));
                let zone = r
                    .labels
                    .get(weft_core::ZONE_LABEL)
                    .cloned()
                    .unwrap_or_else(|| self.zone.clone());
                let stored_service = serde_json::from_value::<DataplaneSpec>(r.spec.clone())
                    .ok()
                    .and_then(|s| {
                        s.networking
                            .inbound
                            .first()
                            .and_then(|ib| ib.tags.get(SERVICE_TAG).cloned())
                    })
                    .unwrap_or_default();
                match known {
                    Some((online, i, sent)) => Item {
                        name: r.name,
                        mesh,
                        zone,
                        service: if i.service.is_empty() {
                            stored_service
                        } else {
                            i.service
                        },
                        status: if online { "online" } else { "offline" }.to_string(),
                        connected_since: online.then_some(i.connected_since).flatten().map(rfc3339),
                        last_seen: i.last_seen.map(rfc3339),
                        version: i.version,
                        cert_expires: sent.certificate.map(|(t, _)| rfc3339(t)),
                        last_acked_nonce: i.last_acked_nonce,
                        last_sent_nonce: i.last_sent_nonce,
                        last_nack: i.last_nack.map(|(nonce, reason)| Nack { nonce, reason }),
                    },
                    None => Item {
                        name: r.name,
                        mesh,
                        zone,
                        service: stored_service,
                        status: "offline".to_string(),
                        connected_since: None,
                        last_seen: None,
                        version: String::new(),
                        cert_expires: None,
                        last_acked_nonce: 0,
                        last_sent_nonce: 0,
                        last_nack: None,
                    },
                }
            })
            .collect())
    }

    /// What the zone last sent dataplane `name` of `mesh`, if it ever connected.
    pub fn config(&self, mesh: &str, name: &str) -> Option<Value> {
        let (online, _, sent) = self.index().lookup(&(mesh.to_string(), name.to_string()))?;
        let view = sent
            .view_json
            .as_deref()
            .and_then(|v| serde_json::from_str::<Value>(v).ok());
        let services: BTreeMap<String, Value> = sent
            .services
            .values()
            .map(|s| {
                let endpoints: Vec<Value> = s
                    .endpoints
                    .iter()
                    .map(|e| {
                        let tags: BTreeMap<&String, &String> = e.tags.iter().collect();
                        json!({
                            "address": e.address,
                            "port": e.port,
                            "dataplane": e.dataplane,
                            "zone": e.zone,
                            "tags": tags,
                            "weight": e.weight,
                        })
                    })
                    .collect();
                (
                    s.service.clone(),
                    json!({"protocol": s.protocol, "endpoints": endpoints}),
                )
            })
            .collect();
        let certificate = sent
            .certificate
            .map(|(t, id)| json!({"notAfter": rfc3339(t), "spiffeId": id}));
        Some(json!({
            "mesh": mesh,
            "name": name,
            "status": if online { "online" } else { "offline" },
            "view": view,
            "services": services,
            "certificate": certificate,
        }))
    }

    /// The `weft_dataplane_*` metrics in Prometheus text form.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write as _;
        let c = &self.counters;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP weft_dataplane_connected Proxies with an open data-plane API session."
        );
        let _ = writeln!(out, "# TYPE weft_dataplane_connected gauge");
        let _ = writeln!(out, "weft_dataplane_connected {}", self.online());
        for (name, help, v) in [
            (
                "updates_sent",
                "Config updates sent to proxies.",
                &c.updates_sent,
            ),
            ("acks", "Updates proxies acknowledged.", &c.acks),
            ("nacks", "Updates proxies refused.", &c.nacks),
            (
                "certificates_issued",
                "Workload certificates issued to proxies.",
                &c.certificates_issued,
            ),
            (
                "sessions_refused",
                "Proxy Hellos refused (bad token, invalid Dataplane, unknown mesh).",
                &c.sessions_refused,
            ),
        ] {
            let _ = writeln!(out, "# HELP weft_dataplane_{name} {help}");
            let _ = writeln!(out, "# TYPE weft_dataplane_{name} counter");
            let _ = writeln!(
                out,
                "weft_dataplane_{name}_total {}",
                v.load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// `GET /_inspect/dataplanes[?mesh=M]` and `GET /_inspect/dataplanes/{mesh}/{name}/config`,
/// merged into the zone's API (any token reads them).
pub fn routes(hub: Arc<Hub>) -> axum::Router<weft_global::api::State> {
    let list_hub = hub.clone();
    axum::Router::new()
        .route(
            "/_inspect/dataplanes",
            axum::routing::get(move |Query(q): Query<MeshQuery>| {
                let hub = list_hub.clone();
                async move {
                    let items = hub.items(q.mesh.as_deref()).await.map_err(ApiError::from)?;
                    Ok::<_, ApiError>(axum::Json(json!({ "items": items })))
                }
            }),
        )
        .route(
            "/_inspect/dataplanes/{mesh}/{name}/config",
            axum::routing::get(move |Path((mesh, name)): Path<(String, String)>| {
                let hub = hub.clone();
                async move {
                    match hub.config(&mesh, &name) {
                        Some(v) => Ok(axum::Json(v)),
                        None => Err(ApiError::new(
                            StatusCode::NOT_FOUND,
                            "not found",
                            format!(
                                "dataplane {name:?} of mesh {mesh:?} has not connected to zone {} since it started (check the name and mesh with `weftctl inspect dataplanes -A`)",
                                hub.zone
                            ),
                        )),
                    }
                }
            }),
        )
}

/// A layer over the zone's API: in the answer of `GET /_inspect/services` (weft-global's
/// handler, the same on both planes: every service of every mesh from the MeshServices this
/// zone holds, its own and the other zones'), set each item's `vip` to this zone's VIP of
/// `<service>.mesh`. Authentication and errors stay the handler's.
pub async fn fill_vips(
    hub: Arc<Hub>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let wanted =
        req.method() == axum::http::Method::GET && req.uri().path() == "/_inspect/services";
    let resp = next.run(req).await;
    if !wanted || resp.status() != StatusCode::OK {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let bytes = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "reading the /_inspect/services answer");
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "reading the service list failed",
            )
            .into_response();
        }
    };
    let mut v: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(_) => return axum::response::Response::from_parts(parts, bytes.into()),
    };
    {
        let ix = hub.index();
        for item in v
            .get_mut("items")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let (Some(mesh), Some(service)) = (
                item.get("mesh").and_then(Value::as_str),
                item.get("service").and_then(Value::as_str),
            ) else {
                continue;
            };
            let vip = ix.vip_of(mesh, service);
            item["vip"] = json!(vip);
        }
    }
    let mut resp = axum::Json(v).into_response();
    *resp.status_mut() = parts.status;
    resp
}
