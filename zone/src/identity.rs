//! The zone's intermediate CAs: one per mesh with builtin mTLS, held in memory. The zone makes
//! its own key ([`pki::new_key`]) and a CSR, global signs it with the mesh's root CA (KDS
//! `SignIntermediate`), and the zone keeps the [`IntermediateCa`] it loaded (which checks the
//! chain to the root). The zone's key never leaves the zone; the root's key never reaches it.
//!
//! While connected to global, [`Identity::run`] checks the zone's synced Mesh resources every
//! [`CHECK_EVERY`] and asks for what is missing, for a mesh whose backend changed, and for an
//! intermediate past its renewal time. When global is away the current ones are kept.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use serde::Serialize;
use tonic::transport::Channel;
use weft_core::Kind;
use weft_core::pki::{self, IntermediateCa, SpiffeId};
use weft_core::spec::MeshSpec;
use weft_core::store::{self, Store};
use weft_global::mesh_ca;
use weft_proto::kds::v1 as pb;

/// How often the zone checks which meshes need an intermediate while connected.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long to wait before asking again for a mesh after global refused or failed.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

struct Held {
    ca: Arc<IntermediateCa>,
    backend: String,
    renew_at: SystemTime,
}

/// The zone's intermediate CAs per mesh, shared by the KDS client (which fills it) and the
/// API (which shows the public half).
pub struct Identity {
    zone: String,
    held: RwLock<BTreeMap<String, Held>>,
    /// Meshes global last refused or failed for, and when.
    failed: Mutex<BTreeMap<String, Instant>>,
}

