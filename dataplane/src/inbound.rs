//! The inbound listener: terminates mTLS, authorizes the caller by SPIFFE ID against
//! MeshTrafficPermission, forwards to the application.
//!
//! CONTRACT (traffic side implements; `main` calls `run` once per Dataplane inbound after the
//! first config, and the certificate when the mesh has mTLS, are in place).

use std::net::SocketAddr;

use tokio::net::TcpListener;
use weft_core::spec::fields::Protocol;

use crate::state::Context;

#[derive(Clone, Debug)]
pub struct Inbound {
    /// The inbound's port as in the Dataplane (and `ProxyView.inbounds[].port`).
    pub port: u16,
    /// The service this inbound serves (`weft.io/service`).
    pub service: String,
    /// `tcp` unless the inbound says otherwise.
    pub protocol: Protocol,
    /// Where the application listens (127.0.0.1 and `servicePort`, or `port`).
    pub app: SocketAddr,
}

/// Serve `listener` until `ctx.draining` is cancelled; spawn each connection on `ctx.tasks`.
pub async fn run(listener: TcpListener, inbound: Inbound, ctx: Context) -> anyhow::Result<()> {
    let _ = (listener, inbound, ctx);
    anyhow::bail!("inbound: not implemented yet")
}
