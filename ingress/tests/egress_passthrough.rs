//! The egress's cross-zone passthrough (`Mesh.spec.routing.zoneEgress`) in-process over real
//! TLS on loopback: a caller with a client certificate dials the egress with another zone's
//! SNI; the egress, which holds no certificate at all, passes the TLS to a TLS server standing
//! for that zone's ingress and backend. The handshake is end to end: the caller sees the
//! backend's certificate, the backend sees the caller's.

mod support;

use std::sync::Arc;

use support::*;
use tokio::net::TcpListener;
use weft_ingress::egress::{self, Certs, Upstream};
use weft_ingress::metrics::Metrics;
use weft_ingress::proxy;
use weft_ingress::table::Routes;
use weft_proto::dataplane::v1 as pb;

const WEST_SNI: &str = "backend.west.payments.weft";

fn in_zone(mut e: pb::Endpoint, zone: &str) -> pb::Endpoint {
    e.zone = zone.into();
    e
}

#[tokio::test]
async fn another_zones_sni_is_passed_through_end_to_end() {
    let pki = Pki::new();
    let mut remote = Backend::start_for(&pki, "west-backend", WEST_SNI).await;
    let dead = closed_port().await;

    let routes = Routes::new();
    routes.set_zone("east");
    routes
        .apply(&pb::Update {
            nonce: 1,
            full: true,
            services: vec![
                // Routes: west's "ingress" (first a dead one, then the live one) for backend;
                // db only in west.
                service(
                    "payments",
                    "backend",
                    vec![
                        in_zone(endpoint(dead, "ingress-west-dead"), "west"),
                        in_zone(remote.endpoint(), "west"),
                    ],
                ),
                service(
                    "payments",
                    "db",
                    vec![in_zone(endpoint(dead, "ingress-west"), "west")],
                ),
            ],
            ..Default::default()
        })
        .unwrap();
    let metrics = Arc::new(Metrics::with_prefix("weft_egress"));
    let ctx = egress::Context {
        base: proxy::Context::new(routes.clone(), metrics.clone()),
        // No certificate for any mesh: a passthrough needs none.
        certs: Arc::new(Certs::default()),
        upstream: Arc::new(Upstream::new(egress::external_roots(&pki.ca_pem()).unwrap()).unwrap()),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(egress::serve(listener, ctx));

    let caller = pki.issue(&["frontend.east.payments"]);
    let config = pki.client_config(&caller);
    for i in 0..2 {
        let x = exchange(addr, config.clone(), WEST_SNI, &format!("hello {i}"))
            .await
            .unwrap();
        assert_eq!(x.answer, format!("west-backend: hello {i}"));
        assert_eq!(
            x.server_cert, remote.cert,
            "the caller's handshake is with the remote backend, not the egress"
        );
        let seen = tokio::time::timeout(WAIT, remote.clients.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            seen, caller.cert,
            "the backend sees the caller's certificate"
        );
    }
    let text = metrics.render();
    assert!(
        text.contains(
            "weft_egress_passthrough_connections_total{mesh=\"payments\",service=\"backend\",zone=\"west\"} 2"
        ),
        "{text}"
    );
    assert!(
        !text.contains("weft_egress_connections_total{mesh=\"payments\""),
        "a passthrough is not an external connection: {text}"
    );
    assert!(
        text.contains("weft_egress_upstream_connect_failures_total 1"),
        "the dead ingress tried once, then the live one: {text}"
    );
    assert!(
        text.contains("weft_egress_active_connections{mesh=\"payments\",service=\"backend\"} 0"),
        "{text}"
    );

    // A zone the route has no ingress for; a mesh without routes; this zone's SNI of a
    // service that is not external: refused, by reason.
    for sni in [
        "backend.north.payments.weft",
        "web.west.shop.weft",
        "backend.east.payments.weft",
    ] {
        assert!(
            exchange(addr, config.clone(), sni, "x").await.is_err(),
            "{sni} must be refused"
        );
    }
    let text = metrics.render();
    for reason in ["no_endpoint", "other_zone", "unknown_service"] {
        assert!(
            text.contains(&format!(
                "weft_egress_refused_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason}: {text}"
        );
    }
    // The route's ingress refuses: the connection closes, nothing is counted as passed.
    assert!(
        exchange(addr, config, "db.west.payments.weft", "x")
            .await
            .is_err()
    );
    assert!(
        !metrics.render().contains("service=\"db\",zone=\"west\"} 1"),
        "{}",
        metrics.render()
    );
}
