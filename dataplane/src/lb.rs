//! Endpoint selection: round robin or least-request, with passive health (endpoints that
//! refuse connections are ejected for a while).
//!
//! One [`Balancer`] per outbound. It follows the service's endpoint set in [`State`] and
//! builds its per-endpoint state lazily, on the first pick: an outbound nobody calls holds
//! a name and a watch receiver, nothing per endpoint. Each endpoint carries an extension `T`
//! (the outbound's connection pool), dropped with the endpoint when it leaves the set (once
//! the requests still using it finish).
//!
//! A pick is one uncontended mutex and a few atomics: the endpoint set is rebuilt only when
//! the watched configuration changed (an atomic version check), and the clock is read only
//! when some endpoint is ejected.
//!
//! Locality: endpoints in the proxy's own zone come first; another zone's endpoints (its
//! ingress, weighted by the instances behind it) only when no local endpoint is healthy (none,
//! or all ejected or already tried): failover. Traffic returns to local endpoints as soon as
//! one is healthy again (its ejection ends, or a new one appears). MeshLoadBalancingStrategy
//! `localityAwareness: {disabled: true}` balances over all endpoints alike (weighted). A
//! balancer pinned to a zone ([`Locality::pinned`], `<service>.<zone>.mesh`) only uses that
//! zone's endpoints.
//!
//! Passive health: the caller reports connection failures with [`Endpoint::eject`] (refused,
//! timed out, TLS handshake failed): the endpoint is skipped for [`EJECT_BASE`], doubling on
//! each consecutive ejection up to [`EJECT_MAX`]; a successful connection
//! ([`Endpoint::connected`]) resets it. When every endpoint left to try is ejected the
//! balancer picks among them anyway (panic mode) rather than fail.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use weft_core::Kind;
use weft_core::policy::ProxyView;
use weft_core::spec::fields::Protocol;

use crate::state::{self, Service, Snapshot, State};
use crate::timeouts::Timeouts;

/// First ejection of an endpoint.
pub const EJECT_BASE: Duration = Duration::from_secs(5);
/// The longest ejection, however many consecutive failures.
pub const EJECT_MAX: Duration = Duration::from_secs(60);
/// At most this many endpoints are tried for one request or connection.
pub const MAX_ATTEMPTS: usize = 8;
/// Least-request compares every endpoint up to this many; above, `choiceCount` random ones.
const FULL_SCAN: usize = 32;
/// A weighted round-robin schedule is at most this long (weights are scaled down above).
const MAX_SCHEDULE: u64 = 4096;

/// How endpoints are chosen (MeshLoadBalancingStrategy `loadBalancer.type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
    /// Fewest requests in flight relative to weight; `choices` random candidates when there
    /// are many endpoints.
    LeastRequest {
        choices: u32,
    },
}

impl Algorithm {
    /// The algorithm the view asks for `service`: RoundRobin unless its
    /// MeshLoadBalancingStrategy says LeastRequest (RingHash, Random and Maglev are not
    /// implemented and fall back to round robin).
    pub fn for_service(view: &ProxyView, service: &str) -> Algorithm {
        let lb = view
            .outbounds
            .get(service)
            .and_then(|confs| confs.get(&Kind::MeshLoadBalancingStrategy))
            .and_then(|conf| conf.get("loadBalancer"));
        match lb.and_then(|lb| lb.get("type")).and_then(|t| t.as_str()) {
            Some("LeastRequest") => Algorithm::LeastRequest {
                choices: lb
                    .and_then(|lb| lb.pointer("/leastRequest/choiceCount"))
                    .and_then(|n| n.as_u64())
                    .map_or(2, |n| n.clamp(2, 64) as u32),
            },
            _ => Algorithm::RoundRobin,
        }
    }
}

/// Which endpoints of the service a balancer prefers or keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Locality {
    /// The proxy's own zone: its endpoints are used first. Empty: no preference (and an
    /// endpoint without a zone counts as local).
    pub local_zone: String,
    /// Only endpoints of this zone (the VIP of `<service>.<zone>.mesh`).
    pub pinned: Option<String>,
}

impl Locality {
    pub fn new(local_zone: &str) -> Locality {
        Locality {
            local_zone: local_zone.to_string(),
            pinned: None,
        }
    }

    pub fn pinned(local_zone: &str, zone: &str) -> Locality {
        Locality {
            local_zone: local_zone.to_string(),
            pinned: Some(zone.to_string()),
        }
    }

