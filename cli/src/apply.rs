//! `weftctl apply`: gather files, parse and validate every document locally (nothing is sent
//! if any is invalid), then `POST /_apply` in batches and sum up what the server did.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use serde_json::Value;
use weft_core::document::{self, DocumentError};
use weft_core::{Key, Kind, Resource, Scope};

use crate::client::{ApiError, Client};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A file, a directory (its *.yaml, *.yml and *.json files), or `-` for stdin. Repeatable.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR|-",
        required = true
    )]
    pub files: Vec<PathBuf>,
    /// Also read the subdirectories of directories given with -f.
    #[arg(short = 'R', long)]
    pub recursive: bool,
    /// Validate on the server and report what would change, without writing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Documents per request; each request is one transaction.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch_size: u64,
}

/// Where documents come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Stdin,
    File(PathBuf),
}

impl Input {
    pub fn name(&self) -> String {
        match self {
            Input::Stdin => "<stdin>".to_string(),
            Input::File(p) => p.display().to_string(),
        }
    }

    fn read(&self) -> Result<String> {
        match self {
            Input::Stdin => {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("reading stdin")?;
                Ok(s)
            }
            Input::File(p) => {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            }
        }
    }
}

/// One valid document and where it came from.
#[derive(Clone, Debug)]
pub struct Doc {
    pub source: String,
    /// 1-based position in its source.
    pub index: usize,
    pub resource: Resource,
}

/// Expand `-f` arguments: `-` is stdin, a file is itself, a directory is its `*.yaml`, `*.yml`
/// and `*.json` files in name order (and its subdirectories' when `recursive`).
pub fn gather(paths: &[PathBuf], recursive: bool) -> Result<Vec<Input>> {
    let mut out = Vec::new();
    for p in paths {
        if p.as_os_str() == "-" {
            if out.contains(&Input::Stdin) {
                bail!("-f - given twice (stdin can be read once)");
            }
            out.push(Input::Stdin);
            continue;
        }
        let meta = std::fs::metadata(p).with_context(|| format!("-f {}", p.display()))?;
        if meta.is_dir() {
            walk(p, recursive, &mut out)?;
        } else {
            out.push(Input::File(p.clone()));
        }
    }
    Ok(out)
}

fn walk(dir: &Path, recursive: bool, out: &mut Vec<Input>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading directory {}", dir.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading directory {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let file_type = e
            .file_type()
            .with_context(|| format!("reading {}", path.display()))?;
        // Symlinked directories are not followed, so a link cycle cannot loop.
        if file_type.is_dir() {
            if recursive {
                walk(&path, recursive, out)?;
            }
            continue;
        }
        let is_manifest = path.extension().and_then(|x| x.to_str()).is_some_and(|x| {
            ["yaml", "yml", "json"]
                .iter()
                .any(|ok| x.eq_ignore_ascii_case(ok))
        });
        if is_manifest && path.is_file() {
            out.push(Input::File(path));
        }
    }
    Ok(())
}

/// Parse and validate every document of every input. Errors are one line per problem:
/// `file: document N (Kind "name" in mesh "m"): field.path: message`, all of them.
pub fn load(inputs: &[(String, String)]) -> Result<Vec<Doc>, Vec<String>> {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (source, text) in inputs {
        // Validate one document at a time so the valid ones are kept for the duplicate check.
        let values = {
            let t = text.trim_start();
            if t.starts_with('{') || t.starts_with('[') {
                document::json_values(text)
            } else {
                document::yaml_values(text)
            }
        };
        let values = match values {
            Ok(v) => v,
            Err(e) => {
                // A syntax error: the message carries the line and column.
                errors.extend(
                    e.0.iter()
                        .flat_map(|d| d.invalid.errors.iter().map(|f| format!("{source}: {f}"))),
                );
                continue;
            }
        };
        for (i, value) in values.into_iter().enumerate() {
            match document::from_values(vec![value]) {
                Ok(mut rs) => {
                    let mut resource = rs.remove(0);
                    // Store-managed fields (from `get -o yaml` output) mean nothing on input.
                    resource.meta = Default::default();
                    docs.push(Doc {
                        source: source.clone(),
                        index: i + 1,
                        resource,
                    });
                }
                Err(e) => {
                    for mut d in e.0 {
                        d.index = i + 1;
                        errors.extend(problem_lines(source, &d));
                    }
                }
            }
        }
    }
    let mut seen: HashMap<Key, (String, usize)> = HashMap::new();
    for d in &docs {
        let key = d.resource.key();
        match seen.get(&key) {
            Some((src, idx)) => errors.push(format!(
                "{}: document {} ({key}): defined again (first in {src} document {idx}); keep one",
                d.source, d.index
            )),
            None => {
                seen.insert(key, (d.source.clone(), d.index));
            }
        }
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(errors)
    }
}

