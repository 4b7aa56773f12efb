//! `weftctl get` and `weftctl delete`: resource paths, paging through `next`, and rendering
//! documents as a table, YAML or JSON. Documents are rendered as the server sent them, so a
//! server that knows newer fields is shown faithfully.

use anyhow::{Result, anyhow, bail};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use weft_core::{DEFAULT_MESH, Kind, Scope};

use crate::client::Client;
use crate::output::{self, Format, Table};

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// The kind, by plural or singular: meshtimeouts, meshtimeout, MeshTimeout.
    pub kind: String,
    /// One resource by name; all of them when left out.
    pub name: Option<String>,
    /// The mesh (ignored for global-scoped kinds such as meshes and zones).
    #[arg(short, long, default_value = DEFAULT_MESH)]
    pub mesh: String,
    /// List across every mesh.
    #[arg(short = 'A', long, conflicts_with_all = ["mesh", "name"])]
    pub all_meshes: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// Label selector, e.g. `app=web,tier!=db,canary,!legacy`.
    #[arg(short = 'l', long, value_name = "SEL", conflicts_with = "name")]
    pub selector: Option<String>,
    /// Page size of each list request (the server's default when left out); every page is fetched.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub size: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// The kind, by plural or singular.
    pub kind: String,
    pub name: String,
    /// The mesh (ignored for global-scoped kinds). Deleting a mesh deletes everything in it.
    #[arg(short, long, default_value = DEFAULT_MESH)]
    pub mesh: String,
}

/// Find a kind by plural or singular, any case; the error lists the valid kinds.
pub fn parse_kind(s: &str) -> Result<Kind> {
    if let Some(k) = Kind::lookup(s) {
        return Ok(k);
    }
    let plurals: Vec<&str> = Kind::ALL.iter().map(|k| k.plural()).collect();
    let lower = s.to_ascii_lowercase();
    let close = Kind::ALL
        .iter()
        .map(|k| k.plural())
        .min_by_key(|p| distance(&lower, p).min(distance(&lower, p.trim_end_matches('s'))))
        .filter(|p| distance(&lower, p).min(distance(&lower, p.trim_end_matches('s'))) <= 2);
    let hint = close
        .map(|p| format!("; did you mean {p}?"))
        .unwrap_or_default();
    Err(anyhow!(
        "unknown kind {s:?}{hint} (valid kinds: {})",
        plurals.join(", ")
    ))
}

/// Levenshtein distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Path segments of one resource.
pub fn item_path<'a>(kind: Kind, mesh: &'a str, name: &'a str) -> Vec<&'a str> {
    match kind.scope() {
        Scope::Global => vec![kind.plural(), name],
        Scope::Mesh => vec!["meshes", mesh, kind.plural(), name],
    }
}

/// Path segments of a list: one mesh, or every mesh when `mesh` is `None`.
pub fn list_path(kind: Kind, mesh: Option<&str>) -> Vec<&str> {
    match (kind.scope(), mesh) {
        (Scope::Mesh, Some(m)) => vec!["meshes", m, kind.plural()],
        _ => vec![kind.plural()],
    }
}

pub async fn run(client: &Client, args: &GetArgs) -> Result<String> {
    let kind = parse_kind(&args.kind)?;
    let now = Utc::now();
    if let Some(name) = &args.name {
        let doc = client.get(&item_path(kind, &args.mesh, name), &[]).await?;
        return Ok(match args.output {
            Format::Table => table(kind, std::slice::from_ref(&doc), now),
            Format::Yaml => output::yaml_docs(std::slice::from_ref(&doc)),
            Format::Json => output::json(&doc),
        });
    }
    if let Some(sel) = &args.selector {
        sel.parse::<weft_core::selector::Selector>()
            .map_err(|e| anyhow!("--selector {sel:?}: {e}"))?;
    }
    let mesh = (!args.all_meshes).then_some(args.mesh.as_str());
    let items = list(client, kind, mesh, args.selector.as_deref(), args.size).await?;
    Ok(match args.output {
        Format::Table if items.is_empty() => {
            let where_ = match (kind.scope(), mesh) {
                (Scope::Mesh, Some(m)) => format!(" in mesh {m:?}"),
                _ => String::new(),
            };
            eprintln!("no {}{where_}", kind.plural());
            String::new()
        }
        Format::Table => table(kind, &items, now),
        Format::Yaml => output::yaml_docs(&items),
        Format::Json => output::json(&json!({ "items": items })),
    })
}