    /// The zone of `ep` (ours when it says none).
    fn zone_of<'a>(&'a self, ep: &'a state::Endpoint) -> &'a str {
        if ep.zone.is_empty() {
            &self.local_zone
        } else {
            &ep.zone
        }
    }
}

/// Whether the view turns locality awareness off for `service` (MeshLoadBalancingStrategy
/// `localityAwareness: {disabled: true}`).
pub fn locality_disabled(view: &ProxyView, service: &str) -> bool {
    view.outbounds
        .get(service)
        .and_then(|confs| confs.get(&Kind::MeshLoadBalancingStrategy))
        .and_then(|conf| conf.pointer("/localityAwareness/disabled"))
        .and_then(|d| d.as_bool())
        == Some(true)
}

/// One endpoint of the balanced service, with its health and load.
#[derive(Debug)]
pub struct Endpoint<T> {
    pub endpoint: state::Endpoint,
    /// Resolved once when the address is an IP.
    pub addr: Option<SocketAddr>,
    /// The service's protocol and the mesh's mTLS when this endpoint state was made; a change
    /// of either makes new endpoint states (and so new connections).
    pub protocol: Protocol,
    pub mtls: bool,
    in_flight: AtomicU32,
    /// Milliseconds since [`epoch`]; 0 when never ejected.
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    picks: AtomicU64,
    connect_failures: AtomicU64,
    /// The caller's per-endpoint state (the connection pool).
    pub ext: T,
}

impl<T> Endpoint<T> {
    /// Report a connection-level failure (refused, timed out, TLS handshake): skip this
    /// endpoint for a while, longer after each consecutive failure.
    pub fn eject(&self) -> Duration {
        self.connect_failures.fetch_add(1, Relaxed);
        let n = self.ejections.fetch_add(1, Relaxed).min(16);
        let d = EJECT_BASE.saturating_mul(1 << n).min(EJECT_MAX);
        let until = now_ms() + d.as_millis() as u64;
        self.ejected_until.store(until.max(1), Relaxed);
        d
    }

    /// Report a successful connection: the endpoint is healthy again.
    pub fn connected(&self) {
        if self.ejections.load(Relaxed) != 0 {
            self.ejections.store(0, Relaxed);
        }
        if self.ejected_until.load(Relaxed) != 0 {
            self.ejected_until.store(0, Relaxed);
        }
    }

    fn ejected(&self, now: &mut Option<u64>) -> bool {
        let until = self.ejected_until.load(Relaxed);
        until != 0 && until > *now.get_or_insert_with(now_ms)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// `address:port` of the endpoint.
    pub fn authority(&self) -> String {
        self.endpoint.authority()
    }
}

/// A picked endpoint. It counts as one request (or connection) in flight on the endpoint
/// until dropped.
#[derive(Debug)]
pub struct Guard<T>(Arc<Endpoint<T>>);

impl<T> Guard<T> {
    pub fn endpoint(&self) -> &Arc<Endpoint<T>> {
        &self.0
    }
}

impl<T> std::ops::Deref for Guard<T> {
    type Target = Endpoint<T>;
    fn deref(&self) -> &Endpoint<T> {
        &self.0
    }
}

impl<T> Drop for Guard<T> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// The endpoints one request (or connection) already tried; no allocation.
#[derive(Debug, Default)]
pub struct Tried {
    ids: [usize; MAX_ATTEMPTS],
    len: usize,
}

impl Tried {
    pub fn new() -> Tried {
        Tried::default()
    }

