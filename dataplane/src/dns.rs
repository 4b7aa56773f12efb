//! The embedded DNS server (`--dns-address`, UDP and TCP): the mesh's names resolve to their
//! VIPs, every other name goes to the upstream resolver.
//!
//! - A query under `.mesh` ([`DnsName::parse`]): `A` of a name in the VIP table → the VIP,
//!   with the configured TTL (authoritative); any other type of a known name → NOERROR with no
//!   answer (NODATA, so resolvers asking A and AAAA together get the A); an unknown or
//!   malformed `.mesh` name → NXDOMAIN. Nothing under `.mesh` is ever forwarded.
//! - Anything else is forwarded as is to the upstream (`--dns-upstream`, else the first
//!   `nameserver` of /etc/resolv.conf) over the same transport, from a fresh socket, and the
//!   upstream's answer is relayed unchanged (same id); no answer within
//!   [`Config::upstream_timeout`] → SERVFAIL.
//!
//! [`answer`] is the sans-I/O part (bytes in, an action out), tested without sockets; [`run`]
//! does the I/O. The wire format is hickory-proto's.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tracing::Instrument as _;
use weft_core::names::DnsName;

use crate::state::{Context, Vip};

/// How long a forwarded query waits for the upstream before answering SERVFAIL.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// A DNS-over-TCP client that sends nothing for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The largest UDP message read (EDNS clients may send up to this).
const MAX_UDP: usize = 4096;
/// Forwarded UDP queries waiting for the upstream at once; more are answered SERVFAIL at once
/// (a flood costs bounded memory).
pub const MAX_FORWARDS: usize = 256;

/// The DNS server's settings (`--dns-*` flags).
#[derive(Clone, Debug)]
pub struct Config {
    pub address: SocketAddr,
    pub upstream: SocketAddr,
    pub ttl: Duration,
    pub upstream_timeout: Duration,
}

/// What to do with one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send these bytes back.
    Reply(Vec<u8>, &'static str),
    /// Not ours: relay the query to the upstream.
    Forward,
    /// Not even a DNS header: ignore it.
    Drop,
}

/// Answer `query` from the VIP table, or say to forward it. `ttl` in seconds.
pub fn answer(query: &[u8], vips: &BTreeMap<DnsName, Vip>, ttl: u32) -> Action {
    let req = match Message::from_vec(query) {
        Ok(m) => m,
        Err(e) => {
            // A header we can read: say FORMERR with its id; otherwise nothing to answer.
            if query.len() < 12 {
                return Action::Drop;
            }
            tracing::debug!("dns: unreadable query: {e}");
            let id = u16::from_be_bytes([query[0], query[1]]);
            let resp = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
            return reply(resp, "formerr");
        }
    };
    if req.metadata.message_type != MessageType::Query {
        return Action::Drop;
    }
    let [q] = req.queries.as_slice() else {
        return reply(error(&req, ResponseCode::FormErr), "formerr");
    };
    if req.metadata.op_code != OpCode::Query {
        return Action::Forward;
    }
    let name = q.name().to_ascii();
    let dns_name = match DnsName::parse(&name) {
        None => return Action::Forward,
        Some(Err(why)) => {
            tracing::debug!("dns: NXDOMAIN: {why}");
            return reply(error(&req, ResponseCode::NXDomain), "nxdomain");
        }
        Some(Ok(n)) => n,
    };
    let Some(vip) = vips.get(&dns_name) else {
        return reply(error(&req, ResponseCode::NXDomain), "nxdomain");
    };
    let mut resp = response(&req, ResponseCode::NoError);
    let class_ok = matches!(q.query_class(), DNSClass::IN | DNSClass::ANY);
    if class_ok && matches!(q.query_type(), RecordType::A | RecordType::ANY) {
        let mut record = Record::from_rdata(q.name().clone(), ttl, RData::A(A(vip.address)));
        record.dns_class = DNSClass::IN;
        resp.add_answer(record);
        reply(resp, "vip")
    } else {
        reply(resp, "nodata")
    }
}

/// A response to `req`: its id, opcode, RD and CD bits and question; authoritative, with
/// recursion available (we forward), EDNS when the query had it.
fn response(req: &Message, code: ResponseCode) -> Message {
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata = Metadata::response_from_request(&req.metadata);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_available = true;
    resp.metadata.response_code = code;
    resp.queries = req.queries.clone();
    if req.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP as u16);
        resp.set_edns(edns);
    }
    resp
}

fn error(req: &Message, code: ResponseCode) -> Message {
    let mut resp = response(req, code);
    resp.metadata.authoritative = code == ResponseCode::NXDomain;
    resp
}

fn reply(resp: Message, result: &'static str) -> Action {
    match resp.to_vec() {
        Ok(bytes) => Action::Reply(bytes, result),
        Err(e) => {
            tracing::warn!("dns: encoding an answer: {e}");
            Action::Drop
        }
    }
}

