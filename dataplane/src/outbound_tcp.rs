//! The L4 outbound: one endpoint per application connection (the next one when connecting
//! fails), then bytes copied both ways until either side closes, or until the connection
//! has been idle for MeshTimeout's `idleTimeout`.

use tokio::net::TcpStream;

use super::Shared;
use super::pool;
use crate::lb::{Pick, Tried};
use crate::metrics::Counted;
use crate::timeouts::{copy_bidirectional_idle, idle_clock};

pub(super) async fn serve(app: TcpStream, s: &Shared) {
    let service = s.lb.service();
    let _active = s.metrics().connection();
    let mut app = Counted::new(app, s.metrics().clone());
    let timeouts = s.lb.timeouts();
    let idle = idle_clock(timeouts.idle);
    if let Some((clock, _)) = &idle {
        app.watch(clock.clone());
    }
    let mut tried = Tried::new();
    let mut last = String::new();
    loop {
        let ep = match s.lb.pick(&tried) {
            Pick::Endpoint(ep) => ep,
            Pick::NoEndpoints => {
                if s.should_warn() {
                    tracing::warn!(
                        service,
                        "no endpoints for service {service}: connection closed"
                    );
                }
                return;
            }
            Pick::Exhausted => {
                if s.should_warn() {
                    tracing::warn!(
                        service,
                        "no endpoint reachable ({} tried, last: {last}): connection closed",
                        tried.len()
                    );
                }
                return;
            }
        };
        tried.add(&*ep);
        let alpn = pool::alpn(ep.protocol);
        match pool::connect(&ep, &s.ctx, service, alpn, timeouts.connect).await {
            Ok(mut upstream) => {
                // `ep` stays in flight while the connection lasts (least-request counts it).
                match copy_bidirectional_idle(
                    &mut app,
                    &mut upstream,
                    idle.as_ref().map(|(c, d)| (&**c, *d)),
                )
                .await
                {
                    Ok(Some((to, from))) => {
                        tracing::debug!(endpoint = %ep.authority(), to, from, "tcp closed");
                    }
                    Ok(None) => tracing::debug!(
                        endpoint = %ep.authority(),
                        "tcp closed: idle for {:?} (MeshTimeout idleTimeout)",
                        timeouts.idle.unwrap_or_default()
                    ),
                    Err(e) => tracing::debug!(endpoint = %ep.authority(), "tcp: {e}"),
                }
                return;
            }
            Err(e) => last = e.to_string(),
        }
    }
}