fn problem_lines(source: &str, d: &DocumentError) -> Vec<String> {
    let head = match &d.what {
        Some(w) => format!("{source}: document {} ({w})", d.index),
        None => format!("{source}: document {}", d.index),
    };
    d.invalid
        .errors
        .iter()
        .map(|f| format!("{head}: {f}"))
        .collect()
}

/// Meshes first, then the other global-scoped kinds, then the rest (stable), so a mesh is
/// always sent in the same or an earlier batch than the resources in it.
pub fn order(docs: &mut [Doc]) {
    docs.sort_by_key(|d| match (d.resource.kind, d.resource.kind.scope()) {
        (Kind::Mesh, _) => 0,
        (_, Scope::Global) => 1,
        (_, Scope::Mesh) => 2,
    });
}

/// What `/_apply` did, summed over batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Summary {
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub updated: u64,
    #[serde(default)]
    pub unchanged: u64,
}

impl Summary {
    fn add(&mut self, o: Summary) {
        self.created += o.created;
        self.updated += o.updated;
        self.unchanged += o.unchanged;
    }

    pub fn line(&self, dry_run: bool) -> String {
        let mut s = format!(
            "created: {}, updated: {}, unchanged: {}",
            self.created, self.updated, self.unchanged
        );
        if dry_run {
            s.push_str(" (dry run)");
        }
        s
    }
}

#[derive(Deserialize)]
struct ApplyResponse {
    #[serde(default)]
    summary: Summary,
}

pub async fn run(client: &Client, args: &Args) -> Result<String> {
    let inputs = gather(&args.files, args.recursive)?;
    let texts = inputs
        .iter()
        .map(|i| Ok((i.name(), i.read()?)))
        .collect::<Result<Vec<_>>>()?;
    let mut docs = match load(&texts) {
        Ok(d) => d,
        Err(lines) => bail!(
            "invalid documents, nothing was sent:\n  {}",
            lines.join("\n  ")
        ),
    };
    if docs.is_empty() {
        let names: Vec<String> = inputs.iter().map(Input::name).collect();
        bail!("no documents found in {}", names.join(", "));
    }
    order(&mut docs);

    let batch_size = usize::try_from(args.batch_size).unwrap_or(usize::MAX);
    let batches: Vec<&[Doc]> = docs.chunks(batch_size).collect();
    let progress = if batches.len() > 1 {
        // Draws on stderr, and hides itself when stderr is not a terminal.
        let pb = ProgressBar::new(docs.len() as u64);
        pb.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} documents ({elapsed})")
                .expect("valid template"),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    let query: &[(&str, &str)] = if args.dry_run {
        &[("dryRun", "true")]
    } else {
        &[]
    };
    let mut total = Summary::default();
    for (n, batch) in batches.iter().enumerate() {
        let body = Value::Array(
            batch
                .iter()
                .map(|d| document::to_value(&d.resource))
                .collect(),
        );
        let resp = match client.post(&["_apply"], query, &body).await {
            Ok(r) => r,
            Err(e) => {
                progress.finish_and_clear();
                return Err(batch_error(e, batch, n, batch_size, total, args.dry_run));
            }
        };
        let resp: ApplyResponse = serde_json::from_value(resp)
            .map_err(|e| anyhow!("unexpected answer from /_apply: {e}"))?;
        total.add(resp.summary);
        progress.inc(batch.len() as u64);
    }
    progress.finish_and_clear();
    Ok(format!("{}\n", total.line(args.dry_run)))
}

