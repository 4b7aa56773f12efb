//! `weftctl inspect meshes` (resource counts per mesh, `GET /_inspect/meshes`),
//! `weftctl inspect zones` (zone status, `GET /_inspect/zones`), and, against a zone control
//! plane, `weftctl inspect dataplanes` (`GET /_inspect/dataplanes`) and `weftctl inspect
//! dataplane NAME --config` (`GET /_inspect/dataplanes/{mesh}/{name}/config`);
//! `weftctl inspect services` (`GET /_inspect/services`, on global or a zone).

use anyhow::{Result, anyhow, bail};
use serde_json::Value;
use weft_core::Kind;

use crate::client::{ApiError, Client};
use crate::output::{self, Format, Table};

pub async fn meshes(client: &Client, format: Format) -> Result<String> {
    let resp = client.get(&["_inspect", "meshes"], &[]).await?;
    Ok(match format {
        Format::Table => meshes_table(&resp)?,
        Format::Yaml => weft_core::document::value_to_yaml(&resp),
        Format::Json => output::json(&resp),
    })
}

/// MESH DATAPLANES SERVICES POLICIES TOTAL, where POLICIES sums the policy kinds and
/// SERVICES counts MeshServices.
pub fn meshes_table(resp: &Value) -> Result<String> {
    let Some(items) = resp.get("items").and_then(Value::as_array) else {
        bail!("unexpected answer from /_inspect/meshes: no items");
    };
    let mut t = Table::new(["MESH", "DATAPLANES", "SERVICES", "POLICIES", "TOTAL"]);
    for item in items {
        let counts = item.get("counts").and_then(Value::as_object);
        let count = |kind: Kind| {
            counts
                .and_then(|c| c.get(kind.name()))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        let policies: u64 = Kind::ALL
            .iter()
            .filter(|k| k.is_policy())
            .map(|k| count(*k))
            .sum();
        let total = item
            .get("total")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| counts.map_or(0, |c| c.values().filter_map(Value::as_u64).sum()));
        t.row([
            item.get("mesh")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            count(Kind::Dataplane).to_string(),
            count(Kind::MeshService).to_string(),
            policies.to_string(),
            total.to_string(),
        ]);
    }
    Ok(t.render())
}

pub async fn zones(client: &Client, format: Format) -> Result<String> {
    let resp = client.get(&["_inspect", "zones"], &[]).await?;
    Ok(match format {
        Format::Table => zones_table(&resp, chrono::Utc::now())?,
        Format::Yaml => weft_core::document::value_to_yaml(&resp),
        Format::Json => output::json(&resp),
    })
}

/// NAME STATUS LAST SEEN VERSION RESOURCES.
pub fn zones_table(resp: &Value, now: chrono::DateTime<chrono::Utc>) -> Result<String> {
    let Some(items) = resp.get("items").and_then(Value::as_array) else {
        bail!("unexpected answer from /_inspect/zones: no items");
    };
    let mut t = Table::new(["NAME", "STATUS", "LAST SEEN", "VERSION", "RESOURCES"]);
    for z in items {
        let text = |k: &str| z.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let seen = z
            .get("lastSeen")
            .and_then(Value::as_str)
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map_or_else(
                || "never".to_string(),
                |t| format!("{} ago", output::age(t.with_timezone(&chrono::Utc), now)),
            );
        let version = text("version");
        t.row([
            text("name"),
            text("status"),
            seen,
            if version.is_empty() {
                "-".to_string()
            } else {
                version
            },
            z.get("resources")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                .to_string(),
        ]);
    }
    Ok(t.render())
}

/// 404 from a control plane that does not serve the data-plane routes (global, an older
/// zone) becomes a hint to ask the zone instead.
fn zone_only(e: anyhow::Error, client: &Client) -> anyhow::Error {
    match e.downcast_ref::<ApiError>() {
        Some(api) if api.status == 404 && api.detail.contains("no such route") => anyhow!(
            "{} does not serve /_inspect/dataplanes: dataplanes are inspected on their zone control plane (pass --address http://ZONE:5682 with the zone's token, or add it with `weftctl config control-planes add --name ZONE --address URL --token-file FILE` and use --context ZONE)",
            client.address()
        ),
        _ => e,
    }
}

