//! The proxy's workload identity and the rustls configurations built on it.
//!
//! CONTRACT (implemented by the traffic side; the session side calls `new`, `install`,
//! `status`):
//! - [`Identity::install`] swaps in a new key + chain + trust roots atomically; handshakes
//!   from then on use them, connections already open keep theirs (rotation never drops a
//!   connection);
//! - [`Identity::server_config`] is TLS 1.3 only, requires a client certificate that chains to
//!   a mesh root and carries a SPIFFE ID of this mesh (`spiffe://<mesh>/<service>`);
//! - [`Identity::client_config`] presents the current certificate and accepts only a server
//!   whose certificate chains to a mesh root and carries exactly `expected`;
//! - [`peer_identity`] reads the verified SPIFFE ID of the other end of a connection.

use std::sync::Arc;
use std::time::SystemTime;

use weft_core::pki::SpiffeId;

/// The current certificate, as shown by `/config`, `/metrics` and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertStatus {
    pub id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex serial number of the workload certificate.
    pub serial: String,
}

pub struct Identity {
    mesh: String,
}

impl Identity {
    pub fn new(mesh: &str) -> Arc<Identity> {
        Arc::new(Identity {
            mesh: mesh.to_string(),
        })
    }

    pub fn mesh(&self) -> &str {
        &self.mesh
    }

    /// Install a key (PKCS#8 PEM, the proxy's own), the chain the zone issued for it (workload
    /// certificate then intermediate, PEM) and the mesh roots (PEM each). Checks that the
    /// chain verifies against the roots and matches the key before anything changes.
    pub fn install(
        &self,
        key_pem: &str,
        chain_pem: &str,
        roots_pem: &[String],
    ) -> anyhow::Result<CertStatus> {
        let _ = (key_pem, chain_pem, roots_pem);
        anyhow::bail!("not implemented yet")
    }

    /// The installed certificate, `None` before the first `install`.
    pub fn status(&self) -> Option<CertStatus> {
        None
    }

    /// Server side of an mTLS inbound; `alpn` e.g. `[b"h2", b"http/1.1"]` (empty for TCP).
    pub fn server_config(self: &Arc<Self>, alpn: Vec<Vec<u8>>) -> Arc<rustls::ServerConfig> {
        let _ = alpn;
        unimplemented!("tls::Identity::server_config")
    }

    /// Client side of an mTLS outbound to `expected`.
    pub fn client_config(
        self: &Arc<Self>,
        expected: &SpiffeId,
        alpn: Vec<Vec<u8>>,
    ) -> Arc<rustls::ClientConfig> {
        let _ = (expected, alpn);
        unimplemented!("tls::Identity::client_config")
    }
}

/// The verified SPIFFE ID of the peer of an established connection.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<SpiffeId> {
    let _ = conn;
    None
}
