//! The document form users write and read: `type`, `name`, `mesh`, `labels`, `spec`
//! (plus the read-only `version`, `creationTime`, `modificationTime`), in YAML or JSON,
//! one or many documents per file.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::kind::Kind;
use crate::resource::{Meta, Resource};
use crate::validate::{self, Invalid};

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Doc {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mesh: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    creation_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    modification_time: Option<DateTime<Utc>>,
    #[serde(default)]
    spec: Option<Value>,
}

/// Parse and validate one document given as a JSON value. The read-only fields
/// (`version`, times) are accepted, so that `get -o yaml` output can be applied again,
/// and carried in `meta`.
pub fn from_value(value: Value) -> Result<Resource, Invalid> {
    // Report the kind first: its spec depends on it.
    let kind_name = match value.get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(Invalid::one(
                "type",
                format!("expected a kind name, got {other}"),
            ));
        }
        None if value.is_object() => {
            return Err(Invalid::one(
                "type",
                format!("missing field (expected one of {})", Kind::names()),
            ));
        }
        None => {
            return Err(Invalid::one(
                "",
                format!("expected a resource object, got {}", short(&value)),
            ));
        }
    };
    let kind = Kind::from_name(&kind_name).ok_or_else(|| {
        Invalid::one(
            "type",
            crate::kind::UnknownKind(kind_name.clone()).to_string(),
        )
    })?;
    let doc: Doc = validate::from_value("", value)?;
    let mut r = Resource::new(
        kind,
        doc.mesh.as_deref(),
        &doc.name,
        doc.labels,
        doc.spec
            .unwrap_or_else(|| Value::Object(Default::default())),
    )?;
    r.meta = Meta {
        version: doc.version.unwrap_or(0),
        creation_time: doc.creation_time,
        modification_time: doc.modification_time,
    };
    Ok(r)
}

/// The document form of a resource, as JSON.
pub fn to_value(r: &Resource) -> Value {
    let doc = Doc {
        kind: r.kind.name().to_string(),
        name: r.name.clone(),
        mesh: r.mesh.clone(),
        labels: r.labels.clone(),
        version: (r.meta.version > 0).then_some(r.meta.version),
        creation_time: r.meta.creation_time,
        modification_time: r.meta.modification_time,
        spec: Some(r.spec.clone()),
    };
    serde_json::to_value(doc).expect("documents serialize")
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", &s[..57])
    } else {
        s
    }
}

/// One document of a multi-document input that failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct DocumentError {
    /// 1-based position in the input.
    pub index: usize,
    /// `MeshTimeout "x" in mesh "default"` when known.
    pub what: Option<String>,
    pub invalid: Invalid,
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.what {
            Some(w) => write!(f, "document {} ({w}): {}", self.index, self.invalid),
            None => write!(f, "document {}: {}", self.index, self.invalid),
        }
    }
}

/// Errors of a whole input: every failing document, or a syntax error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ParseError(pub Vec<DocumentError>);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msgs: Vec<String> = self.0.iter().map(|e| e.to_string()).collect();
        f.write_str(&msgs.join("\n"))
    }
}

/// `MeshTimeout "x" in mesh "default"`, for messages about a document not yet validated.
pub fn describe(v: &Value) -> Option<String> {
    let kind = v.get("type")?.as_str()?;
    let name = v.get("name").and_then(Value::as_str).unwrap_or("?");
    Some(match v.get("mesh").and_then(Value::as_str) {
        Some(m) => format!("{kind} {name:?} in mesh {m:?}"),
        None => format!("{kind} {name:?}"),
    })
}

/// Parse documents given as JSON values; every failing document is reported.
pub fn from_values(values: Vec<Value>) -> Result<Vec<Resource>, ParseError> {
    let mut out = Vec::with_capacity(values.len());
    let mut errs = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        let what = describe(&v);
        match from_value(v) {
            Ok(r) => out.push(r),
            Err(invalid) => errs.push(DocumentError {
                index: i + 1,
                what,
                invalid,
            }),
        }
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(ParseError(errs))
    }
}

