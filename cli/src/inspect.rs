//! `weftctl inspect meshes` (resource counts per mesh, `GET /_inspect/meshes`) and
//! `weftctl inspect zones` (zone status, `GET /_inspect/zones`).

use anyhow::{Result, bail};
use serde_json::Value;
use weft_core::Kind;

use crate::client::Client;
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
}
