//! An outbound listener: the application connects to it in plaintext; the proxy balances over
//! the service's endpoints and originates mTLS, checking the server's SPIFFE ID.
//!
//! CONTRACT (traffic side implements; `main` calls `run` once per Dataplane outbound).

use tokio::net::TcpListener;

use crate::state::Context;

#[derive(Clone, Debug)]
pub struct Outbound {
    /// The service called (`weft.io/service` of the outbound's tags).
    pub service: String,
}

/// Serve `listener` until `ctx.draining` is cancelled; spawn each connection on `ctx.tasks`.
/// L7 (per-request balancing) when the service's protocol is http, http2 or grpc; L4 for tcp.
pub async fn run(listener: TcpListener, outbound: Outbound, ctx: Context) -> anyhow::Result<()> {
    let _ = (listener, outbound, ctx);
    anyhow::bail!("outbound: not implemented yet")
}