/// What the zone shows of one intermediate: certificates only, never a key.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Public {
    pub mesh: String,
    pub zone: String,
    /// The intermediate CA certificate, PEM.
    pub intermediate: String,
    /// The mesh's root CA certificate, PEM.
    pub root: String,
    /// RFC 3339.
    pub not_after: String,
    /// RFC 3339: when the zone asks for the next one.
    pub renew_at: String,
    /// `spiffe://<mesh>`.
    pub spiffe_trust_domain: String,
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl Identity {
    pub fn new(zone: &str) -> Arc<Identity> {
        Arc::new(Identity {
            zone: zone.to_string(),
            held: RwLock::default(),
            failed: Mutex::default(),
        })
    }

    /// The intermediate CA of `mesh`, if the zone holds one.
    pub fn get(&self, mesh: &str) -> Option<Arc<IntermediateCa>> {
        self.held.read().unwrap().get(mesh).map(|h| h.ca.clone())
    }

    /// Hold `ca` for its mesh as if global had just signed it for `backend`: for tests and
    /// tools that make an intermediate in-process (e.g. from a `pki::RootCa`).
    pub fn insert(&self, ca: IntermediateCa, backend: &str) {
        let renew_at = pki::renew_at(SystemTime::now(), ca.not_after());
        self.held.write().unwrap().insert(
            ca.mesh().to_string(),
            Held {
                ca: Arc::new(ca),
                backend: backend.to_string(),
                renew_at,
            },
        );
    }

    /// The public half of every intermediate held, by mesh.
    pub fn public(&self) -> Vec<Public> {
        self.held
            .read()
            .unwrap()
            .iter()
            .map(|(mesh, h)| Public {
                mesh: mesh.clone(),
                zone: h.ca.zone().to_string(),
                intermediate: h.ca.cert_pem().to_string(),
                root: h.ca.root_pem().to_string(),
                not_after: rfc3339(h.ca.not_after()),
                renew_at: rfc3339(h.renew_at),
                spiffe_trust_domain: SpiffeId::trust_domain_uri(mesh),
            })
            .collect()
    }

    /// The meshes in `store` that want an intermediate, with their builtin backend.
    async fn wanted(&self, store: &dyn Store) -> store::Result<BTreeMap<String, String>> {
        let mut wanted = BTreeMap::new();
        for r in store::list_all(store, store::ListQuery::all(Kind::Mesh)).await? {
            let Ok(spec) = serde_json::from_value::<MeshSpec>(r.spec.clone()) else {
                continue;
            };
            if let Ok(Some(backend)) = mesh_ca::builtin_backend(&r.name, &spec) {
                wanted.insert(r.name.clone(), backend);
            }
        }
        Ok(wanted)
    }

    /// One pass: drop intermediates of meshes that no longer want one, and ask global for the
    /// missing, changed and due ones. Failures are logged and retried after [`RETRY_AFTER`];
    /// what is held stays.
    pub async fn reconcile(
        &self,
        store: &dyn Store,
        client: &pb::kds_client::KdsClient<Channel>,
        token: &str,
    ) {
        let wanted = match self.wanted(store).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "reading meshes for identity");
                return;
            }
        };
        self.held.write().unwrap().retain(|mesh, _| {
            let keep = wanted.contains_key(mesh);
            if !keep {
                tracing::info!(%mesh, "mesh no longer uses builtin mTLS: dropped its intermediate CA");
            }
            keep
        });
        let now = SystemTime::now();
        for (mesh, backend) in wanted {
            let due = match self.held.read().unwrap().get(&mesh) {
                None => true,
                Some(h) => h.backend != backend || now >= h.renew_at,
            };
            if !due {
                continue;
            }
            if let Some(at) = self.failed.lock().unwrap().get(&mesh)
                && at.elapsed() < RETRY_AFTER
            {
                continue;
            }
            match self.obtain(client.clone(), token, &mesh).await {
                Ok(ca) => {
                    self.failed.lock().unwrap().remove(&mesh);
                    let renew_at = pki::renew_at(SystemTime::now(), ca.not_after());
                    tracing::info!(%mesh, %backend, not_after = %rfc3339(ca.not_after()), renew_at = %rfc3339(renew_at), "obtained an intermediate CA from global");
                    self.held.write().unwrap().insert(
                        mesh,
                        Held {
                            ca: Arc::new(ca),
                            backend,
                            renew_at,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(%mesh, error = %format!("{e:#}"), "no intermediate CA from global (keeping the current one, if any)");
                    self.failed.lock().unwrap().insert(mesh, Instant::now());
                }
            }
        }
    }

    /// Make a key and CSR, have global sign it, and load the result (checking the chain).
    async fn obtain(
        &self,
        client: pb::kds_client::KdsClient<Channel>,
        token: &str,
        mesh: &str,
    ) -> anyhow::Result<IntermediateCa> {
        let key = pki::new_key()?;
        let csr = pki::intermediate_csr(mesh, &self.zone, &key)?;
        let resp = sign(client, token, &self.zone, mesh, &csr)
            .await
            .map_err(|s| anyhow::anyhow!("global refused: {} ({:?})", s.message(), s.code()))?;
        let ca = IntermediateCa::from_pem(&resp.cert_pem, &key, &resp.root_pem)
            .context("global's answer does not make a usable intermediate CA")?;
        anyhow::ensure!(
            ca.mesh() == mesh && ca.zone() == self.zone,
            "global signed an intermediate for zone {} of mesh {}, not ours",
            ca.zone(),
            ca.mesh()
        );
        Ok(ca)
    }

    /// Reconcile every [`CHECK_EVERY`] until the future is dropped (the KDS session ends).
    pub async fn run(
        &self,
        store: Arc<dyn Store>,
        client: pb::kds_client::KdsClient<Channel>,
        token: String,
    ) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.reconcile(&*store, &client, &token).await;
        }
    }
}

/// Call `SignIntermediate` as zone `zone` with `token`.
pub async fn sign(
    mut client: pb::kds_client::KdsClient<Channel>,
    token: &str,
    zone: &str,
    mesh: &str,
    csr_pem: &str,
) -> Result<pb::SignIntermediateResponse, tonic::Status> {
    let mut req = tonic::Request::new(pb::SignIntermediateRequest {
        mesh: mesh.to_string(),
        csr_pem: csr_pem.to_string(),
    });
    let bad =
        |what: &str| tonic::Status::invalid_argument(format!("{what} is not valid header text"));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| bad("the zone token"))?,
    );
    req.metadata_mut().insert(
        crate::kds::ZONE_HEADER,
        zone.parse().map_err(|_| bad("the zone name"))?,
    );
    req.set_timeout(Duration::from_secs(10));
    Ok(client.sign_intermediate(req).await?.into_inner())
}

/// The zone's route `GET /_identity/meshes`: the public half of each intermediate.
pub fn routes(identity: Arc<Identity>) -> axum::Router<weft_global::api::State> {
    axum::Router::new().route(
        "/_identity/meshes",
        axum::routing::get(move || {
            let identity = identity.clone();
            async move { axum::Json(serde_json::json!({ "items": identity.public() })) }
        }),
    )
}
