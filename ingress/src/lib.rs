//! weft-ingress: the zone ingress. Other zones' proxies reach this zone's services through
//! it: they open mTLS to the local proxy with the SNI `<service>.<zone>.<mesh>.weft`
//! (`weft_core::names::Sni`), the ingress reads that SNI from the ClientHello and passes the
//! TLS bytes, untouched, to a local endpoint of the service. It never terminates TLS and
//! holds no key: mTLS and authorization stay end to end between the two proxies.
//!
//! Session side: [`config`] (flags), [`session`] (the zone session over the data-plane API:
//! `Hello` with a zone token of scope `ingress` and a ZoneIngress, then `Update`s with every
//! local service of every mesh), [`admin`] (`/ready`, `/config`, `/metrics`). Traffic side:
//! [`hello`] (ClientHello parsing with rustls's `Acceptor`), [`proxy`] (accept, route,
//! splice), [`metrics`]. [`table`] (the routing table, behind a `watch` of `Arc<Table>`) is
//! the contract between the two. [`serve`] wires them; `main.rs` only parses flags, builds the
//! runtime, binds and turns signals into the drain.
//!
//! `--mode egress` runs the zone egress instead ([`egress`]): same session (a ZoneEgress, a
//! zone token of scope `egress`, plus a certificate per mesh), admin and metrics
//! (`weft_egress_*`), but the listener terminates this zone's proxies' mTLS, enforces
//! MeshTrafficPermission and connects to MeshExternalServices; connections for other zones
//! of meshes with `routing.zoneEgress` are passed through to those zones' ingresses
//! untouched, by the ingress's own code ([`proxy::pass`]).

pub mod admin;
pub mod config;
pub mod egress;
pub mod hello;
pub mod metrics;
pub mod proxy;
pub mod session;
pub mod table;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinError;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// The process's two shutdown steps, driven by signals in `main` (or by tests).
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    /// Stop accepting; let open connections finish within the drain timeout.
    pub drain: CancellationToken,
    /// Stop now, cutting the connections still open (a second signal).
    pub cut: CancellationToken,
}

/// Run the ingress on the given listeners until `shutdown`: the admin endpoint at once, the
/// zone session, and the traffic listener once registered with a first routing table
/// (connections wait in the backlog meanwhile). A critical task (session, admin, listener)
/// that ends before the drain ends the process with its error.
pub async fn serve(
    cfg: config::Config,
    traffic: TcpListener,
    admin_listener: TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let egress_mode = cfg.mode == config::Mode::Egress;
    let metrics = Arc::new(if egress_mode {
        metrics::Metrics::with_prefix("weft_egress")
    } else {
        metrics::Metrics::new()
    });
    let routes = table::Routes::new();
    let ctx = proxy::Context::new(routes.clone(), metrics.clone());
    let certs = Arc::new(egress::Certs::default());
    let mut client =
        session::Client::new(session::Config::new(&cfg), routes.clone(), metrics.clone());
    let egress_ctx = match &cfg.external_ca_pem {
        Some(pem) if egress_mode => {
            client = client.with_certs(certs.clone());
            let upstream = egress::Upstream::new(egress::external_roots(pem)?)?;
            Some(egress::Context {
                base: ctx.clone(),
                certs: certs.clone(),
                upstream: Arc::new(upstream),
            })
        }
        _ if egress_mode => anyhow::bail!("--mode egress: no external CA certificates loaded"),
        _ => None,
    };
    let status = client.status();
    // Ends the admin endpoint and the session when this function returns.
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();

    let admin = Arc::new(admin::Admin {
        name: cfg.name.clone(),
        routes: routes.clone(),
        metrics: metrics.clone(),
        session: status.clone(),
        draining: ctx.draining.clone(),
        certs: egress_mode.then(|| certs.clone()),
    });
    tracing::info!(address = ?admin_listener.local_addr().ok(), "admin endpoint listening");
    let mut admin_task = tokio::spawn(
        admin::serve(admin_listener, admin, stop.clone()).instrument(tracing::info_span!("admin")),
    );
    tracing::info!(
        zone = %cfg.zone_address, name = %cfg.name,
        version = env!("CARGO_PKG_VERSION"), "starting"
    );
    let mut session_task = tokio::spawn(
        client
            .run(stop.clone())
            .instrument(tracing::info_span!("session")),
    );

    let mut progress = status.subscribe();
    tokio::select! {
        r = progress.wait_for(|p| p.waiting_for().is_none()) => {
            r.context("the session's status is gone")?;
        }
        r = &mut session_task => return ended("the zone session", r),
        r = &mut admin_task => return ended("the admin endpoint", r),
        _ = shutdown.drain.cancelled() => {
            tracing::info!("stopping before the first routing table");
            return Ok(());
        }
    }

    let address = traffic.local_addr().ok();
    let mut listener_task = match egress_ctx {
        Some(ectx) => tokio::spawn(
            egress::serve(traffic, ectx).instrument(tracing::info_span!("egress-listener")),
        ),
        None => tokio::spawn(
            proxy::serve(traffic, ctx.clone()).instrument(tracing::info_span!("listener")),
        ),
    };
    tracing::info!(address = ?address, zone = %routes.current().zone, "routing");

    tokio::select! {
        _ = shutdown.drain.cancelled() => {}
        r = &mut listener_task => {
            return match r {
                Ok(Ok(())) => Err(anyhow::anyhow!("--address: the listener stopped")),
                Ok(Err(e)) => Err(anyhow::Error::from(e).context("--address: the listener failed")),
                Err(e) => Err(anyhow::anyhow!("the listener panicked: {e}")),
            };
        }
        r = &mut session_task => return ended("the zone session", r),
        r = &mut admin_task => return ended("the admin endpoint", r),
    }

    // Drain: stop accepting, let open connections finish within the timeout.
    tracing::info!(timeout = ?cfg.drain_timeout, open = ctx.tasks.len(), "draining");
    ctx.draining.cancel();
    ctx.tasks.close();
    tokio::select! {
        _ = ctx.tasks.wait() => tracing::info!("drained: every connection finished"),
        _ = tokio::time::sleep(cfg.drain_timeout) => {
            tracing::warn!(cut = ctx.tasks.len(), "drain timeout: cutting the connections still open");
        }
        _ = shutdown.cut.cancelled() => {
            tracing::warn!(cut = ctx.tasks.len(), "second signal: cutting the connections still open");
        }
    }
    Ok(())
}

/// A critical task ended before shutdown: that ends the process.
fn ended(what: &str, r: Result<anyhow::Result<()>, JoinError>) -> anyhow::Result<()> {
    match r {
        Ok(Ok(())) => Err(anyhow::anyhow!("{what} stopped")),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(anyhow::anyhow!("{what} panicked: {e}")),
    }
}
