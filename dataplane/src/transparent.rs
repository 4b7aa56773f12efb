//! Transparent outbound (`--transparent-outbound-port`): the application calls
//! `http://backend.mesh/` with no proxy settings. iptables (`nat` table, `OUTPUT` chain)
//! redirects the application's TCP connections to the mesh's VIPs to one listener of this
//! proxy on `127.0.0.1:PORT`; [`run`] reads each connection's original destination
//! (`SO_ORIGINAL_DST`), looks `VIP:port` up in the VIP table and hands the connection to the
//! outbound of that VIP's service, exactly as a VIP listener (`--bind-vips`, [`vips`]) would:
//! L7 for http/http2/grpc, L4 for tcp, only the named zone for `<service>.<zone>.mesh`.
//! A destination that is not a `VIP:port` of the table is closed, logged at debug and counted
//! (`weft_dp_transparent_connections_total{result="unknown"}`).
//!
//! The hand-off is direct: one [`outbound::Handler`] per target (service and pinned zone),
//! made on the target's first connection and dropped, with its HTTP connections drained, when
//! the target leaves the table; the redirected connection is served by it like a connection
//! accepted by a VIP listener (no extra hop).
//!
//! [`rules`] builds the iptables commands (`weft-dp transparent-rules`).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use weft_core::names::DnsName;

use crate::outbound::{self, Outbound};
use crate::state::{Context, Vip};
use crate::vips::{self, Target};

/// The transparent listener's settings (`--transparent-outbound-port`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Where iptables redirects to: `127.0.0.1:PORT`.
    pub address: SocketAddr,
}

impl Config {
    pub fn new(port: u16) -> Config {
        Config {
            address: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        }
    }
}

/// The destination the application dialled before iptables `REDIRECT` (or `DNAT`) rewrote
/// it: `getsockopt(SOL_IP, SO_ORIGINAL_DST)`, read from conntrack. A connection that was not
/// translated gives its own local address back (or `ENOENT` without conntrack).
#[cfg(target_os = "linux")]
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddrV4> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a plain getsockopt into a zeroed sockaddr_in of the length we pass; the kernel
    // writes at most `len` bytes.
    unsafe {
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&raw mut addr).cast(),
            &mut len,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        if i32::from(addr.sin_family) != libc::AF_INET {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("SO_ORIGINAL_DST: address family {}", addr.sin_family),
            ));
        }
        Ok(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
            u16::from_be(addr.sin_port),
        ))
    }
}

#[cfg(not(target_os = "linux"))]
pub fn original_dst(_stream: &TcpStream) -> io::Result<SocketAddrV4> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "SO_ORIGINAL_DST needs Linux (iptables)",
    ))
}

/// `VIP:port` → target, computed once per VIP table (the table is shared by `Arc`).
struct Table {
    vips: Arc<BTreeMap<DnsName, Vip>>,
    targets: BTreeMap<SocketAddr, Target>,
}

/// The key of one target's outbound: service and pinned zone.
type Key = (String, Option<String>);

/// The outbound of one target, and what drains it when the target leaves the table.
struct Inner {
    handler: outbound::Handler,
    stop: CancellationToken,
}

/// Serve redirected connections on `listener` until `ctx.draining` is cancelled.
pub async fn run(listener: TcpListener, ctx: Context) -> anyhow::Result<()> {
    let local = listener.local_addr()?;
    tracing::info!(%local, "transparent outbound listening");
    let mut table = Table {
        vips: Arc::default(),
        targets: BTreeMap::new(),
    };
    let mut inners: HashMap<Key, Inner> = HashMap::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = ctx.draining.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(%local, "transparent accept: {e}");
                tokio::select! {
                    _ = ctx.draining.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        let dst = match original_dst(&stream) {
            Ok(dst) if SocketAddr::V4(dst) != local => SocketAddr::V4(dst),
            Ok(_) => {
                ctx.metrics.transparent_connection("not_redirected");
                tracing::debug!(%peer, "transparent: a connection to {local} itself, not redirected by iptables: closed");
                continue;
            }
            Err(e) => {
                ctx.metrics.transparent_connection("not_redirected");
                tracing::debug!(%peer, "transparent: no original destination ({e}): closed");
                continue;
            }
        };
        let snapshot = ctx.state.current();
        if !Arc::ptr_eq(&snapshot.vips, &table.vips) {
            table = Table {
                vips: snapshot.vips.clone(),
                targets: vips::wanted(&snapshot),
            };
            // Stop the internal outbounds of targets that left the table.
            inners.retain(|key, inner| {
                let keep = table
                    .targets
                    .values()
                    .any(|t| t.service == key.0 && t.zone == key.1);
                if !keep {
                    inner.stop.cancel();
                }
                keep
            });
        }
        let Some(target) = table.targets.get(&dst) else {
            ctx.metrics.transparent_connection("unknown");
            tracing::debug!(%peer, %dst, "transparent: {dst} is not a VIP:port of the mesh: closed");
            continue;
        };
        let key = (target.service.clone(), target.zone.clone());
        let inner = inners
            .entry(key)
            .or_insert_with(|| start_inner(target, &ctx));
        ctx.metrics.transparent_connection("vip");
        tracing::debug!(%peer, %dst, vip = %target.name, "transparent: to {}", target.service);
        inner.handler.spawn(stream, peer);
    }
    for (_, inner) in inners {
        inner.stop.cancel();
    }
    tracing::debug!(%local, "transparent outbound stopped accepting");
    Ok(())
}

