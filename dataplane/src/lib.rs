//! weft-dp: the sidecar. It registers with its zone over the data-plane API
//! (`weft.dataplane.v1`), keeps the configuration and workload certificate the zone pushes
//! ([`state`], [`tls`]), and carries the application's traffic: the inbound terminates mTLS,
//! checks the caller's SPIFFE identity against MeshTrafficPermission and forwards to the
//! application ([`inbound`]); outbounds balance over the called service's endpoints and
//! originate mTLS ([`outbound`], [`lb`]).
//!
//! Session side: [`config`] (flags), [`client`] (the zone session, certificates), [`admin`]
//! (`/ready`, `/config`, `/metrics`), `main.rs`. Traffic side: [`tls`], [`inbound`],
//! [`outbound`], [`lb`], [`metrics`], [`dns`] (the embedded resolver of mesh names) and
//! [`vips`] (outbound listeners on the mesh's VIPs), [`transparent`] (the listener iptables
//! redirects the VIPs to); [`memory`] trims the heap after bursts. [`state`] is the contract between the two.

pub mod admin;
pub mod client;
pub mod config;
pub mod dns;
pub mod inbound;
pub mod lb;
pub mod memory;
pub mod metrics;
pub mod outbound;
pub mod state;
pub mod timeouts;
pub mod tls;
pub mod transparent;
pub mod vips;
