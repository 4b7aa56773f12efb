//! weft-dp: the sidecar. It registers with its zone over the data-plane API
//! (`weft.dataplane.v1`), keeps the configuration and workload certificate the zone pushes
//! ([`state`], [`tls`]), and carries the application's traffic: the inbound terminates mTLS,
//! checks the caller's SPIFFE identity against MeshTrafficPermission and forwards to the
//! application ([`inbound`]); outbounds balance over the called service's endpoints and
//! originate mTLS ([`outbound`]).
//!
//! Module owners (while the crate is being built in parallel): `client`, `config`, `admin`,
//! `main.rs` run the session and the process; `tls`, `inbound`, `outbound`, `lb`, `metrics`
//! carry traffic. [`state`] is the contract between the two.

pub mod metrics;
pub mod state;
pub mod tls;
