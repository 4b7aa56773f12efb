//! Benchmark: `weftctl apply` of one file of N MeshTimeouts and `weftctl get meshtimeouts`
//! listing them, against weft-global on PostgreSQL and on the memory store, in one run.
//!
//! Usage: `cargo build --release --bins && target/release/bench-apply [N] [RUNS]`
//! (needs WEFT_TEST_POSTGRES_URL, or Postgres at postgres://weft:weft@127.0.0.1:5432/postgres;
//! `bash .ci/postgres.sh` starts one). Prints a table and writes `target/bench-apply.json`.

use std::time::Instant;

use serde_json::json;
use weft_global::pg::testing::TestDb;
use weft_tests::{Backend, Global, fixtures, ok};

struct Row {
    store: &'static str,
    op: &'static str,
    seconds: Vec<f64>,
    requests: usize,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(Ok(10_000), |s| s.parse())?;
    let runs: usize = args.get(2).map_or(Ok(3), |s| s.parse())?;
    let batch = 500;
    let page = 1000;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("policies.yaml");
    std::fs::write(&file, fixtures::timeouts(n, "default"))?;
    let file = file.to_str().unwrap().to_string();
    eprintln!(
        "{n} MeshTimeouts in {file} ({} bytes), {runs} runs per store",
        std::fs::metadata(&file)?.len()
    );
    let mut rows = Vec::new();
    for store in ["postgres", "memory"] {
        let mut apply = Vec::new();
        let mut list = Vec::new();
        for run in 0..runs {
            // A fresh global (and database) per run: every apply creates all N.
            let db;
            let backend = if store == "postgres" {
                db = TestDb::create().await?;
                Backend::Postgres(db.url().to_string())
            } else {
                Backend::Memory
            };
            let g = Global::start(backend).await?;
            let t = Instant::now();
            let out = ok(g.weftctl(&["apply", "-f", &file, "--batch-size", &batch.to_string()]));
            apply.push(t.elapsed().as_secs_f64());
            assert!(out.contains(&format!("created: {n}")), "{out}");
            let t = Instant::now();
            let listed = ok(g.weftctl(&[
                "get",
                "meshtimeouts",
                "-o",
                "json",
                "--size",
                &page.to_string(),
            ]));
            list.push(t.elapsed().as_secs_f64());
            let v: serde_json::Value = serde_json::from_str(&listed)?;
            assert_eq!(v["items"].as_array().map(Vec::len), Some(n));
            eprintln!(
                "  {store} run {}: apply {:.2}s, list {:.2}s",
                run + 1,
                apply[run],
                list[run]
            );
        }
        rows.push(Row {
            store,
            op: "apply",
            seconds: apply,
            requests: n.div_ceil(batch),
        });
        rows.push(Row {
            store,
            op: "get (list)",
            seconds: list,
            requests: n.div_ceil(page),
        });
    }
    println!(
        "\n{:<9} {:<11} {:>9} {:>9} {:>10} {:>12} {:>10}",
        "store", "operation", "median s", "best s", "requests", "requests/s", "res/s"
    );
    let mut out = Vec::new();
    for r in &rows {
        let med = median(&r.seconds);
        let best = r.seconds.iter().copied().fold(f64::MAX, f64::min);
        println!(
            "{:<9} {:<11} {:>9.3} {:>9.3} {:>10} {:>12.1} {:>10.0}",
            r.store,
            r.op,
            med,
            best,
            r.requests,
            r.requests as f64 / med,
            n as f64 / med
        );
        out.push(json!({"store": r.store, "op": r.op, "seconds": r.seconds, "median": med, "requests": r.requests, "resources": n}));
    }
    let goal = rows
        .iter()
        .find(|r| r.store == "postgres" && r.op == "apply")
        .map(|r| median(&r.seconds))
        .unwrap_or(f64::NAN);
    println!(
        "\ngoal: {n}-policy apply on PostgreSQL under 10 s: {} ({goal:.2} s)",
        if goal < 10.0 { "met" } else { "NOT met" }
    );
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench-apply.json");
    std::fs::write(
        path,
        serde_json::to_string_pretty(&json!({"n": n, "batch": batch, "runs": runs, "rows": out}))?,
    )?;
    eprintln!("wrote {path}");
    Ok(())
}
