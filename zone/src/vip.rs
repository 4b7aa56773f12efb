//! Virtual IPs for the mesh's DNS names (`<service>.mesh`, `<service>.<zone>.mesh`): a pure
//! allocator over `--vip-cidr` (no I/O; the data-plane hub persists it as `vips.json` in the
//! data directory through [`Allocator::to_json`] and loads it at start with [`Allocator::load`]).
//!
//! Rules:
//! - a (mesh, name) keeps its address for as long as the allocator knows it, so across zone
//!   restarts (the file), global restarts and proxy reconnects;
//! - an address held by a name (in use or retained) is never handed to another name;
//! - new names take the next free address after a moving cursor, so a released address comes
//!   back only after the whole range has been walked through;
//! - a name no longer in use is kept for `retention` (`--vip-retention`, default 1h) and then
//!   released, so a service that flaps or a zone that reconnects keeps its VIPs, while a
//!   range is not exhausted by names gone for good.
//!
//! The network and broadcast addresses of the range are never handed out.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The file in the data directory.
pub const FILE: &str = "vips.json";
/// `--vip-cidr` default.
pub const DEFAULT_CIDR: &str = "127.240.0.0/12";
/// `--vip-retention` default.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "--vip-cidr {cidr}: no free address left for {name:?} of mesh {mesh:?} ({held} names hold one): use a larger range, or a shorter --vip-retention so unused names are released sooner"
    )]
    Exhausted {
        cidr: Cidr,
        mesh: String,
        name: String,
        held: usize,
    },
    #[error("{0}")]
    File(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An IPv4 range, `a.b.c.d/len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub base: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    /// How many addresses the range has.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }

    fn at(&self, offset: u64) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base).wrapping_add(offset as u32))
    }

    /// The offset of `a` in the range, if it is in the range.
    fn offset(&self, a: Ipv4Addr) -> Option<u64> {
        let off = u64::from(u32::from(a).wrapping_sub(u32::from(self.base)));
        (u32::from(a) >= u32::from(self.base) && off < self.size()).then_some(off)
    }

    /// Whether the offset may be handed out (not the network or broadcast address).
    fn usable(&self, offset: u64) -> bool {
        offset != 0 && offset != self.size() - 1
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `a.b.c.d/len`, IPv4, length 8..=30, no host bits set. Messages name `--vip-cidr`.
    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = |why: &str| format!("--vip-cidr {s:?}: {why}");
        let (addr, len) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("expected an IPv4 range such as 127.240.0.0/12"))?;
        if addr.contains(':') {
            return Err(bad(
                "IPv6 ranges are not supported: give an IPv4 range such as 127.240.0.0/12",
            ));
        }
        let base: Ipv4Addr = addr
            .parse()
            .map_err(|_| bad("not an IPv4 address before the / (e.g. 127.240.0.0/12)"))?;
        let len: u8 = len
            .parse()
            .map_err(|_| bad("the prefix length after / must be a number (e.g. /12)"))?;
        if !(8..=30).contains(&len) {
            return Err(bad(
                "the prefix length must be between 8 and 30 (at least two usable addresses)",
            ));
        }
        let mask = u32::MAX << (32 - u32::from(len));
        if u32::from(base) & !mask != 0 {
            return Err(bad(&format!(
                "host bits are set (did you mean {}/{len}?)",
                Ipv4Addr::from(u32::from(base) & mask)
            )));
        }
        Ok(Cidr { base, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.len)
    }
}

/// (mesh, DNS name such as `backend.mesh`).
pub type Name = (String, String);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    mesh: String,
    name: String,
    address: Ipv4Addr,
    /// Unix seconds since when no service uses the name; `None` while in use.
    #[serde(default)]
    unused_since: Option<u64>,
}

/// The `vips.json` document.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Doc {
    cidr: String,
    cursor: u64,
    vips: Vec<Entry>,
}

/// The allocation table. Pure: the caller persists [`Allocator::to_json`] when
/// [`Allocator::take_dirty`] says it changed.
#[derive(Debug)]
pub struct Allocator {
    cidr: Cidr,
    retention: Duration,
    cursor: u64,
    by_name: BTreeMap<Name, (Ipv4Addr, Option<u64>)>,
    /// Offsets held.
    held: BTreeSet<u64>,
    dirty: bool,
}

impl Allocator {
    pub fn new(cidr: Cidr, retention: Duration) -> Allocator {
        Allocator {
            cidr,
            retention,
            cursor: 1,
            by_name: BTreeMap::new(),
            held: BTreeSet::new(),
            dirty: false,
        }
    }

    /// Read `<data_dir>/vips.json` if it exists. Entries outside `cidr` (the range was
    /// changed) are dropped and their names get new addresses when next used.
    pub fn load(data_dir: &Path, cidr: Cidr, retention: Duration) -> Result<Allocator> {
        let path = data_dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Allocator::new(cidr, retention));
            }
            Err(e) => return Err(Error::File(format!("reading {}: {e}", path.display()))),
        };
        Allocator::from_json(&text, cidr, retention).map_err(|e| {
            Error::File(format!(
                "{}: {e} (fix it, or remove it to allocate new VIPs: proxies then get new addresses)",
                path.display()
            ))
        })
    }

    /// Parse what [`Allocator::to_json`] wrote.
    pub fn from_json(text: &str, cidr: Cidr, retention: Duration) -> Result<Allocator, String> {
        let doc: Doc = serde_json::from_str(text).map_err(|e| format!("not a VIP table: {e}"))?;
        let mut a = Allocator::new(cidr, retention);
        let same_range = doc.cidr == cidr.to_string();
        if same_range && cidr.usable(doc.cursor) {
            a.cursor = doc.cursor;
        }
        let mut dropped = 0;
        for e in doc.vips {
            match cidr.offset(e.address).filter(|o| cidr.usable(*o)) {
                Some(off) if !a.held.contains(&off) => {
                    a.held.insert(off);
                    a.by_name
                        .insert((e.mesh, e.name), (e.address, e.unused_since));
                }
                _ => dropped += 1,
            }
        }
        if dropped > 0 {
            tracing::warn!(
                dropped,
                cidr = %cidr,
                was = %doc.cidr,
                "VIPs outside --vip-cidr (or duplicated) dropped: those names get new addresses"
            );
            a.dirty = true;
        }
        Ok(a)
    }

    /// The file's content.
    pub fn to_json(&self) -> String {
        let doc = Doc {
            cidr: self.cidr.to_string(),
            cursor: self.cursor,
            vips: self
                .by_name
                .iter()
                .map(|((mesh, name), (address, unused_since))| Entry {
                    mesh: mesh.clone(),
                    name: name.clone(),
                    address: *address,
                    unused_since: *unused_since,
                })
                .collect(),
        };
        serde_json::to_string_pretty(&doc).expect("a VIP table serializes")
    }

    /// Have the table written again (a write failed).
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Whether the table changed since the last call (and so needs writing).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// The address of `name` in `mesh`, if it has one.
    pub fn get(&self, mesh: &str, name: &str) -> Option<Ipv4Addr> {
        self.by_name
            .get(&(mesh.to_string(), name.to_string()))
            .map(|(a, _)| *a)
    }

    /// How many names hold an address.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The address of `name` in `mesh`, allocating one when it has none; marks it in use.
    pub fn allocate(&mut self, mesh: &str, name: &str) -> Result<Ipv4Addr> {
        let key = (mesh.to_string(), name.to_string());
        if let Some((addr, unused)) = self.by_name.get_mut(&key) {
            if unused.take().is_some() {
                self.dirty = true;
            }
            return Ok(*addr);
        }
        let size = self.cidr.size();
        let mut off = self.cursor;
        for _ in 0..size {
            if off >= size {
                off = 0;
            }
            if self.cidr.usable(off) && !self.held.contains(&off) {
                let addr = self.cidr.at(off);
                self.held.insert(off);
                self.by_name.insert(key, (addr, None));
                self.cursor = (off + 1) % size;
                self.dirty = true;
                return Ok(addr);
            }
            off += 1;
        }
        Err(Error::Exhausted {
            cidr: self.cidr,
            mesh: mesh.to_string(),
            name: name.to_string(),
            held: self.by_name.len(),
        })
    }

    /// Note which names are in use at `now` (unix seconds): the others start (or continue)
    /// their retention, and those unused for longer than the retention are released.
    /// Returns the released names.
    pub fn sweep(&mut self, in_use: &BTreeSet<Name>, now: u64) -> Vec<Name> {
        let retention = self.retention.as_secs();
        let mut released = Vec::new();
        for (name, (addr, unused)) in self.by_name.iter_mut() {
            if in_use.contains(name) {
                if unused.take().is_some() {
                    self.dirty = true;
                }
                continue;
            }
            match unused {
                None => {
                    *unused = Some(now);
                    self.dirty = true;
                }
                Some(since) if now.saturating_sub(*since) >= retention => {
                    released.push(name.clone());
                    if let Some(off) = self.cidr.offset(*addr) {
                        self.held.remove(&off);
                    }
                }
                Some(_) => {}
            }
        }
        for name in &released {
            self.by_name.remove(name);
            self.dirty = true;
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn names(list: &[(&str, &str)]) -> BTreeSet<Name> {
        list.iter()
            .map(|(m, n)| (m.to_string(), n.to_string()))
            .collect()
    }

    #[test]
    fn cidr_parsing_names_the_flag() {
        assert_eq!(cidr(DEFAULT_CIDR).size(), 1 << 20);
        for (bad, want) in [
            ("127.240.0.0", "expected an IPv4 range"),
            ("fd00::/64", "IPv6"),
            ("127.240.0.1/12", "did you mean 127.240.0.0/12"),
            ("127.240.0.0/31", "between 8 and 30"),
            ("nope/12", "not an IPv4 address"),
        ] {
            let e = bad.parse::<Cidr>().unwrap_err();
            assert!(e.starts_with("--vip-cidr"), "{e}");
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn stable_across_reload_and_no_duplicates() {
        let mut a = Allocator::new(cidr("10.9.0.0/24"), DEFAULT_RETENTION);
        let x = a.allocate("m", "backend.mesh").unwrap();
        let y = a.allocate("m", "backend.west.mesh").unwrap();
        let z = a.allocate("other", "backend.mesh").unwrap();
        assert_eq!(
            x,
            Ipv4Addr::new(10, 9, 0, 1),
            "the network address is skipped"
        );
        assert_eq!(a.allocate("m", "backend.mesh").unwrap(), x);
        assert_eq!(BTreeSet::from([x, y, z]).len(), 3);
        assert!(a.take_dirty());
        assert!(!a.take_dirty());

        let mut b =
            Allocator::from_json(&a.to_json(), cidr("10.9.0.0/24"), DEFAULT_RETENTION).unwrap();
        assert_eq!(b.get("m", "backend.mesh"), Some(x));
        assert_eq!(b.get("m", "backend.west.mesh"), Some(y));
        assert_eq!(b.get("other", "backend.mesh"), Some(z));
        // The cursor is kept: the next name does not take any of those.
        let n = b.allocate("m", "new.mesh").unwrap();
        assert!(![x, y, z].contains(&n));
        // Another range drops what is outside it.
        let c = Allocator::from_json(&a.to_json(), cidr("10.8.0.0/24"), DEFAULT_RETENTION).unwrap();
        assert!(c.is_empty());
        assert!(Allocator::from_json("{", cidr("10.9.0.0/24"), DEFAULT_RETENTION).is_err());
    }

    #[test]
    fn exhaustion_is_a_clear_error_and_freed_addresses_are_not_reused_soon() {
        // /29: 8 addresses, 6 usable.
        let mut a = Allocator::new(cidr("10.9.0.0/29"), Duration::from_secs(60));
        let mut got = BTreeSet::new();
        for i in 0..6 {
            got.insert(a.allocate("m", &format!("s{i}.mesh")).unwrap());
        }
        assert_eq!(got.len(), 6);
        assert!(!got.contains(&Ipv4Addr::new(10, 9, 0, 0)));
        assert!(!got.contains(&Ipv4Addr::new(10, 9, 0, 7)));
        let e = a.allocate("m", "s6.mesh").unwrap_err();
        assert!(e.to_string().contains("--vip-cidr 10.9.0.0/29"), "{e}");
        assert!(e.to_string().contains("no free address"), "{e}");

        // s0 unused: retained for the retention, then released.
        let in_use: BTreeSet<Name> = (1..6)
            .map(|i| ("m".to_string(), format!("s{i}.mesh")))
            .collect();
        assert!(a.sweep(&in_use, 1000).is_empty());
        assert!(a.sweep(&in_use, 1059).is_empty());
        assert!(a.allocate("m", "s6.mesh").is_err(), "s0 is still retained");
        assert_eq!(a.sweep(&in_use, 1060), vec![("m".into(), "s0.mesh".into())]);
        let freed = Ipv4Addr::new(10, 9, 0, 1);
        assert_eq!(a.allocate("m", "s6.mesh").unwrap(), freed);

        // In a larger range a freed address is not the next one handed out.
        let mut b = Allocator::new(cidr("10.9.0.0/24"), Duration::ZERO);
        let first = b.allocate("m", "a.mesh").unwrap();
        b.allocate("m", "b.mesh").unwrap();
        b.sweep(&names(&[("m", "b.mesh")]), 1);
        assert_eq!(b.sweep(&names(&[("m", "b.mesh")]), 1).len(), 1);
        let next = b.allocate("m", "c.mesh").unwrap();
        assert_ne!(next, first);
        // A name used again before its retention ends keeps its address.
        let mut c = Allocator::new(cidr("10.9.0.0/24"), Duration::from_secs(60));
        let a1 = c.allocate("m", "a.mesh").unwrap();
        c.sweep(&BTreeSet::new(), 0);
        assert_eq!(c.allocate("m", "a.mesh").unwrap(), a1);
        assert!(
            c.sweep(&BTreeSet::new(), 100).is_empty(),
            "retention restarted"
        );
    }
}
