//! The admin endpoint (HTTP/1, localhost): `GET /ready`, `GET /config`, `GET /metrics`.
//!
//! It starts before anything else, so `/ready` says what the proxy still waits for, and it
//! renders the traffic side's metrics followed by the session's own.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::client;
use crate::state::Context;

/// What the admin endpoint shows.
pub struct Admin {
    /// Replaced once, when the zone's name is known (`main` builds the listeners' context with
    /// it), so that `/metrics` renders the metrics the listeners record.
    ctx: RwLock<Context>,
    session: Arc<client::Status>,
    listening: AtomicBool,
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Admin {
    pub fn new(ctx: Context, session: Arc<client::Status>) -> Arc<Admin> {
        Arc::new(Admin {
            ctx: RwLock::new(ctx),
            session,
            listening: AtomicBool::new(false),
        })
    }

    pub fn context(&self) -> Context {
        self.ctx.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_context(&self, ctx: Context) {
        *self.ctx.write().unwrap_or_else(|e| e.into_inner()) = ctx;
    }

    /// Every inbound and outbound listener is bound.
    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::Relaxed);
    }

    /// `Ok` when the proxy serves traffic; otherwise what it waits for.
    pub fn ready(&self) -> Result<(), String> {
        if self.context().draining.is_cancelled() {
            return Err("draining".into());
        }
        if let Some(why) = self.session.progress().waiting_for() {
            return Err(why.into());
        }
        if !self.listening.load(Ordering::Relaxed) {
            return Err("listeners not started yet".into());
        }
        Ok(())
    }

    /// The `/config` document.
    pub fn config(&self) -> Value {
        let ctx = self.context();
        let snapshot = ctx.state.current();
        let services: serde_json::Map<String, Value> = snapshot
            .services
            .iter()
            .map(|(name, s)| {
                let endpoints: Vec<Value> = s
                    .endpoints
                    .iter()
                    .map(|e| {
                        json!({
                            "address": e.address,
                            "port": e.port,
                            "dataplane": e.dataplane,
                            "zone": e.zone,
                            "tags": e.tags,
                            "weight": e.weight,
                        })
                    })
                    .collect();
                (
                    name.clone(),
                    json!({"protocol": s.protocol, "endpoints": endpoints}),
                )
            })
            .collect();
        let vips: Vec<Value> = snapshot
            .vips
            .values()
            .map(|v| {
                json!({
                    "name": v.name.to_string(),
                    "address": v.address.to_string(),
                    "service": v.service,
                    "zone": v.zone,
                    "ports": v.ports,
                })
            })
            .collect();
        let certificate = ctx.identity.status().map(|c| {
            json!({
                "spiffeId": c.id.to_string(),
                "notBefore": rfc3339(c.not_before),
                "notAfter": rfc3339(c.not_after),
                "serial": c.serial,
            })
        });
        json!({
            "dataplane": ctx.labels.dataplane,
            "mesh": ctx.labels.mesh,
            "zone": self.session.zone(),
            "connected": self.session.connected(),
            "generation": snapshot.generation,
            "nonce": snapshot.nonce,
            "view": serde_json::to_value(&*snapshot.view).unwrap_or(Value::Null),
            "services": services,
            "vips": vips,
            "certificate": certificate,
        })
    }

    /// The `/metrics` body and its content type: the traffic side's metrics, then the
    /// session's, in the format the traffic side chose (OpenMetrics when it ends with
    /// `# EOF`, Prometheus text 0.0.4 otherwise).
    pub fn metrics(&self) -> (&'static str, String) {
        let ctx = self.context();
        let traffic = ctx.metrics.render(&ctx.identity);
        let (openmetrics, mut out) = match traffic.strip_suffix("# EOF\n") {
            Some(body) => (true, body.to_string()),
            None => (false, traffic),
        };
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        let labels = format!(
            "mesh=\"{}\",zone=\"{}\",dataplane=\"{}\"",
            escape(&ctx.labels.mesh),
            escape(&self.session.zone()),
            escape(&ctx.labels.dataplane)
        );
        let c = self.session.counters();
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            // OpenMetrics names a counter family without `_total`; 0.0.4 with it.
            let family = match (kind, openmetrics) {
                ("counter", true) => name.strip_suffix("_total").unwrap_or(name),
                _ => name,
            };
            let _ = writeln!(out, "# HELP {family} {help}");
            let _ = writeln!(out, "# TYPE {family} {kind}");
            for (extra, v) in samples {
                let _ = writeln!(out, "{name}{{{labels}{extra}}} {v}");
            }
        };
        family(
            "weft_dp_zone_connected",
            "gauge",
            "Whether the proxy is registered with its zone on a live stream (1) or not (0).",
            &[("", u64::from(self.session.connected()))],
        );
        family(
            "weft_dp_zone_reconnects_total",
            "counter",
            "Times the session with the zone ended and the proxy reconnected.",
            &[("", c.reconnects)],
        );
        family(
            "weft_dp_updates_total",
            "counter",
            "Configuration updates from the zone, applied (ack) or refused (nack).",
            &[(",result=\"ack\"", c.acks), (",result=\"nack\"", c.nacks)],
        );
        family(
            "weft_dp_certificates_total",
            "counter",
            "Workload certificates: installed, refused by the zone (CertificateError), or invalid (did not install).",
            &[
                (",result=\"installed\"", c.certs_installed),
                (",result=\"refused\"", c.certs_refused),
                (",result=\"invalid\"", c.certs_invalid),
            ],
        );
        if openmetrics {
            out.push_str("# EOF\n");
            (OPENMETRICS, out)
        } else {
            (PROMETHEUS, out)
        }
    }

    fn handle(&self, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if !matches!(path, "/ready" | "/config" | "/metrics") {
            return text(
                StatusCode::NOT_FOUND,
                "not found: try /ready, /config or /metrics\n",
            );
        }
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        }
        match path {
            "/ready" => match self.ready() {
                Ok(()) => text(StatusCode::OK, "ready\n"),
                Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("{why}\n")),
            },
            "/config" => {
                let mut body = serde_json::to_string_pretty(&self.config())
                    .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
                body.push('\n');
                // The document (and the JSON tree behind it) is large with many services:
                // give the memory back once it has been sent.
                crate::memory::trim_soon();
                response(StatusCode::OK, "application/json", body)
            }
            _ => {
                let (content_type, body) = self.metrics();
                response(StatusCode::OK, content_type, body)
            }
        }
    }
}

