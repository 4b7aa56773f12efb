//! VIP outbound listeners (`--bind-vips`): an outbound listener on every `VIP:port` of the
//! mesh's VIP table, following the table as the zone changes it.
//!
//! Each listener is an ordinary outbound ([`outbound::serve`]: L7 with per-request balancing
//! for http/http2/grpc, L4 for tcp) for the VIP's service; a pinned name
//! (`<service>.<zone>.mesh`) only uses that zone's endpoints, `<service>.mesh` balances with
//! locality (ours first). On every table change the listeners are diffed by address and
//! target: unchanged ones keep running (and their connection pools), removed ones stop
//! accepting (their HTTP connections close after the requests in flight), new ones are bound.
//! A listener that cannot bind (address not local, port taken) is logged and counted
//! (`weft_dp_vip_bind_failures_total`) and tried again at the next table change; it never
//! stops the proxy.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::outbound::{self, Outbound};
use crate::state::{Context, Snapshot};

/// What a VIP listener forwards to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The VIP's DNS name, for logs.
    pub name: String,
    pub service: String,
    pub zone: Option<String>,
}

/// The listeners the VIP table asks for: `VIP:port` → target. When two names claim the same
/// address and port, the first (in name order) wins.
pub fn wanted(snapshot: &Snapshot) -> BTreeMap<SocketAddr, Target> {
    let mut out = BTreeMap::new();
    for vip in snapshot.vips.values() {
        for port in &vip.ports {
            let addr = SocketAddr::from((vip.address, *port));
            let target = Target {
                name: vip.name.to_string(),
                service: vip.service.clone(),
                zone: vip.zone.clone(),
            };
            if let Some(first) = out.get(&addr) {
                let first: &Target = first;
                tracing::warn!(
                    %addr, "VIP {} and {} share {addr}: only {} is served",
                    first.name, target.name, first.name
                );
                continue;
            }
            out.insert(addr, target);
        }
    }
    out
}

struct Running {
    target: Target,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Keep one outbound listener per VIP:port until `ctx.draining` is cancelled.
pub async fn run(ctx: Context) -> anyhow::Result<()> {
    let mut rx = ctx.state.subscribe();
    rx.mark_changed();
    let mut running: BTreeMap<SocketAddr, Running> = BTreeMap::new();
    loop {
        tokio::select! {
            biased;
            _ = ctx.draining.cancelled() => break,
            r = rx.changed() => if r.is_err() { break },
        }
        let snapshot = rx.borrow_and_update().clone();
        let wanted = wanted(&snapshot);
        // Stop what is gone or changed first, so that its address is free again.
        let stale: Vec<SocketAddr> = running
            .iter()
            .filter(|(addr, r)| wanted.get(addr) != Some(&r.target))
            .map(|(addr, _)| *addr)
            .collect();
        for addr in stale {
            if let Some(r) = running.remove(&addr) {
                tracing::info!(%addr, vip = %r.target.name, "VIP listener stopped");
                r.stop.cancel();
                let _ = r.task.await;
            }
        }
        for (addr, target) in wanted {
            if running.contains_key(&addr) {
                continue;
            }
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    running.insert(addr, start(listener, addr, target, &ctx));
                }
                Err(e) => {
                    ctx.metrics.vip_bind_failed();
                    tracing::warn!(
                        %addr, vip = %target.name,
                        "VIP listener: binding {addr}: {e} (the address must be local: add it to \
                         an interface, or run without --bind-vips); retried at the next VIP table change"
                    );
                }
            }
        }
        ctx.metrics.set_vip_listeners(running.len());
    }
    for (_, r) in running {
        r.stop.cancel();
    }
    Ok(())
}

fn start(listener: TcpListener, addr: SocketAddr, target: Target, ctx: &Context) -> Running {
    let stop = ctx.draining.child_token();
    let outbound = Outbound {
        service: target.service.clone(),
        zone: target.zone.clone(),
    };
    let lctx = Context {
        draining: stop.clone(),
        ..ctx.clone()
    };
    let span = tracing::info_span!("vip", %addr, vip = %target.name);
    tracing::info!(parent: &span, service = %target.service, "VIP listener started");
    let task = tokio::spawn(
        async move {
            if let Err(e) = outbound::run(listener, outbound, lctx).await {
                tracing::warn!("VIP listener failed: {e:#}");
            }
        }
        .instrument(span),
    );
    Running { target, stop, task }
}