    pub fn add<T>(&mut self, e: &Endpoint<T>) {
        if self.len < MAX_ATTEMPTS {
            self.ids[self.len] = e as *const Endpoint<T> as usize;
            self.len += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every allowed attempt was made.
    pub fn is_full(&self) -> bool {
        self.len == MAX_ATTEMPTS
    }

    fn contains<T>(&self, e: &Endpoint<T>) -> bool {
        let id = e as *const Endpoint<T> as usize;
        self.ids[..self.len].contains(&id)
    }
}

/// The outcome of [`Balancer::pick`].
#[derive(Debug)]
pub enum Pick<T> {
    Endpoint(Guard<T>),
    /// The service is unknown or has no endpoints.
    NoEndpoints,
    /// Every endpoint (or [`MAX_ATTEMPTS`]) was tried already.
    Exhausted,
}

/// What `/config`, logs and tests see of an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub authority: String,
    pub zone: String,
    /// In the preferred tier (the proxy's own zone, or every endpoint without locality).
    pub preferred: bool,
    pub weight: u32,
    pub in_flight: u32,
    pub ejected: bool,
    /// Times this endpoint was picked.
    pub picks: u64,
    /// Connection failures reported with [`Endpoint::eject`].
    pub connect_failures: u64,
}

/// Balances one outbound's service over its current endpoints.
pub struct Balancer<T> {
    service: String,
    locality: Locality,
    inner: Mutex<Inner<T>>,
}

struct Inner<T> {
    rx: watch::Receiver<Arc<Snapshot>>,
    /// What `set` was built from.
    service: Option<Arc<Service>>,
    view: Option<Arc<ProxyView>>,
    set: Set<T>,
    /// MeshTimeout for this service, from `view`.
    timeouts: Timeouts,
}

struct Set<T> {
    algorithm: Algorithm,
    /// Whether local endpoints are preferred (else one tier holds them all).
    locality: bool,
    /// The preferred tier first (local zone), then the failover tier (other zones).
    endpoints: Vec<Arc<Endpoint<T>>>,
    weights: Vec<u32>,
    tiers: [Tier; 2],
    /// xorshift state for least-request sampling.
    rand: u64,
}

/// A contiguous range of `Set::endpoints` balanced on its own.
#[derive(Debug, Default)]
struct Tier {
    start: usize,
    end: usize,
    /// Weighted round robin: indexes into `endpoints`, smooth order; empty when every
    /// weight of the tier is the same.
    schedule: Vec<u32>,
    cursor: usize,
}

impl<T> Default for Set<T> {
    fn default() -> Self {
        Set {
            algorithm: Algorithm::RoundRobin,
            locality: false,
            endpoints: Vec::new(),
            weights: Vec::new(),
            tiers: Default::default(),
            rand: 0x9E37_79B9_7F4A_7C15,
        }
    }
}

impl<T: Default> Balancer<T> {
    /// A balancer for `service` without locality preference. Cheap: nothing per endpoint
    /// until the first pick.
    pub fn new(service: &str, state: &State) -> Balancer<T> {
        Balancer::with_locality(service, Locality::default(), state)
    }

    /// A balancer for `service` that prefers `locality.local_zone` (or keeps only
    /// `locality.pinned`).
    pub fn with_locality(service: &str, locality: Locality, state: &State) -> Balancer<T> {
        let mut rx = state.subscribe();
        rx.mark_changed();
        Balancer {
            service: service.to_string(),
            locality,
            inner: Mutex::new(Inner {
                rx,
                service: None,
                view: None,
                set: Set::default(),
                timeouts: Timeouts::default(),
            }),
        }
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn locality(&self) -> &Locality {
        &self.locality
    }

    /// Pick an endpoint not in `tried`: healthy ones first, ejected ones when nothing else
    /// is left (panic mode).
    pub fn pick(&self, tried: &Tried) -> Pick<T> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.refresh(&self.service, &self.locality);
        let set = &mut inner.set;
        if set.endpoints.is_empty() {
            return Pick::NoEndpoints;
        }
        if tried.is_full() {
            return Pick::Exhausted;
        }
        let mut now = None;
        // Healthy local, healthy remote, then panic mode in the same order.
        let found = set
            .select(0, tried, &mut now, false)
            .or_else(|| set.select(1, tried, &mut now, false))
            .or_else(|| set.select(0, tried, &mut now, true))
            .or_else(|| set.select(1, tried, &mut now, true));
        match found {
            Some(i) => {
                let e = set.endpoints[i].clone();
                e.in_flight.fetch_add(1, Relaxed);
                e.picks.fetch_add(1, Relaxed);
                Pick::Endpoint(Guard(e))
            }
            None => Pick::Exhausted,
        }
    }

    /// The current endpoints (after applying any configuration change).
    pub fn status(&self) -> Vec<Status> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.refresh(&self.service, &self.locality);
        let mut now = None;
        let set = &inner.set;
        set.endpoints
            .iter()
            .zip(&set.weights)
            .enumerate()
            .map(|(i, (e, w))| Status {
                authority: e.authority(),
                zone: e.endpoint.zone.clone(),
                preferred: i < set.tiers[0].end,
                weight: *w,
                in_flight: e.in_flight(),
                ejected: e.ejected(&mut now),
                picks: e.picks.load(Relaxed),
                connect_failures: e.connect_failures.load(Relaxed),
            })
            .collect()
    }

