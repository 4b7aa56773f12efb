//! `weft-zone run` configuration: flags over the file over the defaults, and one clear error
//! for each mistake.

use std::path::PathBuf;

use clap::Parser as _;
use weft_zone::config::{Cli, Command, Config, Fingerprint, LogFormat, RunArgs, Trust};

const FP: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn args(argv: &[&str]) -> RunArgs {
    let argv = ["weft-zone", "run"].iter().chain(argv);
    match Cli::try_parse_from(argv).unwrap().command {
        Command::Run(a) => a,
    }
}

fn error(a: RunArgs) -> String {
    let e = Config::resolve(a).unwrap_err();
    let line = format!("{e:#}");
    assert!(!line.contains('\n'), "one line: {line}");
    line
}

#[test]
fn defaults_are_a_standalone_zone() {
    let cfg = Config::resolve(args(&["--zone", "east"])).unwrap();
    assert_eq!(cfg.zone, "east");
    assert_eq!(cfg.global, None);
    assert_eq!(cfg.api_address.to_string(), "127.0.0.1:5682");
    assert_eq!(cfg.data_dir, PathBuf::from("weft-zone-data"));
    assert_eq!(cfg.log_format, LogFormat::Text);
}

#[test]
fn flags_override_file_override_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zone.yaml");
    std::fs::write(
        &path,
        format!(
            "zone: west\nglobalAddress: https://global.example.com:5685\nzoneTokenFile: /etc/weft/zone-token\nglobalFingerprint: {FP}\napiAddress: 0.0.0.0:7000\ndataDir: /var/lib/weft-zone\nlogFormat: json\n"
        ),
    )
    .unwrap();
    let file = path.to_str().unwrap();
    let cfg = Config::resolve(args(&["--config", file])).unwrap();
    assert_eq!(cfg.zone, "west");
    assert_eq!(cfg.api_address.to_string(), "0.0.0.0:7000");
    assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/weft-zone"));
    assert_eq!(cfg.log_format, LogFormat::Json);
    let global = cfg.global.unwrap();
    assert_eq!(global.address.host(), Some("global.example.com"));
    assert_eq!(global.address.port_u16(), Some(5685));
    assert_eq!(global.token_file, PathBuf::from("/etc/weft/zone-token"));
    assert_eq!(global.trust, Trust::Fingerprint(FP.parse().unwrap()));
    // Flags win, including over the file's choice of how to trust global.
    let cfg = Config::resolve(args(&[
        "--config",
        file,
        "--zone",
        "east",
        "--api-address",
        "127.0.0.1:7001",
        "--global-ca-file",
        "/etc/weft/global-ca.pem",
    ]))
    .unwrap();
    assert_eq!(cfg.zone, "east");
    assert_eq!(cfg.api_address.port(), 7001);
    assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/weft-zone"));
    assert_eq!(
        cfg.global.unwrap().trust,
        Trust::CaFile("/etc/weft/global-ca.pem".into())
    );
}

#[test]
fn a_bare_host_and_port_means_https() {
    let cfg = Config::resolve(args(&[
        "--zone",
        "east",
        "--global-address",
        "10.0.0.5:5685",
        "--zone-token-file",
        "/etc/weft/zone-token",
        "--global-ca-file",
        "/etc/weft/global-ca.pem",
    ]))
    .unwrap();
    let global = cfg.global.unwrap();
    assert_eq!(global.address.scheme_str(), Some("https"));
    assert_eq!(global.address.host(), Some("10.0.0.5"));
    assert_eq!(global.address.port_u16(), Some(5685));
    assert_eq!(
        global.trust,
        Trust::CaFile("/etc/weft/global-ca.pem".into())
    );
}

#[test]
fn fingerprints_in_openssl_form_are_accepted() {
    let colons = "SHA256:9F:86:D0:81:88:4C:7D:65:9A:2F:EA:A0:C5:5A:D0:15:A3:BF:4F:1B:2B:0B:82:2C:D1:5D:6C:15:B0:F0:0A:08";
    let a: Fingerprint = colons.parse().unwrap();
    let b: Fingerprint = FP.parse().unwrap();
    assert_eq!(a, b);
    assert_eq!(b.to_string(), FP);
}

#[test]
fn bad_zone_name_is_one_clear_error() {
    let e = error(args(&["--zone", "East_1"]));
    assert!(e.starts_with("--zone: invalid name \"East_1\""), "{e}");
    assert!(e.contains("DNS label"), "{e}");
    let e = error(RunArgs::default());
    assert!(e.contains("--zone is required"), "{e}");
}

#[test]
fn settings_that_go_together_are_checked() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--global-address", "https://g:5685"],
            "--global-address needs --zone-token-file",
        ),
        (
            &[
                "--global-address",
                "https://g:5685",
                "--zone-token-file",
                "/t",
            ],
            "--global-address needs --global-ca-file or --global-fingerprint",
        ),
        (
            &["--zone-token-file", "/t"],
            "--zone-token-file is only used with --global-address",
        ),
        (
            &["--global-fingerprint", FP],
            "--global-fingerprint is only used with --global-address",
        ),
        (
            &[
                "--global-address",
                "http://g:5685",
                "--zone-token-file",
                "/t",
            ],
            "expected an https:// URL",
        ),
        (
            &["--global-address", "not a url", "--zone-token-file", "/t"],
            "--global-address \"not a url\": expected an https:// URL",
        ),
        (
            &[
                "--global-address",
                "https://g:5685",
                "--zone-token-file",
                "/t",
                "--global-fingerprint",
                "sha256:abcd",
            ],
            "expected sha256:<64 hex digits>",
        ),
    ];
    for (extra, want) in cases {
        let mut argv = vec!["--zone", "east"];
        argv.extend_from_slice(extra);
        let e = error(args(&argv));
        assert!(e.contains(want), "{extra:?}: {e}");
    }
    // Both ways of trusting global at once: refused by the parser for flags, by resolve for
    // the file.
    assert!(
        Cli::try_parse_from([
            "weft-zone",
            "run",
            "--zone",
            "east",
            "--global-ca-file",
            "/ca",
            "--global-fingerprint",
            FP
        ])
        .is_err()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zone.yaml");
    std::fs::write(
        &path,
        format!(
            "zone: east\nglobalAddress: https://g:5685\nzoneTokenFile: /t\nglobalCaFile: /ca\nglobalFingerprint: {FP}\n"
        ),
    )
    .unwrap();
    let e = error(args(&["--config", path.to_str().unwrap()]));
    assert!(e.contains("give one"), "{e}");
}

#[test]
fn unknown_file_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zone.yaml");
    std::fs::write(&path, "zone: east\nglobalAdress: https://g:5685\n").unwrap();
    let e = Config::resolve(args(&["--config", path.to_str().unwrap()])).unwrap_err();
    assert!(format!("{e:#}").contains("globalAdress"), "{e:#}");
}