/// Split YAML text (one or more `---`-separated documents) into JSON values, skipping empty
/// documents. A syntax error names the line and column.
pub fn yaml_values(text: &str) -> Result<Vec<Value>, ParseError> {
    // serde-saphyr's default budget stops at 1,024 documents; a policy file may hold tens of
    // thousands. Scale the limits to the input instead, keeping the alias limits that
    // protect against expansion bombs.
    let budget = serde_saphyr::budget! {
        max_documents: usize::MAX,
        max_events: 64 + text.len(),
        max_nodes: 64 + text.len(),
        max_total_scalar_bytes: 64 + text.len(),
    };
    let options = serde_saphyr::options! { budget: budget };
    let docs: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| {
            ParseError(vec![DocumentError {
                index: 1,
                what: None,
                invalid: Invalid::one("", format!("malformed YAML: {e}")),
            }])
        })?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Split JSON text into values: one object, an array of objects, or `{"items": [...]}`.
pub fn json_values(text: &str) -> Result<Vec<Value>, ParseError> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        ParseError(vec![DocumentError {
            index: 1,
            what: None,
            invalid: Invalid::one("", format!("malformed JSON: {e}")),
        }])
    })?;
    Ok(match v {
        Value::Array(items) => items,
        Value::Object(mut m)
            if !m.contains_key("type") && m.get("items").is_some_and(Value::is_array) =>
        {
            match m.remove("items") {
                Some(Value::Array(items)) => items,
                _ => unreachable!("checked above"),
            }
        }
        other => vec![other],
    })
}

/// Parse YAML or JSON text (JSON when it starts with `{` or `[`).
pub fn parse(text: &str) -> Result<Vec<Resource>, ParseError> {
    let t = text.trim_start();
    let values = if t.starts_with('{') || t.starts_with('[') {
        json_values(text)?
    } else {
        yaml_values(text)?
    };
    from_values(values)
}

/// Multi-document YAML for the given resources.
pub fn to_yaml(resources: &[Resource]) -> String {
    let mut out = String::new();
    for (i, r) in resources.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&document_to_yaml(&to_value(r)));
    }
    out
}

/// A document as YAML with its fields in the order users know (`type`, `name`, `mesh`,
/// `labels`, ..., `spec`) rather than alphabetically; other values as they are.
pub fn document_to_yaml(v: &Value) -> String {
    match serde_json::from_value::<Doc>(v.clone()) {
        Ok(doc) => {
            let mut s = serde_saphyr::to_string(&doc).expect("documents serialize to YAML");
            if !s.ends_with('\n') {
                s.push('\n');
            }
            s
        }
        Err(_) => value_to_yaml(v),
    }
}