    /// The MeshTimeout timeouts for calls to this service now.
    pub fn timeouts(&self) -> Timeouts {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.refresh(&self.service, &self.locality);
        inner.timeouts
    }

    /// The algorithm in use now.
    pub fn algorithm(&self) -> Algorithm {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.refresh(&self.service, &self.locality);
        inner.set.algorithm
    }
}

impl<T: Default> Inner<T> {
    /// Rebuild the set if the service's endpoints or the view changed since the last pick.
    fn refresh(&mut self, name: &str, locality: &Locality) {
        if !self.rx.has_changed().unwrap_or(false) {
            return;
        }
        let snapshot = self.rx.borrow_and_update().clone();
        let service = snapshot.services.get(name).cloned();
        let same_service = match (&service, &self.service) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        let same_view = self
            .view
            .as_ref()
            .is_some_and(|v| Arc::ptr_eq(v, &snapshot.view));
        if same_service && same_view {
            return;
        }
        let view = snapshot.view.clone();
        if !same_view {
            self.timeouts = Timeouts::outbound(&view, name);
        }
        let algorithm = Algorithm::for_service(&view, name);
        let prefer_local = !locality.local_zone.is_empty()
            && locality.pinned.is_none()
            && !locality_disabled(&view, name);
        let mtls = view.mtls;
        if same_service
            && self.set.algorithm == algorithm
            && self.set.locality == prefer_local
            && self.set.mtls() == Some(mtls)
        {
            self.view = Some(view);
            return;
        }
        let mut old: HashMap<(&str, u16), &Arc<Endpoint<T>>> = self
            .set
            .endpoints
            .iter()
            .map(|e| ((e.endpoint.address.as_str(), e.endpoint.port), e))
            .collect();
        let mut endpoints = Vec::new();
        let mut weights = Vec::new();
        let mut local = 0;
        if let Some(svc) = &service {
            // Local endpoints first (when preferred), then the others; a pinned balancer
            // keeps only its zone's.
            let keep = |ep: &&state::Endpoint| {
                locality
                    .pinned
                    .as_deref()
                    .is_none_or(|z| locality.zone_of(ep) == z)
            };
            let is_local =
                |ep: &state::Endpoint| !prefer_local || locality.zone_of(ep) == locality.local_zone;
            let kept = svc.endpoints.iter().filter(keep);
            let ordered = kept
                .clone()
                .filter(|ep| is_local(ep))
                .chain(kept.filter(|ep| !is_local(ep)));
            endpoints.reserve_exact(svc.endpoints.len());
            weights.reserve_exact(svc.endpoints.len());
            for ep in ordered {
                if is_local(ep) {
                    local += 1;
                }
                // Same address, protocol, mTLS and zone: keep the state and its pools (a
                // zone change changes the SNI, so it gets new connections).
                let reuse = old.remove(&(ep.address.as_str(), ep.port)).filter(|e| {
                    e.protocol == svc.protocol
                        && e.mtls == mtls
                        && e.endpoint.zone == ep.zone
                        && e.endpoint.server_identity == ep.server_identity
                });
                endpoints.push(match reuse {
                    Some(e) => e.clone(),
                    None => Arc::new(Endpoint {
                        endpoint: ep.clone(),
                        addr: ep.socket_addr(),
                        protocol: svc.protocol,
                        mtls,
                        in_flight: AtomicU32::new(0),
                        ejected_until: AtomicU64::new(0),
                        ejections: AtomicU32::new(0),
                        picks: AtomicU64::new(0),
                        connect_failures: AtomicU64::new(0),
                        ext: T::default(),
                    }),
                });
                weights.push(ep.weight.max(1));
            }
        }
        drop(old);
        let len = endpoints.len();
        let tier = |start: usize, end: usize, cursor: usize| Tier {
            start,
            end,
            schedule: schedule(&weights[start..end])
                .into_iter()
                .map(|i| i + start as u32)
                .collect(),
            cursor,
        };
        let tiers = [
            tier(0, local, self.set.tiers[0].cursor),
            tier(local, len, self.set.tiers[1].cursor),
        ];
        let rand = self.set.rand;
        self.set = Set {
            algorithm,
            locality: prefer_local,
            endpoints,
            weights,
            tiers,
            rand,
        };
        self.service = service;
        self.view = Some(view);
    }
}

impl<T> Set<T> {
    fn mtls(&self) -> Option<bool> {
        self.endpoints.first().map(|e| e.mtls)
    }

