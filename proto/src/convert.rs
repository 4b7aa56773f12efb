//! Conversions between the generated KDS messages and `weft_core::kds` types. Wire input is
//! untrusted: every conversion from the wire can fail with a message naming what was wrong.

use weft_core::Kind;
use weft_core::kds::{Ack, Batch, Entry, Hash, Hello, Inventory, Item, Msg};

use crate::kds::v1 as pb;
use crate::kds::v1::message::Body;

/// A message that does not decode into a valid KDS message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad KDS message: {0}")]
pub struct BadMessage(pub String);

fn kind(name: &str) -> Result<Kind, BadMessage> {
    Kind::from_name(name).ok_or_else(|| BadMessage(format!("unknown kind {name:?}")))
}

pub fn to_wire(m: Msg) -> pb::Message {
    let body = match m {
        Msg::Hello(h) => Body::Hello(pb::Hello {
            zone: h.zone,
            version: h.version,
            instance: h.instance,
        }),
        Msg::Inventory(i) => Body::Inventory(pb::Inventory {
            kind: i.kind.name().to_string(),
            entries: i
                .entries
                .into_iter()
                .map(|e| pb::Entry {
                    mesh: e.key.0,
                    name: e.key.1,
                    hash: e.hash.to_vec(),
                })
                .collect(),
            last: i.last,
        }),
        Msg::Batch(b) => Body::Batch(pb::Batch {
            nonce: b.nonce,
            kind: b.kind.name().to_string(),
            upserts: b
                .upserts
                .into_iter()
                .map(|i| pb::Resource {
                    mesh: i.key.0,
                    name: i.key.1,
                    labels: i.labels.into_iter().collect(),
                    spec_json: i.spec.to_string(),
                    version: i.version,
                    modified_unix_ms: i.modified_ms,
                })
                .collect(),
            deletes: b
                .deletes
                .into_iter()
                .map(|(mesh, name)| pb::Key { mesh, name })
                .collect(),
            synced: b.synced,
        }),
        Msg::Ack(a) => Body::Ack(pb::Ack {
            nonce: a.nonce,
            nack: a.nack.unwrap_or_default(),
        }),
        Msg::Ping(id) => Body::Ping(pb::Ping { id }),
        Msg::Pong(id) => Body::Pong(pb::Pong { id }),
    };
    pb::Message { body: Some(body) }
}

/// Decode everything but a batch's resources (see [`batch_from_wire`]).
pub fn from_wire(m: pb::Message) -> Result<Msg, BadMessage> {
    Ok(
        match m.body.ok_or_else(|| BadMessage("empty message".into()))? {
            Body::Hello(h) => Msg::Hello(Hello {
                zone: h.zone,
                version: h.version,
                instance: h.instance,
            }),
            Body::Inventory(i) => {
                let kind = kind(&i.kind)?;
                let entries = i
                    .entries
                    .into_iter()
                    .map(|e| {
                        let hash: Hash = e.hash.as_slice().try_into().map_err(|_| {
                            BadMessage(format!(
                                "inventory of {kind}: hash of {} is {} bytes, expected 16",
                                e.name,
                                e.hash.len()
                            ))
                        })?;
                        Ok(Entry {
                            key: (e.mesh, e.name),
                            hash,
                        })
                    })
                    .collect::<Result<_, BadMessage>>()?;
                Msg::Inventory(Inventory {
                    kind,
                    entries,
                    last: i.last,
                })
            }
            Body::Batch(b) => Msg::Batch(batch_from_wire(b)?),
            Body::Ack(a) => Msg::Ack(Ack {
                nonce: a.nonce,
                nack: (!a.nack.is_empty()).then_some(a.nack),
            }),
            Body::Ping(p) => Msg::Ping(p.id),
            Body::Pong(p) => Msg::Pong(p.id),
        },
    )
}

/// Decode a batch; a failure names the batch so the receiver can NACK it.
pub fn batch_from_wire(b: pb::Batch) -> Result<Batch, BadMessage> {
    let kind = kind(&b.kind)?;
    let upserts = b
        .upserts
        .into_iter()
        .map(|r| {
            let spec = serde_json::from_str(&r.spec_json)
                .map_err(|e| BadMessage(format!("{kind} {:?}: spec is not JSON: {e}", r.name)))?;
            Ok(Item {
                key: (r.mesh, r.name),
                labels: r.labels.into_iter().collect(),
                spec,
                version: r.version,
                modified_ms: r.modified_unix_ms,
            })
        })
        .collect::<Result<_, BadMessage>>()?;
    Ok(Batch {
        nonce: b.nonce,
        kind,
        upserts,
        deletes: b.deletes.into_iter().map(|k| (k.mesh, k.name)).collect(),
        synced: b.synced,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn round_trip() {
        let msgs = vec![
            Msg::Hello(Hello {
                zone: "east".into(),
                version: "0.1.0".into(),
                instance: "i-1".into(),
            }),
            Msg::Inventory(Inventory {
                kind: Kind::MeshTimeout,
                entries: vec![Entry {
                    key: ("default".into(), "t".into()),
                    hash: [7; 16],
                }],
                last: true,
            }),
            Msg::Batch(Batch {
                nonce: 9,
                kind: Kind::Mesh,
                upserts: vec![Item {
                    key: (String::new(), "m".into()),
                    labels: BTreeMap::from([("a".into(), "b".into())]),
                    spec: serde_json::json!({"x": 1}),
                    version: 3,
                    modified_ms: 1_700_000_000_000,
                }],
                deletes: vec![(String::new(), "gone".into())],
                synced: true,
            }),
            Msg::Ack(Ack {
                nonce: 9,
                nack: None,
            }),
            Msg::Ack(Ack {
                nonce: 10,
                nack: Some("bad".into()),
            }),
            Msg::Ping(1),
            Msg::Pong(1),
        ];
        for m in msgs {
            assert_eq!(from_wire(to_wire(m.clone())).unwrap(), m);
        }
    }

    #[test]
    fn bad_input_is_named() {
        let bad = pb::Message {
            body: Some(Body::Batch(pb::Batch {
                kind: "Nope".into(),
                ..Default::default()
            })),
        };
        assert!(
            from_wire(bad)
                .unwrap_err()
                .0
                .contains("unknown kind \"Nope\"")
        );
        let bad = pb::Batch {
            kind: "Mesh".into(),
            upserts: vec![pb::Resource {
                name: "m".into(),
                spec_json: "{".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(
            batch_from_wire(bad)
                .unwrap_err()
                .0
                .contains("spec is not JSON")
        );
        assert!(from_wire(pb::Message { body: None }).is_err());
    }
}
