//! `weftctl generate zone-token|dataplane-token` and `weftctl revoke zone-token|dataplane-token`:
//! tokens through `POST /_tokens/zone`, `POST /_tokens/dataplane` and `POST /_tokens/revoke`
//! (docs/tokens.md).

use anyhow::{Context as _, Result, bail};
use clap::builder::{PossibleValuesParser, TypedValueParser as _};
use serde_json::{Value, json};
use weft_core::token::{self, Scope};

use crate::client::Client;

#[derive(Debug, clap::Subcommand)]
pub enum Generate {
    /// Issue a token a zone control plane (or its ingress or egress) uses to connect to
    /// global. Prints only the token, so `> token` saves it.
    #[command(name = "zone-token")]
    ZoneToken(GenerateArgs),
    /// Issue a token one proxy (a dataplane of a mesh, serving a service) presents to its
    /// zone. Prints only the token.
    #[command(name = "dataplane-token")]
    DataplaneToken(DataplaneArgs),
}

#[derive(Debug, clap::Subcommand)]
pub enum Revoke {
    /// Revoke a zone token: global refuses it from then on.
    #[command(name = "zone-token")]
    ZoneToken(RevokeArgs),
    /// Revoke a dataplane token: zones refuse it once they hear from global (within ~10s).
    #[command(name = "dataplane-token")]
    DataplaneToken(RevokeArgs),
}

#[derive(Debug, clap::Args)]
pub struct DataplaneArgs {
    /// The mesh the dataplane belongs to.
    #[arg(long, value_name = "MESH")]
    pub mesh: String,
    /// The dataplane's name.
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// The service the proxy serves.
    #[arg(long, value_name = "SERVICE")]
    pub service: String,
    /// How long the token is valid, e.g. 24h, 30m.
    #[arg(long, default_value = "720h", value_name = "DURATION", value_parser = parse_valid_for)]
    pub valid_for: weft_core::validate::Duration,
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// The zone's name (a DNS label, e.g. east).
    #[arg(long, value_name = "NAME")]
    pub zone: String,
    /// What the token is for.
    #[arg(
        long,
        default_value = "zone",
        value_parser = PossibleValuesParser::new(["zone", "ingress", "egress"])
            .map(|s| s.parse::<Scope>().expect("one of the possible values")),
    )]
    pub scope: Scope,
    /// How long the token is valid, e.g. 720h, 24h, 30m.
    #[arg(long, default_value = "720h", value_name = "DURATION", value_parser = parse_valid_for)]
    pub valid_for: weft_core::validate::Duration,
}

#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// The token's id (printed when it was generated), or the token itself.
    #[arg(value_name = "ID")]
    pub id: String,
}

fn parse_valid_for(s: &str) -> Result<weft_core::validate::Duration, String> {
    let d: weft_core::validate::Duration = s
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (expected e.g. 720h, 24h, 30m)"))?;
    if d.as_std().as_secs() == 0 {
        return Err(format!("{s:?} is too short (at least 1s, e.g. 720h)"));
    }
    Ok(d)
}

pub async fn generate(client: &Client, command: &Generate) -> Result<String> {
    let args = match command {
        Generate::ZoneToken(args) => args,
        Generate::DataplaneToken(args) => return generate_dataplane(client, args).await,
    };
    if let Err(m) = weft_core::validate::check_dns_label(&args.zone) {
        bail!("--zone: {m}");
    }
    let resp = client
        .post(
            &["_tokens", "zone"],
            &[],
            &json!({"zone": args.zone, "scope": args.scope, "validFor": args.valid_for.to_string()}),
        )
        .await?;
    let field = |name: &str| {
        resp.get(name)
            .and_then(Value::as_str)
            .with_context(|| format!("unexpected answer from /_tokens/zone: no {name}"))
    };
    let (tok, id, expires) = (field("token")?, field("id")?, field("expiresAt")?);
    // stdout is only the token; the rest goes to the terminal.
    eprintln!(
        "zone token {id} for zone {:?} (scope {}), expires at {expires}; revoke it with `weftctl revoke zone-token {id}`",
        args.zone, args.scope
    );
    Ok(format!("{tok}\n"))
}

async fn generate_dataplane(client: &Client, args: &DataplaneArgs) -> Result<String> {
    for (flag, value) in [("--mesh", &args.mesh), ("--name", &args.name)] {
        if let Err(m) = weft_core::validate::check_dns_label(value) {
            bail!("{flag}: {m}");
        }
    }
    if let Err(m) = token::check_service(&args.service) {
        bail!("--service: {m}");
    }
    let resp = client
        .post(
            &["_tokens", "dataplane"],
            &[],
            &json!({"mesh": args.mesh, "name": args.name, "service": args.service, "validFor": args.valid_for.to_string()}),
        )
        .await?;
    let field = |name: &str| {
        resp.get(name)
            .and_then(Value::as_str)
            .with_context(|| format!("unexpected answer from /_tokens/dataplane: no {name}"))
    };
    let (tok, id, expires) = (field("token")?, field("id")?, field("expiresAt")?);
    eprintln!(
        "dataplane token {id} for dataplane {:?} of mesh {:?} (service {:?}), expires at {expires}; revoke it with `weftctl revoke dataplane-token {id}`",
        args.name, args.mesh, args.service
    );
    Ok(format!("{tok}\n"))
}