    fn usable(&self, i: usize, tried: &Tried, now: &mut Option<u64>, panic: bool) -> bool {
        let e = &self.endpoints[i];
        !tried.contains(e) && (panic || !e.ejected(now))
    }

    fn select(
        &mut self,
        tier: usize,
        tried: &Tried,
        now: &mut Option<u64>,
        panic: bool,
    ) -> Option<usize> {
        if self.tiers[tier].start == self.tiers[tier].end {
            return None;
        }
        match self.algorithm {
            Algorithm::RoundRobin => self.round_robin(tier, tried, now, panic),
            Algorithm::LeastRequest { choices } => {
                self.least_request(tier, choices, tried, now, panic)
            }
        }
    }

    fn round_robin(
        &mut self,
        tier: usize,
        tried: &Tried,
        now: &mut Option<u64>,
        panic: bool,
    ) -> Option<usize> {
        let t = &self.tiers[tier];
        let (start, n) = (t.start, t.end - t.start);
        let len = if t.schedule.is_empty() {
            n
        } else {
            t.schedule.len()
        };
        let mut cursor = t.cursor;
        let mut found = None;
        for _ in 0..len {
            let slot = cursor % len;
            cursor = cursor.wrapping_add(1);
            let i = if t.schedule.is_empty() {
                start + slot
            } else {
                t.schedule[slot] as usize
            };
            if self.usable(i, tried, now, panic) {
                found = Some(i);
                break;
            }
        }
        self.tiers[tier].cursor = cursor;
        found
    }

