//! The L4 outbound: one endpoint per application connection (the next one when connecting
//! fails), then bytes copied both ways until either side closes.

use tokio::net::TcpStream;

use super::Shared;
use super::pool;
use crate::lb::{Pick, Tried};
use crate::metrics::Counted;

pub(super) async fn serve(app: TcpStream, s: &Shared) {
    let service = s.lb.service();
    let _active = s.metrics().connection();
    let mut app = Counted::new(app, s.metrics().clone());
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
        match pool::connect(&ep, &s.ctx, service, pool::alpn(ep.protocol)).await {
            Ok(mut upstream) => {
                // `ep` stays in flight while the connection lasts (least-request counts it).
                match tokio::io::copy_bidirectional(&mut app, &mut upstream).await {
                    Ok((to, from)) => {
                        tracing::debug!(endpoint = %ep.authority(), to, from, "tcp closed");
                    }
                    Err(e) => tracing::debug!(endpoint = %ep.authority(), "tcp: {e}"),
                }
                return;
            }
            Err(e) => last = e.to_string(),
        }
    }
}