/// The outbound of `target`, drained when its token is cancelled (or the proxy drains).
fn start_inner(target: &Target, ctx: &Context) -> Inner {
    let stop = ctx.draining.child_token();
    let lctx = Context {
        draining: stop.clone(),
        ..ctx.clone()
    };
    let outbound = Outbound {
        service: target.service.clone(),
        zone: target.zone.clone(),
    };
    tracing::debug!(service = %target.service, zone = ?target.zone, "transparent: outbound started");
    Inner {
        handler: outbound::Handler::new(&outbound, &lctx),
        stop,
    }
}

/// The iptables rules of transparent mode (`weft-dp transparent-rules`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// `--transparent-outbound-port` of the proxy.
    pub outbound_port: u16,
    /// The zone's `--vip-cidr`.
    pub vip_cidr: (Ipv4Addr, u8),
    /// The proxy's `--dns-address` port on 127.0.0.1, to redirect every DNS query to.
    pub dns_port: Option<u16>,
    /// The proxy's user: its own connections are never redirected.
    pub uid: Option<u32>,
}

/// The chain every rule goes in (jumped to from `OUTPUT`).
pub const CHAIN: &str = "WEFT_OUTPUT";

/// Parse `a.b.c.d/n`; errors say what is expected.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || format!("{s:?} is not an IPv4 CIDR (expected e.g. 127.240.0.0/12)");
    let (ip, len) = s.split_once('/').ok_or_else(bad)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(bad)?;
    Ok((ip, len))
}

impl Rules {
    /// The `iptables -t nat` commands, in order. `--dns-port` needs `--uid`: without it the
    /// proxy's own upstream queries would be redirected back to it.
    pub fn commands(&self) -> Result<Vec<String>, String> {
        if self.dns_port.is_some() && self.uid.is_none() {
            return Err(
                "--dns-port needs --uid (the user weft-dp runs as): without it the proxy's \
                 own queries to the upstream resolver would be redirected back to it"
                    .into(),
            );
        }
        let nat = "iptables -t nat";
        let (ip, len) = self.vip_cidr;
        let mut out = vec![format!("{nat} -N {CHAIN}")];
        if let Some(uid) = self.uid {
            out.push(format!(
                "{nat} -A {CHAIN} -m owner --uid-owner {uid} -j RETURN"
            ));
        }
        out.push(format!(
            "{nat} -A {CHAIN} -p tcp -d {ip}/{len} -j REDIRECT --to-ports {}",
            self.outbound_port
        ));
        if let Some(dns) = self.dns_port {
            for proto in ["udp", "tcp"] {
                out.push(format!(
                    "{nat} -A {CHAIN} -p {proto} --dport 53 -j REDIRECT --to-ports {dns}"
                ));
            }
        }
        out.push(format!("{nat} -A OUTPUT -j {CHAIN}"));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_redirect_the_vips_and_dns_but_not_the_proxy() {
        let r = Rules {
            outbound_port: 15001,
            vip_cidr: parse_cidr("127.240.0.0/12").unwrap(),
            dns_port: None,
            uid: None,
        };
        assert_eq!(
            r.commands().unwrap(),
            [
                "iptables -t nat -N WEFT_OUTPUT",
                "iptables -t nat -A WEFT_OUTPUT -p tcp -d 127.240.0.0/12 -j REDIRECT --to-ports 15001",
                "iptables -t nat -A OUTPUT -j WEFT_OUTPUT",
            ]
        );
        let r = Rules {
            dns_port: Some(15053),
            uid: Some(1337),
            ..r
        };
        assert_eq!(
            r.commands().unwrap(),
            [
                "iptables -t nat -N WEFT_OUTPUT",
                "iptables -t nat -A WEFT_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "iptables -t nat -A WEFT_OUTPUT -p tcp -d 127.240.0.0/12 -j REDIRECT --to-ports 15001",
                "iptables -t nat -A WEFT_OUTPUT -p udp --dport 53 -j REDIRECT --to-ports 15053",
                "iptables -t nat -A WEFT_OUTPUT -p tcp --dport 53 -j REDIRECT --to-ports 15053",
                "iptables -t nat -A OUTPUT -j WEFT_OUTPUT",
            ]
        );
        let err = Rules { uid: None, ..r }.commands().unwrap_err();
        assert!(err.contains("--dns-port needs --uid"), "{err}");
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("240.0.0.0/4").unwrap(),
            ("240.0.0.0".parse().unwrap(), 4)
        );
        for bad in ["240.0.0.0", "240.0.0.0/33", "x/4", "::1/128"] {
            let err = parse_cidr(bad).unwrap_err();
            assert!(err.contains("expected e.g. 127.240.0.0/12"), "{err}");
        }
    }
}