    fn least_request(
        &mut self,
        tier: usize,
        choices: u32,
        tried: &Tried,
        now: &mut Option<u64>,
        panic: bool,
    ) -> Option<usize> {
        let (start, n) = (
            self.tiers[tier].start,
            self.tiers[tier].end - self.tiers[tier].start,
        );
        // Lower is better: (in flight + 1) / weight, compared without division.
        let better = |a: usize, b: usize, s: &Set<T>| {
            let la = u64::from(s.endpoints[a].in_flight()) + 1;
            let lb = u64::from(s.endpoints[b].in_flight()) + 1;
            la * u64::from(s.weights[b]) < lb * u64::from(s.weights[a])
        };
        let mut best: Option<usize> = None;
        if n <= FULL_SCAN {
            // Start where the last pick left off so that ties rotate.
            let first = self.tiers[tier].cursor;
            self.tiers[tier].cursor = first.wrapping_add(1);
            for k in 0..n {
                let i = start + (first + k) % n;
                if self.usable(i, tried, now, panic) && best.is_none_or(|b| better(i, b, self)) {
                    best = Some(i);
                }
            }
            return best;
        }
        for _ in 0..choices.max(2) * 2 {
            self.rand ^= self.rand << 13;
            self.rand ^= self.rand >> 7;
            self.rand ^= self.rand << 17;
            let i = start + (self.rand % n as u64) as usize;
            if self.usable(i, tried, now, panic) && best.is_none_or(|b| better(i, b, self)) {
                best = Some(i);
            }
        }
        // Unlucky draws (most endpoints tried or ejected): fall back to round robin.
        best.or_else(|| self.round_robin(tier, tried, now, panic))
    }
}

/// A smooth weighted round-robin order (nginx's), or empty when all weights are equal.
fn schedule(weights: &[u32]) -> Vec<u32> {
    if weights.windows(2).all(|w| w[0] == w[1]) {
        return Vec::new();
    }
    let g = weights.iter().fold(0u32, |g, &w| gcd(g, w));
    let mut w: Vec<u64> = weights.iter().map(|&x| u64::from(x / g)).collect();
    let total: u64 = w.iter().sum();
    if total > MAX_SCHEDULE {
        for x in &mut w {
            *x = (*x * MAX_SCHEDULE / total).max(1);
        }
    }
    let total: u64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        out.push(best as u32);
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::dataplane::v1 as pb;

    fn update(endpoints: &[(u32, u32)], view: &str) -> pb::Update {
        pb::Update {
            nonce: 1,
            full: true,
            view_json: Some(view.to_string()),
            services: vec![pb::ServiceEndpoints {
                service: "backend".into(),
                mesh: String::new(),
                protocol: "http".into(),
                endpoints: endpoints
                    .iter()
                    .map(|&(port, weight)| pb::Endpoint {
                        address: "127.0.0.1".into(),
                        port,
                        dataplane: format!("dp-{port}"),
                        zone: "east".into(),
                        tags: Default::default(),
                        weight,
                        server_identity: String::new(),
                    })
                    .collect(),
                external: None,
            }],
            removed_services: vec![],
            vips_replace: false,
            vips: vec![],
        }
    }

    const RR: &str = r#"{"mesh":"default","dataplane":"web","inbounds":[],"outbounds":{}}"#;
    const LR: &str = r#"{"mesh":"default","dataplane":"web","inbounds":[],"outbounds":{
        "backend":{"MeshLoadBalancingStrategy":{"loadBalancer":{"type":"LeastRequest"}}}}}"#;

    fn port(p: &Pick<()>) -> u16 {
        match p {
            Pick::Endpoint(g) => g.endpoint.port,
            other => panic!("no endpoint: {other:?}"),
        }
    }

    fn mk(endpoints: &[(u32, u32)], view: &str) -> (State, Balancer<()>) {
        let state = State::new();
        state.apply(&update(endpoints, view)).unwrap();
        let b = Balancer::new("backend", &state);
        (state, b)
    }

    #[test]
    fn round_robin_in_order_and_weighted() {
        let (state, b) = mk(&[(1, 1), (2, 1), (3, 1)], RR);
        let ports: Vec<u16> = (0..6).map(|_| port(&b.pick(&Tried::new()))).collect();
        assert_eq!(ports, [1, 2, 3, 1, 2, 3]);
        state.apply(&update(&[(1, 3), (2, 1)], RR)).unwrap();
        let ports: Vec<u16> = (0..8).map(|_| port(&b.pick(&Tried::new()))).collect();
        assert_eq!(ports.iter().filter(|p| **p == 1).count(), 6, "{ports:?}");
        // Smooth: the light endpoint is not starved in a row of the heavy one.
        assert!(ports[..4].contains(&2), "{ports:?}");
    }

    #[test]
    fn least_request_prefers_the_idle_and_honours_weight() {
        let (state, b) = mk(&[(1, 1), (2, 1)], LR);
        assert_eq!(b.algorithm(), Algorithm::LeastRequest { choices: 2 });
        let busy = b.pick(&Tried::new());
        let busy_port = port(&busy);
        for _ in 0..5 {
            assert_ne!(port(&b.pick(&Tried::new())), busy_port);
        }
        drop(busy);
        state.apply(&update(&[(1, 4), (2, 1)], LR)).unwrap();
        // Four in flight on the weight-4 endpoint weigh as one on the other.
        let held: Vec<_> = (0..5).map(|_| b.pick(&Tried::new())).collect();
        let on_1 = held.iter().filter(|p| port(p) == 1).count();
        assert!(on_1 >= 3, "{on_1} of 5 on the heavy endpoint");
    }

    #[test]
    fn ejected_endpoints_are_skipped_until_all_are() {
        let (_state, b) = mk(&[(1, 1), (2, 1)], RR);
        let Pick::Endpoint(one) = b.pick(&Tried::new()) else {
            panic!()
        };
        assert_eq!(one.eject(), EJECT_BASE);
        for _ in 0..4 {
            assert_eq!(port(&b.pick(&Tried::new())), 2);
        }
        // Tried and the other ejected: panic mode still gives the ejected one.
        let mut tried = Tried::new();
        let Pick::Endpoint(two) = b.pick(&tried) else {
            panic!()
        };
        tried.add(&two);
        assert_eq!(port(&b.pick(&tried)), 1);
        tried.add(&one);
        assert!(matches!(b.pick(&tried), Pick::Exhausted));
        // Repeated ejections grow, capped; a connection resets.
        assert_eq!(one.eject(), EJECT_BASE * 2);
        for _ in 0..10 {
            one.eject();
        }
        assert_eq!(one.eject(), EJECT_MAX);
        one.connected();
        assert!(!b.status()[0].ejected);
        assert_eq!(one.eject(), EJECT_BASE);
    }

    #[test]
    fn set_changes_apply_and_keep_surviving_endpoints() {
        let (state, b) = mk(&[(1, 1), (2, 1)], RR);
        let Pick::Endpoint(g) = b.pick(&Tried::new()) else {
            panic!()
        };
        let kept = g.endpoint().clone();
        drop(g);
        state.apply(&update(&[(1, 1), (3, 1)], RR)).unwrap();
        let ports: Vec<u16> = (0..4).map(|_| port(&b.pick(&Tried::new()))).collect();
        assert!(!ports.contains(&2) && ports.contains(&3), "{ports:?}");
        let Pick::Endpoint(g) = b.pick(&Tried::new()) else {
            panic!()
        };
        let again = if g.endpoint.port == 1 {
            g.endpoint().clone()
        } else {
            drop(g);
            let Pick::Endpoint(g) = b.pick(&Tried::new()) else {
                panic!()
            };
            g.endpoint().clone()
        };
        assert!(Arc::ptr_eq(&kept, &again), "endpoint 1's state survives");
        state.apply(&update(&[], RR)).unwrap();
        assert!(matches!(b.pick(&Tried::new()), Pick::NoEndpoints));
        let other = Balancer::<()>::new("unknown", &state);
        assert!(matches!(other.pick(&Tried::new()), Pick::NoEndpoints));
    }

    #[test]
    fn schedule_is_smooth_and_bounded() {
        assert!(schedule(&[1, 1, 1]).is_empty());
        assert_eq!(schedule(&[2, 1]), [0, 1, 0]);
        assert_eq!(schedule(&[10, 5]), [0, 1, 0]);
        let s = schedule(&[1_000_000, 1]);
        assert!(s.len() as u64 <= MAX_SCHEDULE + 1 && s.contains(&1));
    }

    fn zoned(endpoints: &[(u32, u32, &str)], view: &str) -> pb::Update {
        let mut u = update(&[], view);
        u.services[0].endpoints = endpoints
            .iter()
            .map(|&(port, weight, zone)| pb::Endpoint {
                address: "127.0.0.1".into(),
                port,
                dataplane: format!("dp-{port}"),
                zone: zone.into(),
                tags: Default::default(),
                weight,
                server_identity: String::new(),
            })
            .collect();
        u
    }

    fn mk_local(
        endpoints: &[(u32, u32, &str)],
        view: &str,
        locality: Locality,
    ) -> (State, Balancer<()>) {
        let state = State::new();
        state.apply(&zoned(endpoints, view)).unwrap();
        let b = Balancer::with_locality("backend", locality, &state);
        (state, b)
    }

    fn picks(b: &Balancer<()>, n: usize) -> Vec<u16> {
        (0..n).map(|_| port(&b.pick(&Tried::new()))).collect()
    }

    const NO_LOCALITY: &str = r#"{"mesh":"default","dataplane":"web","inbounds":[],"outbounds":{
        "backend":{"MeshLoadBalancingStrategy":{"localityAwareness":{"disabled":true}}}}}"#;

    #[test]
    fn local_zone_first_then_failover_and_back() {
        // Listed remote first: order on the wire does not matter.
        let (state, b) = mk_local(
            &[
                (3, 2, "west"),
                (1, 1, "east"),
                (2, 1, "east"),
                (4, 1, "north"),
            ],
            RR,
            Locality::new("east"),
        );
        assert_eq!(picks(&b, 4), [1, 2, 1, 2]);
        // One local ejected: the other local takes everything.
        let Pick::Endpoint(one) = b.pick(&Tried::new()) else {
            panic!()
        };
        assert_eq!(one.endpoint.port, 1);
        one.eject();
        assert_eq!(picks(&b, 3), [2, 2, 2]);
        // Both ejected: failover to the other zones, weighted (west's ingress has 2).
        let Pick::Endpoint(two) = b.pick(&Tried::new()) else {
            panic!()
        };
        two.eject();
        let remote = picks(&b, 6);
        assert_eq!(remote.iter().filter(|p| **p == 3).count(), 4, "{remote:?}");
        assert_eq!(remote.iter().filter(|p| **p == 4).count(), 2, "{remote:?}");
        // A local endpoint is healthy again: traffic returns.
        one.connected();
        assert_eq!(picks(&b, 3), [1, 1, 1]);
        // A retry after the local one failed (tried) goes remote.
        let mut tried = Tried::new();
        tried.add(&*one);
        assert_ne!(port(&b.pick(&tried)), 2, "ejected local not before remote");
        // No local endpoints at all: remote; a new local one appears: back to it.
        state
            .apply(&zoned(&[(3, 1, "west"), (4, 1, "north")], RR))
            .unwrap();
        assert!(picks(&b, 4).iter().all(|p| *p == 3 || *p == 4));
        state
            .apply(&zoned(&[(3, 1, "west"), (5, 1, "east")], RR))
            .unwrap();
        assert_eq!(picks(&b, 3), [5, 5, 5]);
        let status = b.status();
        assert_eq!(status[0].authority, "127.0.0.1:5");
        assert!(status[0].preferred && !status[1].preferred);
        // Everything ejected: panic mode prefers local.
        for ep in [5, 3] {
            let mut tried = Tried::new();
            loop {
                let Pick::Endpoint(g) = b.pick(&tried) else {
                    panic!()
                };
                tried.add(&*g);
                if g.endpoint.port == ep {
                    g.eject();
                    break;
                }
            }
        }
        assert_eq!(port(&b.pick(&Tried::new())), 5);
    }

    #[test]
    fn locality_disabled_balances_over_all_weighted() {
        let (_state, b) = mk_local(
            &[(1, 1, "east"), (2, 3, "west")],
            NO_LOCALITY,
            Locality::new("east"),
        );
        let ports = picks(&b, 8);
        assert_eq!(ports.iter().filter(|p| **p == 2).count(), 6, "{ports:?}");
        assert!(b.status().iter().all(|s| s.preferred));
        // Turned back on by a view change.
        let (state, b) = mk_local(
            &[(1, 1, "east"), (2, 3, "west")],
            NO_LOCALITY,
            Locality::new("east"),
        );
        state
            .apply(&zoned(&[(1, 1, "east"), (2, 3, "west")], RR))
            .unwrap();
        assert_eq!(picks(&b, 4), [1, 1, 1, 1]);
    }

    #[test]
    fn least_request_stays_local() {
        let (_state, b) = mk_local(
            &[(1, 1, "east"), (2, 1, "west"), (3, 1, "east")],
            LR,
            Locality::new("east"),
        );
        let held: Vec<_> = (0..6).map(|_| b.pick(&Tried::new())).collect();
        assert!(held.iter().all(|p| port(p) != 2), "{held:?}");
        assert_eq!(held.iter().filter(|p| port(p) == 1).count(), 3);
    }

    #[test]
    fn pinned_uses_only_its_zone_even_when_ejected() {
        let (state, b) = mk_local(
            &[(1, 1, "east"), (2, 1, "west"), (3, 1, "west")],
            RR,
            Locality::pinned("east", "west"),
        );
        let ports = picks(&b, 4);
        assert_eq!(ports, [2, 3, 2, 3]);
        for _ in 0..2 {
            let Pick::Endpoint(g) = b.pick(&Tried::new()) else {
                panic!()
            };
            g.eject();
        }
        // All of west ejected: panic mode within west, never east.
        assert!(picks(&b, 4).iter().all(|p| *p != 1));
        // Pinned to our own zone, endpoints without a zone count as ours.
        let b2 = Balancer::<()>::with_locality("backend", Locality::pinned("east", "east"), &state);
        state
            .apply(&zoned(&[(1, 1, ""), (2, 1, "west")], RR))
            .unwrap();
        assert_eq!(picks(&b2, 3), [1, 1, 1]);
        // No endpoint in the pinned zone: none at all.
        state.apply(&zoned(&[(2, 1, "west")], RR)).unwrap();
        assert!(matches!(b2.pick(&Tried::new()), Pick::NoEndpoints));
    }

    #[test]
    fn a_zone_change_makes_a_new_endpoint_state() {
        let (state, b) = mk_local(&[(1, 1, "east")], RR, Locality::new("east"));
        let Pick::Endpoint(g) = b.pick(&Tried::new()) else {
            panic!()
        };
        let before = g.endpoint().clone();
        drop(g);
        state.apply(&zoned(&[(1, 1, "west")], RR)).unwrap();
        let Pick::Endpoint(g) = b.pick(&Tried::new()) else {
            panic!()
        };
        assert!(
            !Arc::ptr_eq(&before, g.endpoint()),
            "pools must not mix zones"
        );
        assert_eq!(g.endpoint.zone, "west");
    }
}
