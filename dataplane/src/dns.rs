//! The embedded DNS server (`--dns-address`).

use std::net::SocketAddr;
use std::time::Duration;

/// How long a forwarded query waits for the upstream before answering SERVFAIL.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Debug)]
pub struct Config {
    pub address: SocketAddr,
    pub upstream: SocketAddr,
    pub ttl: Duration,
    pub upstream_timeout: Duration,
}
