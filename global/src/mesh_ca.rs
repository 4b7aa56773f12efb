//! The mesh root CAs, on global only: one per Mesh whose `spec.mtls.enabledBackend` names a
//! `builtin` backend, made on first need and kept in the store's system values under
//! `mesh-ca/<mesh>/<backend>` (certificate and key, PEM). Zones get intermediates signed from
//! their CSRs ([`sign_intermediate`], served by the KDS `SignIntermediate` RPC).
//!
//! Invariant: **the root private key never leaves global.** It is read here, from the
//! system values (which no API route and no KDS stream carries), only to sign; what goes out
//! is the root certificate and the signed intermediate.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use weft_core::pki::{self, RootCa};
use weft_core::spec::MeshSpec;
use weft_core::spec::mesh::CaType;
use weft_core::store::{self, Store};
use weft_core::{Key, Kind};

/// How long a mesh's root CA lives.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a zone's intermediate CA lives (never past the root).
pub const INTERMEDIATE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mesh {0:?} does not exist")]
    NoMesh(String),
    #[error(
        "mesh {0:?} has no mTLS enabled (set spec.mtls.enabledBackend to a backend of type builtin)"
    )]
    NoMtls(String),
    #[error(
        "mesh {mesh:?}: the enabled mTLS backend {backend:?} is of type provided; global signs zone intermediates only for builtin backends"
    )]
    NotBuiltin { mesh: String, backend: String },
    #[error("mesh {mesh:?}: stored spec is unreadable: {reason}")]
    BadSpec { mesh: String, reason: String },
    #[error("mesh {mesh:?}: stored root CA {key:?} is unusable: {reason}")]
    BadStored {
        mesh: String,
        key: String,
        reason: String,
    },
    /// A CSR refused or a certificate that could not be made.
    #[error(transparent)]
    Pki(#[from] pki::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the store keeps for one root CA (a system value, JSON).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    cert_pem: String,
    key_pem: String,
}

/// The system key of a mesh's root CA for one backend.
pub fn key(mesh: &str, backend: &str) -> String {
    format!("mesh-ca/{mesh}/{backend}")
}

/// The backend a mesh's mTLS uses when that backend is `builtin`; `Ok(None)` when mTLS is off.
pub fn builtin_backend(mesh: &str, spec: &MeshSpec) -> Result<Option<String>> {
    let Some(mtls) = &spec.mtls else {
        return Ok(None);
    };
    let Some(enabled) = &mtls.enabled_backend else {
        return Ok(None);
    };
    match mtls.backends.iter().find(|b| &b.name.0 == enabled) {
        Some(b) if b.kind == CaType::Builtin => Ok(Some(enabled.clone())),
        Some(_) => Err(Error::NotBuiltin {
            mesh: mesh.to_string(),
            backend: enabled.clone(),
        }),
        // Validation refuses this; treat it as off.
        None => Ok(None),
    }
}

/// The root CA of `mesh` for `backend`, made and stored on the first call. Replicas racing
/// to make it all end up with the one stored first (`system_init`).
pub async fn ensure(store: &dyn Store, mesh: &str, backend: &str) -> Result<RootCa> {
    let k = key(mesh, backend);
    let stored = match store.system_get(&k).await? {
        Some(s) => s,
        None => {
            let root = RootCa::generate(mesh, ROOT_VALIDITY)?;
            let fresh = serde_json::to_string(&Stored {
                cert_pem: root.cert_pem().to_string(),
                key_pem: root.key_pem(),
            })
            .expect("PEM strings encode");
            let kept = store.system_init(&k, &fresh).await?;
            if kept == fresh {
                tracing::info!(%mesh, %backend, "created the mesh root CA");
            }
            kept
        }
    };
    let bad = |reason: String| Error::BadStored {
        mesh: mesh.to_string(),
        key: k.clone(),
        reason,
    };
    let s: Stored = serde_json::from_str(&stored).map_err(|e| bad(e.to_string()))?;
    let root = RootCa::from_pem(&s.cert_pem, &s.key_pem).map_err(|e| bad(e.to_string()))?;
    if root.mesh() != mesh {
        return Err(bad(format!("it is the root of mesh {:?}", root.mesh())));
    }
    Ok(root)
}

/// The root CA of a stored Mesh with builtin mTLS (made on first need).
pub async fn root_of(store: &dyn Store, mesh: &str) -> Result<RootCa> {
    let r = store
        .get(&Key::new(Kind::Mesh, None, mesh))
        .await?
        .ok_or_else(|| Error::NoMesh(mesh.to_string()))?;
    let spec: MeshSpec = serde_json::from_value(r.spec.clone()).map_err(|e| Error::BadSpec {
        mesh: mesh.to_string(),
        reason: e.to_string(),
    })?;
    let backend = builtin_backend(mesh, &spec)?.ok_or_else(|| Error::NoMtls(mesh.to_string()))?;
    ensure(store, mesh, &backend).await
}

/// A signed intermediate, as sent to the zone.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub root_pem: String,
    pub not_after: SystemTime,
}

