//! `weftctl inspect meshes`: resource counts per mesh from `GET /_inspect/meshes`.

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
}