/// SERVFAIL for `query` (the upstream did not answer); `None` when it has no readable header.
fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    match Message::from_vec(query) {
        Ok(req) => response(&req, ResponseCode::ServFail).to_vec().ok(),
        Err(_) if query.len() >= 12 => {
            let id = u16::from_be_bytes([query[0], query[1]]);
            Message::error_msg(id, OpCode::Query, ResponseCode::ServFail)
                .to_vec()
                .ok()
        }
        Err(_) => None,
    }
}

/// Serve DNS on `udp` and `tcp` until `ctx.draining` is cancelled. Upstream failures are
/// answered SERVFAIL and logged (at most once per second).
pub async fn run(
    udp: UdpSocket,
    tcp: TcpListener,
    cfg: Config,
    ctx: Context,
) -> anyhow::Result<()> {
    let shared = Arc::new(Shared {
        cfg,
        ctx,
        warned: std::sync::atomic::AtomicU64::new(0),
        started: std::time::Instant::now(),
    });
    tracing::info!(
        address = %shared.cfg.address, upstream = %shared.cfg.upstream,
        "dns listening"
    );
    let udp = Arc::new(udp);
    let forwards = Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDS));
    let tcp_loop = serve_tcp(tcp, shared.clone());
    let udp_loop = serve_udp(udp, shared.clone(), forwards);
    tokio::select! {
        _ = shared.ctx.draining.cancelled() => Ok(()),
        r = tcp_loop => r,
        r = udp_loop => r,
    }
}

struct Shared {
    cfg: Config,
    ctx: Context,
    warned: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
}

impl Shared {
    fn ttl(&self) -> u32 {
        u32::try_from(self.cfg.ttl.as_secs()).unwrap_or(u32::MAX)
    }

    fn answer(&self, query: &[u8]) -> Action {
        let vips = self.ctx.state.current().vips.clone();
        let action = answer(query, &vips, self.ttl());
        match &action {
            Action::Reply(_, result) => self.ctx.metrics.dns_query(result),
            Action::Forward => self.ctx.metrics.dns_query("forwarded"),
            Action::Drop => {}
        }
        action
    }

    fn upstream_failed(&self, what: &str) {
        use std::sync::atomic::Ordering::Relaxed;
        self.ctx.metrics.dns_query("servfail");
        let now = self.started.elapsed().as_millis() as u64 + 1000;
        let last = self.warned.load(Relaxed);
        if now >= last + 1000
            && self
                .warned
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            tracing::warn!(
                upstream = %self.cfg.upstream,
                "dns: upstream {}: {what}; answered SERVFAIL",
                self.cfg.upstream
            );
        }
    }
}

async fn serve_udp(
    udp: Arc<UdpSocket>,
    s: Arc<Shared>,
    forwards: Arc<tokio::sync::Semaphore>,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let (n, peer) = match udp.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors from an earlier send and the like: keep serving.
                tracing::debug!("dns: udp receive: {e}");
                continue;
            }
        };
        let query = &buf[..n];
        match s.answer(query) {
            Action::Reply(bytes, _) => {
                if let Err(e) = udp.send_to(&bytes, peer).await {
                    tracing::debug!(%peer, "dns: udp send: {e}");
                }
            }
            Action::Drop => {}
            Action::Forward => {
                let Ok(permit) = forwards.clone().try_acquire_owned() else {
                    s.upstream_failed(&format!("{MAX_FORWARDS} queries already waiting"));
                    if let Some(bytes) = servfail(query) {
                        let _ = udp.send_to(&bytes, peer).await;
                    }
                    continue;
                };
                let (udp, query, tasks) = (udp.clone(), query.to_vec(), s.ctx.tasks.clone());
                let s = s.clone();
                tasks.spawn(
                    async move {
                        let timeout = s.cfg.upstream_timeout;
                        let r = tokio::time::timeout(timeout, forward_udp(&query, s.cfg.upstream))
                            .await;
                        let bytes = match r {
                            Ok(Ok(bytes)) => Some(bytes),
                            Ok(Err(e)) => {
                                s.upstream_failed(&e.to_string());
                                servfail(&query)
                            }
                            Err(_) => {
                                s.upstream_failed(&format!("no answer within {timeout:?}"));
                                servfail(&query)
                            }
                        };
                        drop(permit);
                        if let Some(bytes) = bytes
                            && let Err(e) = udp.send_to(&bytes, peer).await
                        {
                            tracing::debug!(%peer, "dns: udp send: {e}");
                        }
                    }
                    .instrument(tracing::debug_span!("dns_forward", %peer)),
                );
            }
        }
    }
}

/// Send `query` to `upstream` from a fresh socket (a fresh source port per query) and return
/// the first answer carrying the query's id.
async fn forward_udp(query: &[u8], upstream: SocketAddr) -> io::Result<Vec<u8>> {
    let local: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        if n >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn serve_tcp(listener: TcpListener, s: Arc<Shared>) -> anyhow::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("dns: tcp accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let s2 = s.clone();
        s.ctx.tasks.spawn(
            async move {
                if let Err(e) = tcp_connection(stream, &s2).await {
                    tracing::debug!("dns: tcp: {e}");
                }
            }
            .instrument(tracing::debug_span!("dns_tcp", %peer)),
        );
    }
}

