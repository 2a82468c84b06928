//! `herd serve` over plain HTTP/1.1 on a raw socket: start the real binary on loopback with the
//! demo model and send it requests.

use super::{announced, herd_clean, Proc};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;

pub struct Server {
    pub _proc: Proc,
    pub addr: String,
    pub token: String,
}

pub fn start_server(dir: &Path, extra: &[&str]) -> Server {
    let log = dir.join("serve.log");
    let mut child = herd_clean()
        .current_dir(dir)
        .args([
            "serve",
            "--model",
            "demo/model",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            "st",
        ])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let addr = announced(&mut child, "herd serve listening on http://", &log);
    let token_file = dir.join("st/token");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the token file must be private");
    }
    let token = std::fs::read_to_string(token_file)
        .unwrap()
        .trim()
        .to_string();
    Server {
        _proc: Proc { child, log },
        addr,
        token,
    }
}

/// A socket with one request sent on it.
pub fn send(addr: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// One request; (status, body).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = send(addr, method, path, token, body);
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {raw:?}"));
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The `data:` payloads of a server-sent-events body (hyper's chunk-size lines are not `data:`
/// lines, and each event is written as one chunk).
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}