/// Every item of a list, following `next` until the last page.
pub async fn list(
    client: &Client,
    kind: Kind,
    mesh: Option<&str>,
    selector: Option<&str>,
    size: Option<u64>,
) -> Result<Vec<Value>> {
    let path = list_path(kind, mesh);
    let size = size.map(|s| s.to_string());
    let mut items = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = selector {
            query.push(("labelSelector", s));
        }
        if let Some(s) = &size {
            query.push(("size", s));
        }
        if let Some(n) = &next {
            query.push(("next", n));
        }
        let page = client.get(&path, &query).await?;
        match page.get("items") {
            Some(Value::Array(page_items)) => items.extend(page_items.iter().cloned()),
            _ => bail!("unexpected answer listing {}: no items", kind.plural()),
        }
        let following = match page.get("next") {
            Some(Value::String(n)) if !n.is_empty() => n.clone(),
            _ => break,
        };
        if next.as_deref() == Some(following.as_str()) {
            bail!(
                "the server returned the same `next` ({following:?}) twice while listing {}",
                kind.plural()
            );
        }
        next = Some(following);
    }
    Ok(items)
}

/// `MeshService/backend`, `Mesh`, `MeshSubset[version=v2]`, `MeshService/backend:http`.
pub fn target_ref(spec: &Value) -> String {
    let Some(tr) = spec.get("targetRef") else {
        return "Mesh".to_string();
    };
    let mut s = tr
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    if let Some(name) = tr.get("name").and_then(Value::as_str) {
        s.push('/');
        s.push_str(name);
    }
    for field in ["tags", "labels"] {
        if let Some(Value::Object(m)) = tr.get(field)
            && !m.is_empty()
        {
            let kv: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
                .collect();
            s.push_str(&format!("[{}]", kv.join(",")));
        }
    }
    if let Some(section) = tr.get("sectionName").and_then(Value::as_str) {
        s.push(':');
        s.push_str(section);
    }
    s
}

/// The table for documents of one kind: MESH (mesh-scoped kinds), NAME, AGE, VERSION, and
/// TARGETREF for policies.
pub fn table(kind: Kind, docs: &[Value], now: DateTime<Utc>) -> String {
    let mesh_scoped = kind.scope() == Scope::Mesh;
    let mut header = Vec::new();
    if mesh_scoped {
        header.push("MESH");
    }
    header.extend(["NAME", "AGE", "VERSION"]);
    if kind.is_policy() {
        header.push("TARGETREF");
    }
    let mut t = Table::new(header);
    let str_of = |d: &Value, f: &str| d.get(f).and_then(Value::as_str).unwrap_or("").to_string();
    for d in docs {
        let mut row = Vec::new();
        if mesh_scoped {
            row.push(str_of(d, "mesh"));
        }
        row.push(str_of(d, "name"));
        row.push(output::doc_age(d, now));
        row.push(
            d.get("version")
                .map_or_else(|| "-".to_string(), |v| v.to_string()),
        );
        if kind.is_policy() {
            row.push(target_ref(d.get("spec").unwrap_or(&Value::Null)));
        }
        t.row(row);
    }
    t.render()
}