/// `weftctl inspect dataplanes [--mesh M | -A]`.
pub async fn dataplanes(client: &Client, mesh: Option<&str>, format: Format) -> Result<String> {
    let query: Vec<(&str, &str)> = mesh.map(|m| ("mesh", m)).into_iter().collect();
    let resp = client
        .get(&["_inspect", "dataplanes"], &query)
        .await
        .map_err(|e| zone_only(e, client))?;
    Ok(match format {
        Format::Table => dataplanes_table(&resp, chrono::Utc::now())?,
        Format::Yaml => weft_core::document::value_to_yaml(&resp),
        Format::Json => output::json(&resp),
    })
}

/// NAME MESH ZONE SERVICE STATUS CERT EXPIRES.
pub fn dataplanes_table(resp: &Value, now: chrono::DateTime<chrono::Utc>) -> Result<String> {
    let Some(items) = resp.get("items").and_then(Value::as_array) else {
        bail!("unexpected answer from /_inspect/dataplanes: no items");
    };
    let mut t = Table::new(["NAME", "MESH", "ZONE", "SERVICE", "STATUS", "CERT EXPIRES"]);
    for d in items {
        let text = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let expires = d
            .get("certExpires")
            .and_then(Value::as_str)
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map_or_else(
                || "-".to_string(),
                |t| {
                    let t = t.with_timezone(&chrono::Utc);
                    if t <= now {
                        format!("expired {} ago", output::age(t, now))
                    } else {
                        format!("in {}", output::age(now, t))
                    }
                },
            );
        t.row([
            text("name"),
            text("mesh"),
            text("zone"),
            text("service"),
            text("status"),
            expires,
        ]);
    }
    Ok(t.render())
}

/// `weftctl inspect services [--mesh M | -A]`: the same answer shape from global (no VIPs:
/// each zone allocates its own) and from a zone.
pub async fn services(client: &Client, mesh: Option<&str>, format: Format) -> Result<String> {
    let mut resp = client.get(&["_inspect", "services"], &[]).await?;
    if let (Some(mesh), Some(items)) = (mesh, resp.get_mut("items").and_then(Value::as_array_mut)) {
        items.retain(|i| i.get("mesh").and_then(Value::as_str) == Some(mesh));
    }
    Ok(match format {
        Format::Table => services_table(&resp)?,
        Format::Yaml => weft_core::document::value_to_yaml(&resp),
        Format::Json => output::json(&resp),
    })
}