/// Serve the admin endpoint on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "admin: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let resp = admin.handle(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "admin connection");
                },
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body.to_string())
}

fn response(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A Prometheus label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Labels, State};

    fn mk_admin() -> Arc<Admin> {
        let labels = Labels {
            mesh: "default".into(),
            zone: String::new(),
            dataplane: "web-1".into(),
        };
        let ctx = Context {
            state: State::new(),
            identity: crate::tls::Identity::new("default"),
            metrics: Arc::new(crate::metrics::Metrics::new(labels.clone())),
            labels: Arc::new(labels),
            draining: CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
        };
        Admin::new(ctx, Arc::new(client::Status::default()))
    }

    #[test]
    fn not_ready_until_config_and_listeners() {
        let admin = mk_admin();
        assert_eq!(
            admin.ready().unwrap_err(),
            "not registered with the zone yet"
        );
        admin.set_listening();
        assert!(admin.ready().is_err());
        admin.context().draining.cancel();
        assert_eq!(admin.ready().unwrap_err(), "draining");
    }

    #[test]
    fn config_before_anything() {
        let c = mk_admin().config();
        assert_eq!(c["dataplane"], "web-1");
        assert_eq!(c["connected"], false);
        assert_eq!(c["generation"], 0);
        assert_eq!(c["certificate"], Value::Null);
        assert!(c["services"].as_object().unwrap().is_empty());
        assert_eq!(c["vips"], json!([]));
    }

    #[test]
    fn config_shows_the_vip_table() {
        use weft_proto::dataplane::v1 as pb;
        let admin = mk_admin();
        admin
            .context()
            .state
            .apply(&pb::Update {
                nonce: 1,
                full: true,
                view_json: Some(
                    r#"{"mesh":"default","dataplane":"web-1","inbounds":[],"outbounds":{}}"#.into(),
                ),
                vips_replace: true,
                vips: vec![pb::Vip {
                    name: "backend.west.mesh".into(),
                    address: "240.0.0.2".into(),
                    service: "backend".into(),
                    zone: "west".into(),
                    ports: vec![80],
                }],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            admin.config()["vips"],
            json!([{"name": "backend.west.mesh", "address": "240.0.0.2", "service": "backend",
                    "zone": "west", "ports": [80]}])
        );
    }

    /// Every sample belongs to the family of the last TYPE line, counters end in `_total`,
    /// and every family has HELP and TYPE.
    fn check_exposition(text: &str, openmetrics: bool) {
        let mut family: Option<(String, String)> = None;
        let mut help: Option<String> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                help = Some(rest.split(' ').next().unwrap().to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                let (name, kind) = (it.next().unwrap(), it.next().unwrap());
                assert_eq!(help.as_deref(), Some(name), "HELP before TYPE for {name}");
                family = Some((name.to_string(), kind.to_string()));
            } else if line == "# EOF" {
                assert!(openmetrics);
            } else {
                let (fam, kind) = family.clone().expect("a sample after a TYPE line");
                let name = line.split(['{', ' ']).next().unwrap();
                // Histogram and summary samples carry suffixes; OpenMetrics counters may
                // have `_created`.
                assert!(name.starts_with(&fam), "{line} outside family {fam}");
                if kind == "counter" && !name.ends_with("_created") {
                    let want = if openmetrics {
                        format!("{fam}_total")
                    } else {
                        fam.clone()
                    };
                    assert_eq!(name, want, "{line}");
                    assert!(name.ends_with("_total"), "{line}");
                }
                let value = line.rsplit(' ').next().unwrap();
                value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
            }
        }
        assert_eq!(text.ends_with("# EOF\n"), openmetrics);
    }

    #[test]
    fn metrics_are_valid_exposition() {
        let admin = mk_admin();
        let (content_type, body) = admin.metrics();
        let openmetrics = content_type == OPENMETRICS;
        check_exposition(&body, openmetrics);
        assert!(
            body.contains(
                "weft_dp_updates_total{mesh=\"default\",zone=\"\",dataplane=\"web-1\",result=\"nack\"} 0"
            ),
            "{body}"
        );
        assert!(body.contains("weft_dp_zone_connected{"), "{body}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
