//! The OpenAPI 3.1 document served at `/openapi.json`, generated from the kind table so it
//! always matches the routes in [`crate::api::router`] (a test walks it against the router).
//! Each [`Plane`] gets its own document: write operations are listed only for the kinds that
//! plane accepts.

use serde_json::{Map, Value, json};
use weft_core::{Kind, Scope};

use crate::api::Plane;

fn op(summary: String, tag: &str, params: &[&str], body: bool, ok: (&str, &str)) -> Value {
    let mut o = json!({
        "summary": summary,
        "tags": [tag],
        "parameters": params.iter().map(|p| param(p)).collect::<Vec<_>>(),
        "responses": {
            ok.0: {"description": ok.1, "content": {"application/json": {"schema": {"$ref": ref_for(ok.1)}}}},
            "default": {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        }
    });
    if body {
        o["requestBody"] = json!({"required": true, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Resource"}},
            "application/yaml": {"schema": {"type": "string"}}
        }});
    }
    o
}

fn ref_for(what: &str) -> &'static str {
    match what {
        "list" => "#/components/schemas/List",
        "apply" => "#/components/schemas/ApplyResult",
        "inspect" => "#/components/schemas/MeshCounts",
        "deleted" => "#/components/schemas/Empty",
        _ => "#/components/schemas/Resource",
    }
}

fn param(name: &str) -> Value {
    match name {
        "mesh" | "name" => {
            json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
        }
        "labelSelector" => {
            json!({"name": name, "in": "query", "schema": {"type": "string"}, "example": "team=payments,!legacy"})
        }
        "size" => {
            json!({"name": name, "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": crate::api::MAX_PAGE}})
        }
        "next" => json!({"name": name, "in": "query", "schema": {"type": "string"}}),
        "dryRun" => json!({"name": name, "in": "query", "schema": {"type": "boolean"}}),
        "If-Match" | "If-None-Match" => {
            json!({"name": name, "in": "header", "schema": {"type": "string"}})
        }
        other => unreachable!("unknown parameter {other}"),
    }
}

/// Every path with its methods: `(path, [method, ...])`, the list the router must serve.
pub fn paths(plane: &Plane) -> Vec<(String, Vec<&'static str>)> {
    let doc = document(plane);
    doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .map(|(p, ops)| {
            (
                p.clone(),
                ops.as_object()
                    .expect("ops")
                    .keys()
                    .map(|m| leak(m))
                    .collect(),
            )
        })
        .collect()
}

fn leak(m: &str) -> &'static str {
    match m {
        "get" => "get",
        "put" => "put",
        "post" => "post",
        "delete" => "delete",
        other => unreachable!("unexpected method {other}"),
    }
}