/// Sign zone `zone`'s intermediate CSR for `mesh`. The zone is the authenticated one (from
/// its token): a CSR naming another zone is refused.
pub async fn sign_intermediate(
    store: &dyn Store,
    mesh: &str,
    zone: &str,
    csr_pem: &str,
) -> Result<Issued> {
    let root = root_of(store, mesh).await?;
    let cert_pem = root.sign_intermediate(csr_pem, zone, INTERMEDIATE_VALIDITY)?;
    let not_after = (SystemTime::now() + INTERMEDIATE_VALIDITY).min(root.not_after());
    Ok(Issued {
        cert_pem,
        root_pem: root.cert_pem().to_string(),
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use weft_core::Resource;
    use weft_core::store::Memory;

    async fn mk_mesh(store: &dyn Store, name: &str, spec: serde_json::Value) {
        let r = Resource::new(Kind::Mesh, None, name, Default::default(), spec).unwrap();
        store.create(r).await.unwrap();
    }

    fn builtin() -> serde_json::Value {
        serde_json::json!({"mtls": {"enabledBackend": "ca-1", "backends": [{"name": "ca-1", "type": "builtin"}]}})
    }

    #[tokio::test]
    async fn creation_is_idempotent() {
        let store: Arc<dyn Store> = Arc::new(Memory::new());
        mk_mesh(&*store, "m", builtin()).await;
        // Several callers at once: all get the same root.
        let roots = futures::future::join_all((0..4).map(|_| {
            let store = store.clone();
            async move { root_of(&*store, "m").await.unwrap() }
        }))
        .await;
        for r in &roots {
            assert_eq!(r.cert_pem(), roots[0].cert_pem());
            assert_eq!(r.key_pem(), roots[0].key_pem());
        }
        // And later calls too.
        let again = ensure(&*store, "m", "ca-1").await.unwrap();
        assert_eq!(again.cert_pem(), roots[0].cert_pem());
        assert!(store.system_get(&key("m", "ca-1")).await.unwrap().is_some());
    }

    /// Two replicas on one PostgreSQL database, racing to make the same root: both use the
    /// one stored first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_on_postgres_agree() {
        let a = crate::pg::testing::TestStore::create().await.unwrap();
        let b: Arc<dyn Store> = Arc::new(
            a.db()
                .store(tokio_util::sync::CancellationToken::new())
                .await
                .unwrap(),
        );
        let a: Arc<dyn Store> = Arc::new(a);
        for round in 0..5 {
            let mesh = format!("m{round}");
            let spawn = |store: Arc<dyn Store>, mesh: String| {
                tokio::spawn(async move { ensure(&*store, &mesh, "ca-1").await.unwrap() })
            };
            let (ra, rb) = (
                spawn(a.clone(), mesh.clone()),
                spawn(b.clone(), mesh.clone()),
            );
            let (ra, rb) = (ra.await.unwrap(), rb.await.unwrap());
            assert_eq!(ra.cert_pem(), rb.cert_pem(), "{mesh}");
            assert_eq!(ra.key_pem(), rb.key_pem(), "{mesh}");
        }
    }

    #[tokio::test]
    async fn signs_for_the_authenticated_zone_only() {
        let store = Memory::new();
        mk_mesh(&store, "m", builtin()).await;
        let zone_key = pki::new_key().unwrap();
        let csr = pki::intermediate_csr("m", "east", &zone_key).unwrap();
        let issued = sign_intermediate(&store, "m", "east", &csr).await.unwrap();
        let ca =
            pki::IntermediateCa::from_pem(&issued.cert_pem, &zone_key, &issued.root_pem).unwrap();
        assert_eq!((ca.mesh(), ca.zone()), ("m", "east"));
        // Zone west presenting east's CSR is refused.
        let e = sign_intermediate(&store, "m", "west", &csr)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Pki(pki::Error::Refused { .. })), "{e}");
    }

    #[tokio::test]
    async fn refuses_meshes_without_builtin_mtls() {
        let store = Memory::new();
        mk_mesh(&store, "plain", serde_json::json!({})).await;
        mk_mesh(&store, "provided", serde_json::json!({"mtls": {"enabledBackend": "p", "backends": [{"name": "p", "type": "provided"}]}})).await;
        let csr = |mesh| pki::intermediate_csr(mesh, "east", &pki::new_key().unwrap()).unwrap();
        let e = sign_intermediate(&store, "plain", "east", &csr("plain"))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NoMtls(_)), "{e}");
        assert!(e.to_string().contains("enabledBackend"), "{e}");
        let e = sign_intermediate(&store, "provided", "east", &csr("provided"))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NotBuiltin { .. }), "{e}");
        let e = sign_intermediate(&store, "nope", "east", &csr("nope"))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NoMesh(_)), "{e}");
        // Nothing was made for them.
        assert!(
            store
                .system_get(&key("plain", "ca-1"))
                .await
                .unwrap()
                .is_none()
        );
    }
}
