//! TLS on loopback with the real binaries: a coordinator serving https and requiring client
//! certificates accepts clients and workers that present one signed by its CA, and refuses a
//! client without a certificate, a client that does not trust the server's CA, and plain http.

mod common;
use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use std::path::Path;

/// Writes ca.pem, server.{pem,key} (for 127.0.0.1 / localhost), client.{pem,key} signed by the
/// CA, and other-ca.pem (a CA that signed nothing here).
fn write_certs(dir: &Path) {
    let ca = |name: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert, Issuer::new(params, key))
    };
    let (ca_cert, issuer) = ca("herd test CA");
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("other-ca.pem"), ca("another CA").0.pem()).unwrap();
    for (name, sans) in [
        (
            "server",
            vec!["127.0.0.1".to_string(), "localhost".to_string()],
        ),
        ("client", vec!["worker-1".to_string()]),
    ] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

#[test]
fn mutual_tls_admits_certified_clients_and_workers_only() {
    let ws = Workspace::new(8);
    let dir = ws.path();
    write_certs(dir);
    let state = dir.join("state");
    let (_coord, addr) = start_coordinator_with(
        dir,
        &state,
        0,
        5.0,
        &[
            "--tls-cert",
            "server.pem",
            "--tls-key",
            "server.key",
            "--tls-client-ca",
            "ca.pem",
        ],
    );
    assert!(addr.starts_with("https://"), "{addr}");
    let tls = [
        "--tls-ca",
        "ca.pem",
        "--tls-cert",
        "client.pem",
        "--tls-key",
        "client.key",
    ];
    let list = |extra: &[&str], a: &str| {
        let mut c = client(dir, a, &state, &["list"]);
        c.args(extra);
        c
    };
    run_ok(&mut list(&tls, &addr));

    // No client certificate, an untrusted server CA, plain http: each fails, without a panic.
    for (what, extra, a) in [
        ("no client certificate", &tls[..2], addr.clone()),
        (
            "an untrusted CA",
            &["--tls-ca", "other-ca.pem"][..],
            addr.clone(),
        ),
        (
            "plain http",
            &[][..],
            addr.replacen("https://", "http://", 1),
        ),
    ] {
        let err = run_err(&mut list(extra, &a));
        eprintln!("{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
    // TLS files with an http:// address are a usage error, not a silent downgrade.
    let err = run_err(&mut list(&tls, &addr.replacen("https://", "http://", 1)));
    assert!(err.contains("https"), "{err}");

    // A worker with a certificate registers and runs a job to the end.
    let _w = start_worker_with(dir, &addr, &state, "w0", &tls);
    let job = ws.job("job.yaml", "out", "max_steps: 2\nsave_steps: 2\n");
    let mut submit = client(dir, &addr, &state, &["submit", job.to_str().unwrap()]);
    submit.args(tls);
    let id = String::from_utf8_lossy(&run_ok(&mut submit).stdout)
        .trim()
        .to_string();
    let mut watch = client(dir, &addr, &state, &["status", &id, "--watch"]);
    watch.args(tls);
    run_ok(&mut watch);
    assert_eq!(trainer_state(&dir.join("out"))["global_step"], 2);
}