/// The document for the API as `plane` serves it.
pub fn document(plane: &Plane) -> Value {
    let mut paths = Map::new();
    let list_params = ["labelSelector", "size", "next"];
    for &kind in Kind::ALL {
        let (name, plural) = (kind.name(), kind.plural());
        let writable = plane.accepts(kind);
        match kind.scope() {
            Scope::Global => {
                paths.insert(format!("/{plural}"), json!({"get": op(format!("List {name} resources"), name, &list_params, false, ("200", "list"))}));
                let mut one = json!({"get": op(format!("Get a {name}"), name, &["name"], false, ("200", "resource"))});
                if writable {
                    one["put"] = op(
                        format!("Create or update a {name}"),
                        name,
                        &["name", "If-Match", "If-None-Match"],
                        true,
                        ("200", "resource"),
                    );
                    one["delete"] = op(
                        format!("Delete a {name}"),
                        name,
                        &["name", "If-Match"],
                        false,
                        ("200", "deleted"),
                    );
                }
                paths.insert(format!("/{plural}/{{name}}"), one);
            }
            Scope::Mesh => {
                paths.insert(format!("/{plural}"), json!({"get": op(format!("List {name} resources in every mesh"), name, &list_params, false, ("200", "list"))}));
                paths.insert(
                    format!("/meshes/{{mesh}}/{plural}"),
                    json!({"get": op(format!("List {name} resources in a mesh"), name, &["mesh", "labelSelector", "size", "next"], false, ("200", "list"))}),
                );
                let mut one = json!({"get": op(format!("Get a {name}"), name, &["mesh", "name"], false, ("200", "resource"))});
                if writable {
                    one["put"] = op(
                        format!("Create or update a {name}"),
                        name,
                        &["mesh", "name", "If-Match", "If-None-Match"],
                        true,
                        ("200", "resource"),
                    );
                    one["delete"] = op(
                        format!("Delete a {name}"),
                        name,
                        &["mesh", "name", "If-Match"],
                        false,
                        ("200", "deleted"),
                    );
                }
                paths.insert(format!("/meshes/{{mesh}}/{plural}/{{name}}"), one);
            }
        }
    }
    let mut apply = json!({"post": op("Create or update many resources in one transaction".into(), "apply", &["dryRun"], false, ("200", "apply"))});
    let accepted: Vec<&str> = Kind::ALL
        .iter()
        .filter(|k| plane.accepts(**k))
        .map(|k| k.name())
        .collect();
    apply["post"]["description"] = format!("Accepts {}.", accepted.join(", ")).into();
    apply["post"]["requestBody"] = json!({"required": true, "content": {
        "application/yaml": {"schema": {"type": "string", "description": "---separated documents"}},
        "application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Resource"}}}
    }});
    paths.insert("/_apply".into(), apply);
    paths.insert("/_inspect/meshes".into(), json!({"get": op("Resource counts per mesh".into(), "inspect", &[], false, ("200", "inspect"))}));
    paths.insert("/_inspect/services".into(), json!({"get": op("Services per mesh: the zones that run them and their instances (and a zone's VIP)".into(), "inspect", &[], false, ("200", "inspect"))}));
    if *plane == Plane::Global {
        paths.insert("/_inspect/zones".into(), json!({"get": op("Zones with their connection status, last seen, version and KDS counts".into(), "inspect", &[], false, ("200", "inspect"))}));
        let token_op = |summary: &str| json!({"summary": summary, "tags": ["tokens"], "responses": {"200": {"description": "ok"}, "default": {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}}});
        let mut issue =
            token_op("Issue a zone token: {zone, scope: zone|ingress|egress, validFor: 720h}");
        issue["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["zone"], "properties": {"zone": {"type": "string"}, "scope": {"type": "string", "enum": ["zone", "ingress", "egress"]}, "validFor": {"type": "string"}}}}}});
        paths.insert("/_tokens/zone".into(), json!({"post": issue}));
        let mut dataplane = token_op(
            "Issue a dataplane token: {mesh, name, service, validFor: 720h}; the mesh must exist",
        );
        dataplane["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["mesh", "name", "service"], "properties": {"mesh": {"type": "string"}, "name": {"type": "string"}, "service": {"type": "string"}, "validFor": {"type": "string"}}}}}});
        paths.insert("/_tokens/dataplane".into(), json!({"post": dataplane}));
        let mut revoke = token_op("Revoke a zone or dataplane token by id");
        revoke["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}}}}});
        paths.insert("/_tokens/revoke".into(), json!({"post": revoke}));
        paths.insert(
            "/_tokens/revoked".into(),
            json!({"get": token_op("List revoked token ids (zone and dataplane)")}),
        );
    }
    for (p, what) in [
        ("/healthz", "Liveness"),
        ("/readyz", "Readiness: 200 only when the store is reachable"),
        ("/metrics", "Prometheus metrics"),
        ("/openapi.json", "This document"),
    ] {
        paths.insert(p.into(), json!({"get": {"summary": what, "tags": ["system"], "security": [], "responses": {"200": {"description": "ok"}}}}));
    }
    let title = match plane {
        Plane::Global => "weft global control plane",
        Plane::Zone { .. } => "weft zone control plane",
    };
    json!({
        "openapi": "3.1.0",
        "info": {"title": title, "version": env!("CARGO_PKG_VERSION")},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Resource": {"type": "object", "required": ["type", "name", "spec"], "properties": {
                    "type": {"type": "string", "enum": Kind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>()},
                    "name": {"type": "string"}, "mesh": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "version": {"type": "integer", "readOnly": true},
                    "creationTime": {"type": "string", "format": "date-time", "readOnly": true},
                    "modificationTime": {"type": "string", "format": "date-time", "readOnly": true},
                    "spec": {"type": "object"}}},
                "List": {"type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Resource"}}, "next": {"type": ["string", "null"]}}},
                "ApplyResult": {"type": "object", "properties": {"dryRun": {"type": "boolean"}, "results": {"type": "array", "items": {"type": "object"}}, "summary": {"type": "object"}}},
                "MeshCounts": {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object"}}}},
                "Empty": {"type": "object"},
                "Error": {"type": "object", "properties": {"status": {"type": "integer"}, "title": {"type": "string"}, "detail": {"type": "string"},
                    "errors": {"type": "array", "items": {"type": "object", "properties": {"document": {"type": "integer"}, "field": {"type": "string"}, "message": {"type": "string"}}}}}}
            }
        }
    })
}