/// Length-prefixed messages, answered in order, until the client closes or idles.
async fn tcp_connection(mut stream: TcpStream, s: &Shared) -> io::Result<()> {
    loop {
        let query = tokio::select! {
            _ = s.ctx.draining.cancelled() => return Ok(()),
            r = tokio::time::timeout(TCP_IDLE, read_frame(&mut stream)) => match r {
                Ok(Ok(Some(q))) => q,
                Ok(Ok(None)) | Err(_) => return Ok(()),
                Ok(Err(e)) => return Err(e),
            },
        };
        let bytes = match s.answer(&query) {
            Action::Reply(bytes, _) => bytes,
            Action::Drop => return Ok(()),
            Action::Forward => {
                let timeout = s.cfg.upstream_timeout;
                match tokio::time::timeout(timeout, forward_tcp(&query, s.cfg.upstream)).await {
                    Ok(Ok(bytes)) => bytes,
                    Ok(Err(e)) => {
                        s.upstream_failed(&format!("tcp: {e}"));
                        servfail(&query).unwrap_or_default()
                    }
                    Err(_) => {
                        s.upstream_failed(&format!("tcp: no answer within {timeout:?}"));
                        servfail(&query).unwrap_or_default()
                    }
                }
            }
        };
        write_frame(&mut stream, &bytes).await?;
    }
}

async fn forward_tcp(query: &[u8], upstream: SocketAddr) -> io::Result<Vec<u8>> {
    let mut conn = TcpStream::connect(upstream).await?;
    write_frame(&mut conn, query).await?;
    read_frame(&mut conn)
        .await?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed without an answer"))
}

/// One length-prefixed DNS message; `None` at a clean end of stream.
async fn read_frame(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

async fn write_frame(stream: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "message over 65535 bytes"))?;
    let mut frame = Vec::with_capacity(msg.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(msg);
    stream.write_all(&frame).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn table() -> BTreeMap<DnsName, Vip> {
        [
            ("backend", None, [240, 0, 0, 1]),
            ("backend", Some("west"), [240, 0, 0, 2]),
        ]
        .into_iter()
        .map(|(service, zone, ip)| {
            let name = DnsName::new(service, zone);
            let vip = Vip {
                name: name.clone(),
                address: Ipv4Addr::from(ip),
                service: service.into(),
                zone: zone.map(str::to_string),
                ports: vec![80],
            };
            (name, vip)
        })
        .collect()
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn ask(name: &str, t: RecordType) -> (Message, &'static str) {
        match answer(&query(name, t), &table(), 30) {
            Action::Reply(bytes, result) => (Message::from_vec(&bytes).unwrap(), result),
            other => panic!("{name}: {other:?}"),
        }
    }

    fn addresses(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_records_of_vips() {
        let (m, result) = ask("backend.mesh.", RecordType::A);
        assert_eq!(result, "vip");
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative && m.metadata.recursion_desired);
        assert_eq!(addresses(&m), [Ipv4Addr::new(240, 0, 0, 1)]);
        assert_eq!(m.answers[0].ttl, 30);
        assert_eq!(m.queries.len(), 1, "the question is echoed");
        // Case-insensitive, pinned names.
        let (m, _) = ask("Backend.WEST.mesh.", RecordType::A);
        assert_eq!(addresses(&m), [Ipv4Addr::new(240, 0, 0, 2)]);
    }

    #[test]
    fn aaaa_of_a_known_name_is_nodata() {
        let (m, result) = ask("backend.mesh.", RecordType::AAAA);
        assert_eq!(result, "nodata");
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn unknown_and_malformed_mesh_names_are_nxdomain() {
        for name in [
            "payments.mesh.",
            "backend.east.mesh.",
            "a.b.c.mesh.",
            "mesh.",
        ] {
            let (m, result) = ask(name, RecordType::A);
            assert_eq!(result, "nxdomain", "{name}");
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        }
    }

    #[test]
    fn other_names_are_forwarded_and_garbage_is_not_answered() {
        let t = table();
        assert_eq!(
            answer(&query("example.com.", RecordType::A), &t, 30),
            Action::Forward
        );
        assert_eq!(
            answer(&query("meshy.org.", RecordType::A), &t, 30),
            Action::Forward
        );
        assert_eq!(answer(b"short", &t, 30), Action::Drop);
        let mut bad = query("backend.mesh.", RecordType::A);
        bad.truncate(16);
        let Action::Reply(bytes, "formerr") = answer(&bad, &t, 30) else {
            panic!("formerr expected")
        };
        assert_eq!(&bytes[..2], &[0x12, 0x34]);
        let sf =
            Message::from_vec(&servfail(&query("example.com.", RecordType::A)).unwrap()).unwrap();
        assert_eq!(sf.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(sf.metadata.id, 0x1234);
    }
}