/// The server's message, then where its problems are in the user's files, then what was
/// already written by earlier batches.
fn batch_error(
    e: anyhow::Error,
    batch: &[Doc],
    n: usize,
    batch_size: usize,
    done: Summary,
    dry_run: bool,
) -> anyhow::Error {
    let api = e.downcast_ref::<ApiError>();
    let mut msg = match api {
        Some(api) => api.to_string(),
        None => format!("{e:#}"),
    };
    for p in api.map_or(&[][..], |a| &a.errors[..]) {
        let Some(d) = p.document.and_then(|i| batch.get(i.checked_sub(1)?)) else {
            continue;
        };
        let field = if p.field.is_empty() {
            String::new()
        } else {
            format!("{}: ", p.field)
        };
        msg.push_str(&format!(
            "\n  {}: document {} ({}): {field}{}",
            d.source,
            d.index,
            d.resource.key(),
            p.message
        ));
    }
    if n > 0 && !dry_run {
        // The server answered: this batch's transaction was rolled back. A transport error
        // leaves it unknown; applying again is safe either way.
        let this_batch = if api.is_some() {
            "nothing of this batch was written"
        } else {
            "this batch may or may not have been written; apply again to finish"
        };
        msg.push_str(&format!(
            "\nnote: the first {} documents were applied before this error ({}); {this_batch}",
            n * batch_size,
            done.line(false)
        ));
    }
    anyhow!(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: &str = "type: MeshTimeout\nname: t1\nmesh: default\nspec:\n  targetRef: {kind: Mesh}\n  to:\n  - targetRef: {kind: Mesh}\n    default: {idleTimeout: 1h}\n";

    #[test]
    fn gather_reads_manifests_of_a_dir_sorted_and_recurses_only_with_r() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["b.yml", "a.yaml", "c.json", "notes.txt", "sub/z.yaml"] {
            std::fs::create_dir_all(d.join(f).parent().unwrap()).unwrap();
            std::fs::write(d.join(f), "").unwrap();
        }
        let names = |inputs: Vec<Input>| -> Vec<String> {
            inputs
                .iter()
                .map(|i| match i {
                    Input::File(p) => p.strip_prefix(d).unwrap().display().to_string(),
                    Input::Stdin => "-".into(),
                })
                .collect()
        };
        assert_eq!(
            names(gather(&[d.to_path_buf()], false).unwrap()),
            ["a.yaml", "b.yml", "c.json"]
        );
        assert_eq!(
            names(gather(&[d.to_path_buf()], true).unwrap()),
            ["a.yaml", "b.yml", "c.json", "sub/z.yaml"]
        );
        // A file is taken whatever its name; `-` is stdin.
        assert_eq!(
            names(gather(&[d.join("notes.txt"), "-".into()], false).unwrap()),
            ["notes.txt", "-"]
        );
        let err = gather(&[d.join("missing.yaml")], false).unwrap_err();
        assert!(format!("{err:#}").contains("missing.yaml"), "{err:#}");
    }

    #[test]
    fn load_reports_every_error_with_file_document_and_field() {
        let bad_duration = TIMEOUT
            .replace("name: t1", "name: t2")
            .replace("1h", "5 seconds");
        let two_docs = format!("{TIMEOUT}---\n{bad_duration}");
        let inputs = vec![
            ("a.yaml".to_string(), two_docs),
            (
                "b.json".to_string(),
                r#"[{"type": "MeshNope", "name": "x"}]"#.to_string(),
            ),
            (
                "c.yaml".to_string(),
                "type: Mesh\nname: [oops\n".to_string(),
            ),
        ];
        let errs = load(&inputs).unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:#?}");
        assert!(
            errs[0].starts_with(r#"a.yaml: document 2 (MeshTimeout "t2" in mesh "default"): spec.to[0].default.idleTimeout: "#),
            "{}",
            errs[0]
        );
        assert!(errs[0].contains("5 seconds"), "{}", errs[0]);
        assert!(
            errs[1].starts_with("b.json: document 1 (MeshNope \"x\"): type: unknown kind"),
            "{}",
            errs[1]
        );
        assert!(errs[2].starts_with("c.yaml: malformed YAML"), "{}", errs[2]);
    }

    #[test]
    fn load_refuses_duplicates_and_drops_store_fields() {
        let with_version = TIMEOUT.replace(
            "mesh: default\n",
            "mesh: default\nversion: 7\ncreationTime: 2026-01-01T00:00:00Z\n",
        );
        let docs = load(&[("a.yaml".into(), with_version)]).unwrap();
        assert_eq!(docs[0].resource.meta, Default::default());
        assert_eq!((docs[0].source.as_str(), docs[0].index), ("a.yaml", 1));

        let errs = load(&[
            ("a.yaml".into(), TIMEOUT.into()),
            ("b.yaml".into(), TIMEOUT.into()),
        ])
        .unwrap_err();
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].contains("b.yaml: document 1")
                && errs[0].contains("first in a.yaml document 1"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn meshes_go_first() {
        let text = format!(
            "{TIMEOUT}---\ntype: Zone\nname: east\nspec: {{}}\n---\ntype: Mesh\nname: default\n"
        );
        let mut docs = load(&[("a.yaml".into(), text)]).unwrap();
        order(&mut docs);
        let kinds: Vec<Kind> = docs.iter().map(|d| d.resource.kind).collect();
        assert_eq!(kinds, [Kind::Mesh, Kind::Zone, Kind::MeshTimeout]);
    }

    #[test]
    fn summary_line() {
        let s = Summary {
            created: 2,
            updated: 1,
            unchanged: 0,
        };
        assert_eq!(s.line(false), "created: 2, updated: 1, unchanged: 0");
        assert_eq!(
            s.line(true),
            "created: 2, updated: 1, unchanged: 0 (dry run)"
        );
    }
}
