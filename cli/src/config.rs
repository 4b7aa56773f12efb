//! The weftctl config file: named control planes ("contexts") and which one is current, plus
//! resolving the control plane a command talks to from flags, environment and that file.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::output::Table;

/// The config file: `{currentContext, contexts: [{name, address, token}]}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: Vec<Context>,
}

/// One control plane weftctl knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Context {
    pub name: String,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// The control plane a command talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub address: String,
    pub token: Option<String>,
}

/// `<config dir>/weft/weftctl.yaml`, e.g. `~/.config/weft/weftctl.yaml` on Linux.
pub fn default_path() -> Result<PathBuf> {
    dirs::config_dir()
        .map(|d| d.join("weft").join("weftctl.yaml"))
        .ok_or_else(|| {
            anyhow!(
                "cannot find the user config directory: pass --config PATH or set WEFTCTL_CONFIG"
            )
        })
}

/// Check and normalize a control plane address: an `http` or `https` URL, without a trailing `/`.
pub fn normalize_address(address: &str) -> Result<String> {
    let url = reqwest::Url::parse(address).map_err(|e| {
        anyhow!("invalid address {address:?}: {e} (expected e.g. http://127.0.0.1:5681)")
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        bail!(
            "invalid address {address:?} (expected an http:// or https:// URL, e.g. http://127.0.0.1:5681)"
        );
    }
    Ok(address.trim_end_matches('/').to_string())
}

impl Config {
    /// Read the file; a missing or empty file is an empty config.
    pub fn load(path: &Path) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(e).with_context(|| format!("config file {}", path.display())),
        };
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_saphyr::from_str(&text).map_err(|e| anyhow!("config file {}: {e}", path.display()))
    }

    /// Write the file with mode 0600 (it holds tokens), creating its directory (mode 0700).
    /// The write goes to a temporary file first, so a crash never leaves half a config.
    pub fn save(&self, path: &Path) -> Result<()> {
        let ctx = || format!("config file {}", path.display());
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).with_context(ctx)?;

        let text = serde_saphyr::to_string(self).map_err(|e| anyhow!("{}: {e}", ctx()))?;
        let file_name = path
            .file_name()
            .ok_or_else(|| anyhow!("{}: not a file path", ctx()))?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let write = || -> std::io::Result<()> {
            let mut f = opts.open(&tmp)?;
            // `mode` only applies to new files: make sure a stale temp file is private too.
            #[cfg(unix)]
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write()
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
            .with_context(ctx)
    }

    pub fn get(&self, name: &str) -> Option<&Context> {
        self.contexts.iter().find(|c| c.name == name)
    }

    pub fn current(&self) -> Option<&Context> {
        self.current_context.as_deref().and_then(|n| self.get(n))
    }

    /// Add a control plane and make it current. A duplicate name is refused unless `overwrite`.
    pub fn add(&mut self, context: Context, overwrite: bool) -> Result<()> {
        if context.name.is_empty() || context.name.contains(char::is_whitespace) {
            bail!(
                "invalid control plane name {:?} (expected a non-empty name without spaces, e.g. prod)",
                context.name
            );
        }
        let name = context.name.clone();
        match self.contexts.iter_mut().find(|c| c.name == name) {
            Some(_) if !overwrite => {
                bail!("control plane {name:?} already exists (pass --overwrite to replace it)")
            }
            Some(existing) => *existing = context,
            None => self.contexts.push(context),
        }
        self.current_context = Some(name);
        Ok(())
    }

    /// Make `name` the current control plane.
    pub fn switch(&mut self, name: &str) -> Result<()> {
        self.check_known(name)?;
        self.current_context = Some(name.to_string());
        Ok(())
    }

    /// Forget `name`; when it was current, no control plane is current any more.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        self.check_known(name)?;
        self.contexts.retain(|c| c.name != name);
        if self.current_context.as_deref() == Some(name) {
            self.current_context = None;
        }
        Ok(())
    }

    fn check_known(&self, name: &str) -> Result<()> {
        if self.get(name).is_some() {
            return Ok(());
        }
        if self.contexts.is_empty() {
            bail!(
                "no control plane named {name:?} (none configured; add one with `weftctl config control-planes add --name NAME --address URL`)"
            );
        }
        let known: Vec<&str> = self.contexts.iter().map(|c| c.name.as_str()).collect();
        bail!(
            "no control plane named {name:?} (known: {})",
            known.join(", ")
        )
    }

    /// The `control-planes list` table: NAME ADDRESS CURRENT.
    pub fn table(&self) -> String {
        let mut t = Table::new(["NAME", "ADDRESS", "CURRENT"]);
        for c in &self.contexts {
            let current = if self.current_context.as_deref() == Some(c.name.as_str()) {
                "*"
            } else {
                ""
            };
            t.row([c.name.as_str(), c.address.as_str(), current]);
        }
        t.render()
    }

    /// Which control plane to talk to: `address` (from `--address`/`WEFTCTL_ADDRESS`) bypasses
    /// the file; otherwise `context` (from `--context`) or the current one. `token` (from
    /// `--token`/`WEFTCTL_TOKEN`) replaces the stored token.
    pub fn target(
        &self,
        context: Option<&str>,
        address: Option<&str>,
        token: Option<&str>,
    ) -> Result<Target> {
        if let Some(address) = address {
            return Ok(Target {
                address: normalize_address(address)?,
                token: token.map(str::to_string),
            });
        }
        let ctx = match context {
            Some(name) => {
                self.check_known(name)?;
                self.get(name).expect("checked")
            }
            None => self.current().ok_or_else(|| {
                anyhow!(
                    "no control plane selected: add one with `weftctl config control-planes add --name NAME --address URL`, \
                     select one with `weftctl config control-planes use NAME`, or pass --address URL"
                )
            })?,
        };
        Ok(Target {
            address: ctx.address.clone(),
            token: token.map(str::to_string).or_else(|| ctx.token.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_context(name: &str, address: &str) -> Context {
        Context {
            name: name.into(),
            address: address.into(),
            token: Some(format!("{name}-token")),
        }
    }

    #[test]
    fn add_use_remove_list_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("weft").join("weftctl.yaml");

        let mut cfg = Config::load(&path).unwrap();
        assert_eq!(cfg, Config::default(), "a missing file is an empty config");
        cfg.add(mk_context("prod", "https://prod:5681"), false)
            .unwrap();
        cfg.add(mk_context("dev", "http://127.0.0.1:5681"), false)
            .unwrap();
        assert_eq!(
            cfg.current_context.as_deref(),
            Some("dev"),
            "add makes the new one current"
        );
        cfg.save(&path).unwrap();

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "the config holds tokens");
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("currentContext: dev"), "{text}");
        assert!(text.contains("token: prod-token"), "{text}");

        let mut cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.contexts.len(), 2);
        assert_eq!(
            cfg.table(),
            "NAME   ADDRESS                 CURRENT\n\
             prod   https://prod:5681\n\
             dev    http://127.0.0.1:5681   *\n"
        );

        cfg.switch("prod").unwrap();
        cfg.save(&path).unwrap();
        let mut cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.current().unwrap().address, "https://prod:5681");

        cfg.remove("prod").unwrap();
        assert_eq!(
            cfg.current_context, None,
            "removing the current one leaves none current"
        );
        cfg.save(&path).unwrap();
        let cfg = Config::load(&path).unwrap();
        assert_eq!(
            cfg.contexts,
            vec![mk_context("dev", "http://127.0.0.1:5681")]
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "rewrites keep mode 0600");
        }
    }

    #[test]
    fn duplicate_names_need_overwrite() {
        let mut cfg = Config::default();
        cfg.add(mk_context("prod", "http://a:5681"), false).unwrap();
        let err = cfg
            .add(mk_context("prod", "http://b:5681"), false)
            .unwrap_err();
        assert!(err.to_string().contains("--overwrite"), "{err}");
        assert_eq!(cfg.get("prod").unwrap().address, "http://a:5681");
        cfg.add(mk_context("prod", "http://b:5681"), true).unwrap();
        assert_eq!(cfg.contexts.len(), 1);
        assert_eq!(cfg.get("prod").unwrap().address, "http://b:5681");
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let mut cfg = Config::default();
        let err = cfg.switch("x").unwrap_err().to_string();
        assert!(err.contains("none configured"), "{err}");
        cfg.add(mk_context("prod", "http://a:5681"), false).unwrap();
        cfg.add(mk_context("dev", "http://b:5681"), false).unwrap();
        let err = cfg.remove("x").unwrap_err().to_string();
        assert!(err.contains("known: prod, dev"), "{err}");
    }

    #[test]
    fn target_prefers_flags_then_context_then_current() {
        let mut cfg = Config::default();
        cfg.add(mk_context("prod", "http://prod:5681"), false)
            .unwrap();
        cfg.add(mk_context("dev", "http://dev:5681"), false)
            .unwrap();

        let t = cfg.target(None, None, None).unwrap();
        assert_eq!(
            t,
            Target {
                address: "http://dev:5681".into(),
                token: Some("dev-token".into())
            }
        );
        let t = cfg.target(Some("prod"), None, None).unwrap();
        assert_eq!(
            t,
            Target {
                address: "http://prod:5681".into(),
                token: Some("prod-token".into())
            }
        );
        let t = cfg.target(Some("prod"), None, Some("flag")).unwrap();
        assert_eq!(t.token.as_deref(), Some("flag"));
        let t = cfg
            .target(Some("prod"), Some("http://other:1/"), None)
            .unwrap();
        assert_eq!(
            t,
            Target {
                address: "http://other:1".into(),
                token: None
            },
            "--address bypasses the file"
        );
        assert!(cfg.target(Some("nope"), None, None).is_err());
        let err = Config::default()
            .target(None, None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("weftctl config control-planes add"), "{err}");
    }

    #[test]
    fn addresses_are_checked() {
        assert_eq!(
            normalize_address("http://127.0.0.1:5681/").unwrap(),
            "http://127.0.0.1:5681"
        );
        assert!(normalize_address("127.0.0.1:5681").is_err());
        assert!(normalize_address("ftp://x").is_err());
    }

    #[test]
    fn empty_file_is_an_empty_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "\n").unwrap();
        assert_eq!(Config::load(&path).unwrap(), Config::default());
        std::fs::write(&path, "contexts: 3\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("c.yaml"), "{err}");
    }
}
