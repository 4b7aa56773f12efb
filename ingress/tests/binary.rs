//! The binary: `version`, and the one clear line when the flags are wrong.

use std::process::Command;

fn ingress(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weft-ingress"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version() {
    let (ok, stdout, _) = ingress(&["version"]);
    assert!(ok);
    assert_eq!(
        stdout.trim(),
        format!("weft-ingress {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn wrong_flags_exit_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate").unwrap();
    let token = token.to_str().unwrap();
    let ca = ca.to_str().unwrap();
    let base = [
        "run",
        "--zone-address",
        "https://127.0.0.1:5683",
        "--token-file",
        token,
        "--name",
        "ingress-1",
        "--address",
        "127.0.0.1:0",
        "--zone-ca-file",
    ];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        ingress(&args)
    };
    let good_ca = dir.path().join("good-ca.pem");
    std::fs::write(
        &good_ca,
        rcgen::generate_simple_self_signed(vec!["ca".into()])
            .unwrap()
            .cert
            .pem(),
    )
    .unwrap();
    let good_ca = good_ca.to_str().unwrap();
    let (ok, _, stderr) = run(&[
        good_ca,
        "--mode",
        "egress",
        "--external-ca-file",
        "/nonexistent/roots.pem",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("--external-ca-file /nonexistent/roots.pem"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(&[good_ca, "--external-ca-file", good_ca]);
    assert!(!ok);
    assert!(
        stderr.contains("--external-ca-file: only for --mode egress"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(&[ca]);
    assert!(!ok);
    assert!(stderr.contains("--zone-ca-file"), "{stderr}");
    let (ok, _, stderr) = run(&["/nonexistent/ca.pem"]);
    assert!(!ok);
    assert!(
        stderr.contains("--zone-ca-file /nonexistent/ca.pem"),
        "{stderr}"
    );
}