/// SERVICE MESH ZONES INSTANCES VIP, ZONES as `east(1),west(2)`.
pub fn services_table(resp: &Value) -> Result<String> {
    let Some(items) = resp.get("items").and_then(Value::as_array) else {
        bail!("unexpected answer from /_inspect/services: no items");
    };
    let mut t = Table::new(["SERVICE", "MESH", "ZONES", "INSTANCES", "VIP"]);
    for s in items {
        let text = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let zones: Vec<String> = s
            .get("zones")
            .and_then(Value::as_array)
            .map(|zs| {
                zs.iter()
                    .map(|z| {
                        format!(
                            "{}({})",
                            z.get("zone").and_then(Value::as_str).unwrap_or("?"),
                            z.get("instances").and_then(Value::as_u64).unwrap_or(0)
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let vip = text("vip");
        t.row([
            text("service"),
            text("mesh"),
            if zones.is_empty() {
                "-".to_string()
            } else {
                zones.join(",")
            },
            s.get("instances")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                .to_string(),
            if vip.is_empty() { "-".to_string() } else { vip },
        ]);
    }
    Ok(t.render())
}

/// `weftctl inspect dataplane NAME [--mesh M] --config`: what the zone last sent the proxy.
pub async fn dataplane_config(
    client: &Client,
    mesh: &str,
    name: &str,
    format: Format,
) -> Result<String> {
    let resp = client
        .get(&["_inspect", "dataplanes", mesh, name, "config"], &[])
        .await
        .map_err(|e| match e.downcast_ref::<ApiError>() {
            Some(api) if api.status == 404 && !api.detail.contains("no such route") => anyhow!(
                "dataplane {name:?} of mesh {mesh:?}: {} (list them with `weftctl inspect dataplanes -A`; pass --mesh if it is not in {mesh:?})",
                api.detail
            ),
            _ => zone_only(e, client),
        })?;
    Ok(match format {
        Format::Yaml => weft_core::document::value_to_yaml(&resp),
        Format::Json | Format::Table => output::json(&resp),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn policies_sum_the_policy_kinds() {
        let resp = json!({"items": [
            {"mesh": "default", "counts": {"MeshTimeout": 3, "MeshRetry": 1, "Dataplane": 5, "MeshService": 2, "MeshExternalService": 1}, "total": 12},
            {"mesh": "empty", "counts": {}, "total": 0},
        ]});
        assert_eq!(
            meshes_table(&resp).unwrap(),
            "MESH      DATAPLANES   SERVICES   POLICIES   TOTAL\n\
             default   5            2          4          12\n\
             empty     0            0          0          0\n"
        );
        assert!(meshes_table(&json!({})).is_err());
    }

    #[test]
    fn zones_table_shows_status_and_last_seen() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let resp = json!({"items": [
            {"name": "east", "status": "online", "lastSeen": "2026-11-22T09:59:58Z", "version": "0.1.0", "resources": 12},
            {"name": "west", "status": "offline", "lastSeen": null, "version": "", "resources": 0}
        ]});
        let out = zones_table(&resp, now).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("NAME"));
        assert!(
            lines[1].contains("east")
                && lines[1].contains("online")
                && lines[1].contains("2s ago")
                && lines[1].contains("12"),
            "{out}"
        );
        assert!(
            lines[2].contains("west") && lines[2].contains("offline") && lines[2].contains("never"),
            "{out}"
        );
        assert!(zones_table(&json!({}), now).is_err());
    }

    #[test]
    fn dataplanes_table_shows_status_and_certificate_expiry() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let resp = json!({"items": [
            {"name": "web-1", "mesh": "default", "zone": "east", "service": "web", "status": "online", "certExpires": "2026-11-22T12:00:00Z"},
            {"name": "api-1", "mesh": "default", "zone": "east", "service": "api", "status": "offline", "certExpires": null}
        ]});
        let out = dataplanes_table(&resp, now).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("NAME") && lines[0].ends_with("CERT EXPIRES"),
            "{out}"
        );
        assert!(
            lines[1].contains("web-1") && lines[1].contains("online") && lines[1].contains("in 2h"),
            "{out}"
        );
        assert!(
            lines[2].contains("offline") && lines[2].ends_with('-'),
            "{out}"
        );
        assert!(dataplanes_table(&json!({}), now).is_err());
    }

    #[test]
    fn services_table_shows_zones_instances_and_vip() {
        let resp = json!({"items": [
            {"mesh": "payments", "service": "backend", "zones": [{"zone": "east", "instances": 1}, {"zone": "west", "instances": 2}], "instances": 3, "vip": "127.240.0.1", "ports": [8080]},
            {"mesh": "payments", "service": "frontend", "zones": [{"zone": "east", "instances": 1}], "instances": 1, "vip": null, "ports": []}
        ]});
        let out = services_table(&resp).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("SERVICE") && lines[0].ends_with("VIP"),
            "{out}"
        );
        assert!(
            lines[1].contains("backend")
                && lines[1].contains("east(1),west(2)")
                && lines[1].contains(" 3 ")
                && lines[1].ends_with("127.240.0.1"),
            "{out}"
        );
        assert!(
            lines[2].contains("frontend") && lines[2].ends_with('-'),
            "{out}"
        );
        assert!(services_table(&json!({})).is_err());
    }
}