/// One value as YAML text.
pub fn value_to_yaml(v: &Value) -> String {
    let mut s = serde_saphyr::to_string(v).expect("JSON values serialize to YAML");
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// A JSON array of documents for the given resources.
pub fn to_json(resources: &[Resource]) -> String {
    let docs: Vec<Value> = resources.iter().map(to_value).collect();
    serde_json::to_string_pretty(&docs).expect("JSON values serialize")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const TIMEOUT: &str = "type: MeshTimeout\nname: t\nmesh: default\nspec:\n  to:\n    - targetRef: {kind: Mesh}\n      default: {idleTimeout: 1s}\n";

    #[test]
    fn json_input_forms() {
        let doc = json!({"type": "Zone", "name": "east", "spec": {}});
        for text in [
            doc.to_string(),
            json!([doc, doc]).to_string(),
            json!({"items": [doc]}).to_string(),
        ] {
            let values = json_values(&text).unwrap();
            assert!(!values.is_empty(), "{text}");
            assert!(values.iter().all(|v| v == &doc), "{text}");
        }
        // An object with `type` is a document even if it has an `items` field.
        let odd = json!({"type": "Zone", "name": "z", "items": []});
        assert_eq!(json_values(&odd.to_string()).unwrap(), [odd]);
    }

    #[test]
    fn empty_yaml_documents_are_skipped() {
        let text = format!("---\n{TIMEOUT}---\n---\n{TIMEOUT}");
        assert_eq!(parse(&text).unwrap().len(), 2);
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn read_only_fields_are_carried_and_written_back() {
        let text = format!(
            "{TIMEOUT}version: 7\ncreationTime: 2026-11-22T10:00:00Z\nmodificationTime: 2026-11-22T10:05:00Z\n"
        );
        let r = parse(&text).unwrap().remove(0);
        assert_eq!(r.meta.version, 7);
        assert_eq!(
            r.meta.creation_time.unwrap().to_rfc3339(),
            "2026-11-22T10:00:00+00:00"
        );
        let v = to_value(&r);
        assert_eq!(v["version"], 7);
        assert_eq!(v["modificationTime"], "2026-11-22T10:05:00Z");
        assert_eq!(parse(&to_yaml(&[r.clone()])).unwrap(), [r]);

        // Never-stored resources (version 0) have no read-only fields.
        let fresh = parse(TIMEOUT).unwrap().remove(0);
        let v = to_value(&fresh);
        for field in ["version", "creationTime", "modificationTime"] {
            assert!(v.get(field).is_none(), "{field} in {v}");
        }
    }

    #[test]
    fn missing_spec_is_an_empty_object_in_canonical_form() {
        let r = parse("type: Zone\nname: east\n").unwrap().remove(0);
        assert_eq!(r.spec, json!({"enabled": true}));
        let err = parse("type: Dataplane\nname: dp\nmesh: default\n").unwrap_err();
        assert_eq!(err.0[0].invalid.errors[0].field, "spec");
        assert!(
            err.0[0].invalid.errors[0]
                .message
                .contains("missing field `networking`"),
            "{err}"
        );
    }

    #[test]
    fn documents_are_described_before_validation() {
        assert_eq!(
            describe(&json!({"type": "Zone", "name": "east"})).as_deref(),
            Some(r#"Zone "east""#)
        );
        assert_eq!(
            describe(&json!({"type": "MeshTimeout", "mesh": "default"})).as_deref(),
            Some(r#"MeshTimeout "?" in mesh "default""#)
        );
        assert_eq!(describe(&json!({"name": "x"})), None);
    }

    #[test]
    fn a_document_that_is_not_an_object() {
        let err = parse("- a\n- b\n").unwrap_err();
        assert_eq!(
            err.0[0].invalid.errors[0].message,
            r#"expected a resource object, got ["a","b"]"#
        );
        let err = parse("type: 5\nname: x\n").unwrap_err();
        assert_eq!(
            err.0[0].invalid.to_string(),
            "type: expected a kind name, got 5"
        );
    }
}

#[cfg(test)]
mod large_inputs {
    #[test]
    fn many_documents_parse() {
        let doc = "type: Zone\nname: z{i}\nspec: {enabled: true}\n";
        let text: Vec<String> = (0..5000)
            .map(|i| doc.replace("{i}", &i.to_string()))
            .collect();
        let parsed = super::parse(&text.join("---\n")).unwrap();
        assert_eq!(parsed.len(), 5000);
    }

    #[test]
    fn alias_bombs_are_still_refused() {
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let prev = (b'a' + i - 1) as char;
            let cur = (b'a' + i) as char;
            bomb.push_str(&format!("{cur}: &{cur} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        assert!(super::yaml_values(&bomb).is_err());
    }
}

#[cfg(test)]
mod field_order {
    #[test]
    fn yaml_lists_type_and_name_first() {
        let r = super::parse("type: Zone\nname: east\nlabels: {team: a}\nspec: {enabled: true}\n")
            .unwrap();
        let y = super::to_yaml(&r);
        let keys: Vec<&str> = y
            .lines()
            .filter(|l| !l.starts_with(' '))
            .map(|l| l.split(':').next().unwrap())
            .collect();
        assert_eq!(keys, ["type", "name", "labels", "spec"], "{y}");
        assert_eq!(super::parse(&y).unwrap(), r);
    }
}