pub async fn delete(client: &Client, args: &DeleteArgs) -> Result<String> {
    let kind = parse_kind(&args.kind)?;
    client
        .delete(&item_path(kind, &args.mesh, &args.name))
        .await?;
    Ok(match kind.scope() {
        Scope::Mesh => format!("deleted {kind} {:?} in mesh {:?}\n", args.name, args.mesh),
        Scope::Global => format!("deleted {kind} {:?}\n", args.name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn kinds_by_plural_or_singular() {
        assert_eq!(parse_kind("meshtimeouts").unwrap(), Kind::MeshTimeout);
        assert_eq!(parse_kind("meshtimeout").unwrap(), Kind::MeshTimeout);
        assert_eq!(parse_kind("MeshHTTPRoute").unwrap(), Kind::MeshHTTPRoute);
        assert_eq!(parse_kind("meshes").unwrap(), Kind::Mesh);
    }

    #[test]
    fn unknown_kind_lists_valid_kinds() {
        let err = parse_kind("meshtimout").unwrap_err().to_string();
        assert!(
            err.starts_with(r#"unknown kind "meshtimout"; did you mean meshtimeouts?"#),
            "{err}"
        );
        for k in Kind::ALL {
            assert!(err.contains(k.plural()), "{err} lacks {}", k.plural());
        }
        let err = parse_kind("pods").unwrap_err().to_string();
        assert!(!err.contains("did you mean"), "{err}");
        assert!(
            err.contains("valid kinds: meshes, zones, dataplanes"),
            "{err}"
        );
    }

    #[test]
    fn paths_follow_the_scope() {
        assert_eq!(
            item_path(Kind::MeshTimeout, "m", "t"),
            ["meshes", "m", "meshtimeouts", "t"]
        );
        assert_eq!(item_path(Kind::Zone, "m", "east"), ["zones", "east"]);
        assert_eq!(
            list_path(Kind::MeshRetry, Some("m")),
            ["meshes", "m", "meshretries"]
        );
        assert_eq!(list_path(Kind::MeshRetry, None), ["meshretries"]);
        assert_eq!(
            list_path(Kind::Mesh, Some("default")),
            ["meshes"],
            "--mesh is ignored for global kinds"
        );
    }

    #[test]
    fn target_refs_are_short() {
        assert_eq!(target_ref(&json!({})), "Mesh");
        assert_eq!(
            target_ref(&json!({"targetRef": {"kind": "MeshService", "name": "backend"}})),
            "MeshService/backend"
        );
        assert_eq!(
            target_ref(
                &json!({"targetRef": {"kind": "MeshSubset", "tags": {"version": "v2", "zone": "east"}}})
            ),
            "MeshSubset[version=v2,zone=east]"
        );
        assert_eq!(
            target_ref(
                &json!({"targetRef": {"kind": "Dataplane", "labels": {"app": "web"}, "sectionName": "http"}})
            ),
            "Dataplane[app=web]:http"
        );
    }

    #[test]
    fn policy_table() {
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap();
        let docs = [
            json!({"type": "MeshTimeout", "name": "backend-timeouts", "mesh": "default", "version": 3,
                   "creationTime": "2026-11-22T09:59:55Z",
                   "spec": {"targetRef": {"kind": "MeshService", "name": "backend"}}}),
            json!({"type": "MeshTimeout", "name": "t", "mesh": "payments", "version": 12,
                   "creationTime": "2026-11-18T09:00:00Z", "spec": {"targetRef": {"kind": "Mesh"}}}),
        ];
        assert_eq!(
            table(Kind::MeshTimeout, &docs, now),
            "MESH       NAME               AGE   VERSION   TARGETREF\n\
             default    backend-timeouts   5s    3         MeshService/backend\n\
             payments   t                  4d    12        Mesh\n"
        );
    }

    #[test]
    fn global_table_has_no_mesh_column() {
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap();
        let docs = [
            json!({"type": "Mesh", "name": "default", "version": 1, "creationTime": "2026-11-22T08:00:00Z", "spec": {}}),
        ];
        assert_eq!(
            table(Kind::Mesh, &docs, now),
            "NAME      AGE   VERSION\ndefault   2h    1\n"
        );
    }
}