pub async fn revoke(client: &Client, command: &Revoke) -> Result<String> {
    let (kind, args) = match command {
        Revoke::ZoneToken(args) => ("zone", args),
        Revoke::DataplaneToken(args) => ("dataplane", args),
    };
    let id = token_id(&args.id)?;
    client
        .post(&["_tokens", "revoke"], &[], &json!({ "id": id }))
        .await?;
    Ok(format!("revoked {kind} token {id}\n"))
}

/// The id of `arg`: an id as it is, or the id inside a token.
fn token_id(arg: &str) -> Result<String> {
    let arg = arg.trim();
    if arg.contains('.') {
        return token::inspect_id(arg).context("ID looks like a token but does not read as one");
    }
    if !token::is_id(arg) {
        bail!(
            "invalid token id {arg:?} (expected the 32 hex digits printed by `weftctl generate zone-token` or `dataplane-token`, or the token itself)"
        );
    }
    Ok(arg.to_string())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use clap::Parser as _;

    use super::*;
    use crate::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("weftctl").chain(args.iter().copied()))
    }

    #[test]
    fn generate_defaults_and_flags() {
        let cli = parse(&["generate", "zone-token", "--zone", "east"]).unwrap();
        let Command::Generate {
            command: Generate::ZoneToken(a),
        } = cli.command
        else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(
            (a.zone.as_str(), a.scope, a.valid_for.to_string()),
            ("east", Scope::Zone, "720h".to_string())
        );
        let cli = parse(&[
            "generate",
            "zone-token",
            "--zone",
            "east",
            "--scope",
            "egress",
            "--valid-for",
            "90m",
        ])
        .unwrap();
        let Command::Generate {
            command: Generate::ZoneToken(a),
        } = cli.command
        else {
            panic!()
        };
        assert_eq!(
            (a.scope, a.valid_for.to_string()),
            (Scope::Egress, "1h30m".into())
        );
        assert!(
            parse(&["generate", "zone-token"]).is_err(),
            "--zone is required"
        );
        let e = parse(&["generate", "zone-token", "--zone", "e", "--scope", "mesh"]).unwrap_err();
        assert!(e.to_string().contains("ingress"), "{e}");
        for bad in ["30 days", "0s", "1d"] {
            let e = parse(&["generate", "zone-token", "--zone", "e", "--valid-for", bad])
                .unwrap_err()
                .to_string();
            assert!(e.contains("720h"), "{bad}: {e}");
        }
    }

    #[test]
    fn revoke_takes_an_id_or_a_token() {
        let cli = parse(&["revoke", "zone-token", "0123456789abcdef0123456789abcdef"]).unwrap();
        let Command::Revoke {
            command: Revoke::ZoneToken(a),
        } = cli.command
        else {
            panic!()
        };
        assert_eq!(token_id(&a.id).unwrap(), "0123456789abcdef0123456789abcdef");
        let key = token::SigningKey::generate();
        let (t, claims) = key
            .issue(
                "east",
                Scope::Zone,
                Duration::from_secs(60),
                SystemTime::now(),
            )
            .unwrap();
        assert_eq!(token_id(&format!("{t}\n")).unwrap(), claims.jti);
        assert!(
            token_id("nope")
                .unwrap_err()
                .to_string()
                .contains("32 hex digits")
        );
        assert!(token_id("a.b.c").is_err());
        let (t, claims) = key
            .issue_dataplane(
                "default",
                "web-1",
                "web",
                Duration::from_secs(60),
                SystemTime::now(),
            )
            .unwrap();
        assert_eq!(token_id(&t).unwrap(), claims.jti);
    }

    #[test]
    fn generate_dataplane_token_flags() {
        let cli = parse(&[
            "generate",
            "dataplane-token",
            "--mesh",
            "default",
            "--name",
            "web-1",
            "--service",
            "web",
            "--valid-for",
            "24h",
        ])
        .unwrap();
        let Command::Generate {
            command: Generate::DataplaneToken(a),
        } = cli.command
        else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(
            (
                a.mesh.as_str(),
                a.name.as_str(),
                a.service.as_str(),
                a.valid_for.to_string()
            ),
            ("default", "web-1", "web", "24h".to_string())
        );
        assert!(parse(&["generate", "dataplane-token", "--mesh", "m", "--name", "n"]).is_err());
        assert!(
            parse(&[
                "revoke",
                "dataplane-token",
                "0123456789abcdef0123456789abcdef"
            ])
            .is_ok()
        );
    }
}
