//! Runs the built `weftctl` against a tiny fake HTTP server on 127.0.0.1:0 that records
//! requests and answers canned responses. (The real server is tested end to end elsewhere.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

#[derive(Clone, Debug)]
struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: String,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

type Handler = dyn Fn(&Request) -> (u16, String) + Send + Sync;

/// A one-request-per-connection HTTP/1.1 server recording what it receives.
struct FakeServer {
    address: String,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl FakeServer {
    fn start(handler: impl Fn(&Request) -> (u16, String) + Send + Sync + 'static) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let handler: Arc<Handler> = Arc::new(handler);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if let Some(req) = read_request(&stream) {
                    let (status, body) = handler(&req);
                    recorded.lock().unwrap().push(req);
                    respond(stream, status, &body);
                }
            }
        });
        FakeServer { address, requests }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
        headers,
        body: String::from_utf8(body).unwrap(),
    })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

fn respond(mut stream: TcpStream, status: u16, body: &str) {
    let resp = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes());
}

/// Run weftctl with a private config file and no WEFTCTL_* or proxy settings inherited.
fn weftctl(config_dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weftctl"));
    cmd.args(args)
        .env("WEFTCTL_CONFIG", config_dir.join("weftctl.yaml"));
    for var in [
        "WEFTCTL_ADDRESS",
        "WEFTCTL_TOKEN",
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const MESH: &str = "type: Mesh\nname: default\n";

fn mk_timeout(name: &str, idle: &str) -> String {
    format!(
        "type: MeshTimeout\nname: {name}\nmesh: default\nspec:\n  targetRef: {{kind: MeshService, name: backend}}\n  to:\n  - targetRef: {{kind: Mesh}}\n    default: {{idleTimeout: {idle}}}\n"
    )
}

fn ok_apply(req: &Request) -> (u16, String) {
    let docs = req.json();
    let n = docs.as_array().map_or(0, Vec::len) as u64;
    let dry = req.query("dryRun") == Some("true");
    // The first document of each batch is "updated", the rest "created".
    let body = json!({"dryRun": dry, "results": [], "summary": {"created": n - 1, "updated": 1, "unchanged": 0}});
    (200, body.to_string())
}

#[test]
fn apply_sends_every_document_with_the_token_and_prints_the_summary() {
    let server = FakeServer::start(|req| match req.path.as_str() {
        "/_apply" => ok_apply(req),
        _ => (
            404,
            json!({"status": 404, "title": "not found", "detail": "no route"}).to_string(),
        ),
    });
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(
        manifests.join("b-timeouts.yaml"),
        format!("{}---\n{}", mk_timeout("t1", "1h"), mk_timeout("t2", "5m")),
    )
    .unwrap();
    std::fs::write(manifests.join("a-mesh.yml"), MESH).unwrap();
    std::fs::write(manifests.join("README.md"), "not a manifest").unwrap();

    let out = weftctl(
        dir.path(),
        &[
            "--address",
            &server.address,
            "--token",
            "s3cret",
            "apply",
            "-f",
            manifests.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "created: 2, updated: 1, unchanged: 0\n");

    let reqs = server.requests();
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    let r = &reqs[0];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/_apply"));
    assert_eq!(r.query("dryRun"), None);
    assert_eq!(r.header("authorization"), Some("Bearer s3cret"));
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let body = r.json();
    let docs = body.as_array().expect("a JSON array of documents");
    let names: Vec<(&str, &str)> = docs
        .iter()
        .map(|d| (d["type"].as_str().unwrap(), d["name"].as_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            ("Mesh", "default"),
            ("MeshTimeout", "t1"),
            ("MeshTimeout", "t2")
        ]
    );
    assert_eq!(docs[1]["mesh"], "default");
    assert_eq!(
        docs[1]["spec"]["targetRef"],
        json!({"kind": "MeshService", "name": "backend"})
    );
    assert_eq!(docs[2]["spec"]["to"][0]["default"]["idleTimeout"], "5m");
}

#[test]
fn apply_in_batches_with_dry_run_sums_the_summaries() {
    let server = FakeServer::start(ok_apply);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("all.yaml");
    let docs: Vec<String> = (1..=5)
        .map(|i| mk_timeout(&format!("t{i}"), "1h"))
        .collect();
    std::fs::write(&file, docs.join("---\n")).unwrap();

    let out = weftctl(
        dir.path(),
        &[
            "--address",
            &server.address,
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--dry-run",
            "--batch-size",
            "2",
        ],
    );
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    // Three batches (2, 2, 1): each "updates" one and "creates" the rest.
    assert_eq!(
        stdout(&out),
        "created: 2, updated: 3, unchanged: 0 (dry run)\n"
    );
    let reqs = server.requests();
    let sizes: Vec<usize> = reqs
        .iter()
        .map(|r| r.json().as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [2, 2, 1]);
    assert!(
        reqs.iter().all(|r| r.query("dryRun") == Some("true")),
        "{reqs:#?}"
    );
    assert!(
        reqs.iter().all(|r| r.header("authorization").is_none()),
        "no token was given"
    );
}

#[test]
fn apply_prints_the_servers_detail_on_400_and_exits_1() {
    let detail =
        r#"document 2 (MeshTimeout "t2" in mesh "default"): mesh "default" does not exist"#;
    let server = FakeServer::start(move |_| {
        let body = json!({"status": 400, "title": "invalid resource", "detail": detail,
            "errors": [{"document": 2, "field": "mesh", "message": "mesh \"default\" does not exist"}]});
        (400, body.to_string())
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.yaml");
    std::fs::write(
        &file,
        format!("{}---\n{}", mk_timeout("t1", "1h"), mk_timeout("t2", "1h")),
    )
    .unwrap();

    let out = weftctl(
        dir.path(),
        &[
            "--address",
            &server.address,
            "apply",
            "-f",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.starts_with(&format!("Error: {detail}\n")), "{err}");
    // The problem is located in the user's file.
    assert!(err.contains("t.yaml: document 2 (MeshTimeout \"t2\" in mesh \"default\"): mesh: mesh \"default\" does not exist"), "{err}");
    assert_eq!(stdout(&out), "");
}

#[test]
fn apply_failure_in_a_later_batch_says_what_was_already_written() {
    let calls = Arc::new(Mutex::new(0));
    let server = FakeServer::start(move |req| {
        let mut n = calls.lock().unwrap();
        *n += 1;
        if *n == 1 {
            return ok_apply(req);
        }
        let body = json!({"status": 400, "title": "invalid resource", "detail": "document 1: spec: bad",
            "errors": [{"document": 1, "field": "spec", "message": "bad"}]});
        (400, body.to_string())
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("all.yaml");
    let docs: Vec<String> = (1..=3)
        .map(|i| mk_timeout(&format!("t{i}"), "1h"))
        .collect();
    std::fs::write(&file, docs.join("---\n")).unwrap();

    let out = weftctl(
        dir.path(),
        &[
            "--address",
            &server.address,
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--batch-size",
            "2",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.starts_with("Error: document 1: spec: bad\n"), "{err}");
    assert!(
        err.contains("all.yaml: document 3 (MeshTimeout \"t3\" in mesh \"default\"): spec: bad"),
        "{err}"
    );
    assert!(
        err.contains("note: the first 2 documents were applied before this error (created: 1, updated: 1, unchanged: 0); nothing of this batch was written"),
        "{err}"
    );
}

#[test]
fn apply_sends_nothing_when_a_document_is_invalid() {
    let server = FakeServer::start(ok_apply);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), mk_timeout("good", "1h")).unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        format!(
            "{}---\n{}",
            mk_timeout("ok", "1h"),
            mk_timeout("bad", "5 seconds")
        ),
    )
    .unwrap();

    let out = weftctl(
        dir.path(),
        &[
            "--address",
            &server.address,
            "apply",
            "-f",
            dir.path().to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("nothing was sent"), "{err}");
    assert!(err.contains(r#"b.yaml: document 2 (MeshTimeout "bad" in mesh "default"): spec.to[0].default.idleTimeout: "#), "{err}");
    assert!(
        server.requests().is_empty(),
        "sent {:#?}",
        server.requests()
    );
}

fn mk_doc(name: &str, version: u64) -> Value {
    json!({"type": "MeshTimeout", "name": name, "mesh": "default", "version": version,
           "creationTime": "2020-01-01T00:00:00Z", "modificationTime": "2020-01-01T00:00:00Z",
           "spec": {"targetRef": {"kind": "MeshService", "name": "backend"},
                    "to": [{"targetRef": {"kind": "Mesh"}, "default": {"idleTimeout": "1h"}}]}})
}

fn paged_timeouts(req: &Request) -> (u16, String) {
    if req.path != "/meshes/default/meshtimeouts" {
        return (404, json!({"status": 404, "title": "not found", "detail": format!("no route {}", req.path)}).to_string());
    }
    let body = match req.query("next") {
        None => json!({"items": [mk_doc("a", 1), mk_doc("b", 2)], "next": "default/b"}),
        Some("default/b") => json!({"items": [mk_doc("c", 7)], "next": null}),
        Some(other) => panic!("unexpected next {other}"),
    };
    (200, body.to_string())
}

#[test]
fn get_follows_next_until_the_last_page() {
    let server = FakeServer::start(paged_timeouts);
    let dir = tempfile::tempdir().unwrap();

    let out = weftctl(
        dir.path(),
        &[
            "--address",
            &server.address,
            "--token",
            "t",
            "get",
            "meshtimeouts",
            "--size",
            "2",
            "-l",
            "app=web",
        ],
    );
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let table = stdout(&out);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["MESH", "NAME", "AGE", "VERSION", "TARGETREF"]
    );
    let row: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!(row[..2], ["default", "c"]);
    assert!(
        row[2].ends_with('y') || row[2].ends_with('d'),
        "age {}",
        row[2]
    );
    assert_eq!(row[3..], ["7", "MeshService/backend"]);

    let reqs = server.requests();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    assert!(
        reqs.iter()
            .all(|r| r.method == "GET" && r.header("authorization") == Some("Bearer t"))
    );
    assert_eq!(reqs[0].query("next"), None);
    assert_eq!(reqs[1].query("next"), Some("default/b"));
    assert!(
        reqs.iter()
            .all(|r| r.query("size") == Some("2") && r.query("labelSelector") == Some("app=web"))
    );

    let out = weftctl(
        dir.path(),
        &[
            "--address",
            &server.address,
            "get",
            "meshtimeout",
            "-o",
            "json",
        ],
    );
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);

    let out = weftctl(
        dir.path(),
        &[
            "--address",
            &server.address,
            "get",
            "MeshTimeout",
            "-o",
            "yaml",
        ],
    );
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let yaml = stdout(&out);
    assert_eq!(yaml.matches("---\n").count(), 2, "{yaml}");
    assert!(yaml.contains("name: c"), "{yaml}");
}

#[test]
fn config_add_checks_healthz_and_later_commands_use_the_stored_token() {
    let server = FakeServer::start(|req| match req.path.as_str() {
        "/healthz" => (200, "{}".to_string()),
        _ => paged_timeouts(req),
    });
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "from-file\n").unwrap();

    let out = weftctl(
        dir.path(),
        &[
            "config",
            "control-planes",
            "add",
            "--name",
            "local",
            "--address",
            &server.address,
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let again = weftctl(
        dir.path(),
        &[
            "config",
            "control-planes",
            "add",
            "--name",
            "local",
            "--address",
            &server.address,
        ],
    );
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("--overwrite"), "{}", stderr(&again));

    let out = weftctl(dir.path(), &["get", "meshtimeouts"]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let reqs = server.requests();
    assert_eq!(reqs[0].path, "/healthz");
    assert_eq!(reqs[0].header("authorization"), None);
    assert_eq!(
        reqs.len(),
        3,
        "add is checked once, the duplicate is refused before any request: {reqs:#?}"
    );
    assert!(
        reqs[1..]
            .iter()
            .all(|r| r.header("authorization") == Some("Bearer from-file")),
        "{reqs:#?}"
    );

    let list = weftctl(dir.path(), &["config", "control-planes", "list"]);
    let text = stdout(&list);
    assert!(
        text.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("local") && l.ends_with('*')),
        "{text}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("weftctl.yaml"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[test]
fn unreachable_control_plane_names_the_address_and_how_to_add_one() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let out = weftctl(dir.path(), &["--address", &address, "get", "meshes"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&address) && err.contains("connection refused"),
        "{err}"
    );
    assert!(err.contains("weftctl config control-planes add"), "{err}");

    let out = weftctl(
        dir.path(),
        &[
            "config",
            "control-planes",
            "add",
            "--name",
            "x",
            "--address",
            &address,
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--skip-verify"), "{}", stderr(&out));
    assert!(
        !dir.path().join("weftctl.yaml").exists(),
        "nothing saved when the check fails"
    );
}

#[test]
fn auth_failures_say_what_is_wrong_with_the_token() {
    let server = FakeServer::start(|req| match req.method.as_str() {
        "GET" => (
            401,
            json!({"status": 401, "title": "unauthorized", "detail": "missing or unknown token"})
                .to_string(),
        ),
        _ => (
            403,
            json!({"status": 403, "title": "forbidden", "detail": "read-only token"}).to_string(),
        ),
    });
    let dir = tempfile::tempdir().unwrap();
    let out = weftctl(dir.path(), &["--address", &server.address, "get", "meshes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("token is missing or invalid"),
        "{}",
        stderr(&out)
    );

    let out = weftctl(
        dir.path(),
        &["--address", &server.address, "delete", "meshtimeout", "t1"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("read-only"), "{}", stderr(&out));
    let reqs = server.requests();
    assert_eq!(
        (reqs[1].method.as_str(), reqs[1].path.as_str()),
        ("DELETE", "/meshes/default/meshtimeouts/t1")
    );
}

/// A zone answering the data-plane inspect routes.
fn fake_zone() -> FakeServer {
    FakeServer::start(|req| {
        match req.path.as_str() {
        "/_inspect/dataplanes" => {
            let all = json!([
                {"name": "web-1", "mesh": "default", "zone": "east", "service": "web", "status": "online", "certExpires": "2999-01-01T00:00:00Z"},
                {"name": "db-1", "mesh": "data", "zone": "east", "service": "db", "status": "offline", "certExpires": null}
            ]);
            let items: Vec<Value> = all
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| req.query("mesh").is_none_or(|m| d["mesh"] == m))
                .cloned()
                .collect();
            (200, json!({ "items": items }).to_string())
        }
        "/_inspect/dataplanes/default/web-1/config" => (
            200,
            json!({"mesh": "default", "name": "web-1", "status": "online",
                "view": {"dataplane": "web-1", "mtls": true},
                "services": {"api": {"protocol": "http", "endpoints": [{"address": "10.0.0.2", "port": 9090}]}},
                "certificate": {"notAfter": "2999-01-01T00:00:00Z", "spiffeId": "spiffe://default/web"}})
            .to_string(),
        ),
        p if p.starts_with("/_inspect/dataplanes/") => (
            404,
            json!({"status": 404, "title": "not found", "detail": "dataplane \"ghost\" of mesh \"default\" has not connected to zone east since it started"}).to_string(),
        ),
        _ => (
            404,
            json!({"status": 404, "title": "not found", "detail": "no such route (see /openapi.json)"}).to_string(),
        ),
    }
    })
}

#[test]
fn inspect_dataplanes_lists_one_mesh_or_all() {
    let dir = tempfile::tempdir().unwrap();
    let zone = fake_zone();
    let out = weftctl(
        dir.path(),
        &["inspect", "dataplanes", "--address", &zone.address],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("NAME")
            && lines[0].contains("SERVICE")
            && lines[0].ends_with("CERT EXPIRES"),
        "{text}"
    );
    assert_eq!(lines.len(), 2, "only mesh default: {text}");
    assert!(
        lines[1].contains("web-1") && lines[1].contains("online") && lines[1].contains("in "),
        "{text}"
    );
    assert_eq!(zone.requests()[0].query("mesh"), Some("default"));

    let out = weftctl(
        dir.path(),
        &["inspect", "dataplanes", "-A", "--address", &zone.address],
    );
    let text = stdout(&out);
    assert!(text.contains("db-1") && text.contains("offline"), "{text}");
    assert_eq!(zone.requests()[1].query("mesh"), None);
    assert_eq!(zone.requests()[1].path, "/_inspect/dataplanes");
}

#[test]
fn inspect_dataplane_config_prints_json_or_yaml_and_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let zone = fake_zone();
    let out = weftctl(
        dir.path(),
        &[
            "inspect",
            "dataplane",
            "web-1",
            "--config",
            "--address",
            &zone.address,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["services"]["api"]["protocol"], "http");
    assert_eq!(v["certificate"]["spiffeId"], "spiffe://default/web");

    let out = weftctl(
        dir.path(),
        &[
            "inspect",
            "dataplane",
            "web-1",
            "--address",
            &zone.address,
            "--config",
            "-o",
            "yaml",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("spiffeId: spiffe://default/web"),
        "{}",
        stdout(&out)
    );

    let out = weftctl(
        dir.path(),
        &[
            "inspect",
            "dataplane",
            "ghost",
            "--config",
            "--address",
            &zone.address,
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("dataplane \"ghost\" of mesh \"default\"")
            && err.contains("weftctl inspect dataplanes -A"),
        "{err}"
    );
}

#[test]
fn inspect_dataplanes_against_global_says_to_ask_the_zone() {
    let dir = tempfile::tempdir().unwrap();
    let global = FakeServer::start(|_| {
        (
            404,
            json!({"status": 404, "title": "not found", "detail": "no such route (see /openapi.json)"}).to_string(),
        )
    });
    let out = weftctl(
        dir.path(),
        &["inspect", "dataplanes", "--address", &global.address],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("inspected on their zone control plane"),
        "{err}"
    );
}
