//! Where a worker's collective listener binds and which address it tells its peers to dial.
//!
//! The ring listener accepts only peers that prove they hold the attempt's secret, so binding
//! every interface is safe; binding loopback when the coordinator is elsewhere is not useful
//! (peers on other hosts would dial their own 127.0.0.1), which is why the default follows the
//! coordinator's address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};

/// `host:port` of a coordinator given as a URL (`http://h:p/`) or bare.
fn host_port(coordinator: &str) -> &str {
    coordinator
        .split("://")
        .last()
        .unwrap_or(coordinator)
        .trim_end_matches('/')
}

/// The coordinator's addresses, empty when it does not resolve.
fn resolve(coordinator: &str) -> Vec<SocketAddr> {
    host_port(coordinator)
        .to_socket_addrs()
        .map(|a| a.collect())
        .unwrap_or_default()
}

/// The listener's default: a free port on loopback when the coordinator resolves to loopback
/// only (one machine, as `herd run` and the tests do), else a free port on every interface, so
/// that a cluster's workers need no `--collective-listen`.
pub fn default_listen(coordinator: &str) -> SocketAddr {
    listen_for(&resolve(coordinator))
}

fn listen_for(coordinator: &[SocketAddr]) -> SocketAddr {
    let v6 = coordinator.first().is_some_and(|a| a.is_ipv6());
    let ip: IpAddr = match (
        !coordinator.is_empty() && coordinator.iter().all(|a| a.ip().is_loopback()),
        v6,
    ) {
        (true, false) => Ipv4Addr::LOCALHOST.into(),
        (true, true) => Ipv6Addr::LOCALHOST.into(),
        (false, false) => Ipv4Addr::UNSPECIFIED.into(),
        (false, true) => Ipv6Addr::UNSPECIFIED.into(),
    };
    SocketAddr::new(ip, 0)
}

/// The address peers should dial: the listener's, with an unspecified IP replaced by the local
/// IP of the route towards the coordinator (loopback when there is none).
pub fn advertised(bound: SocketAddr, coordinator: &str) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let guess = (|| {
        let target = *resolve(coordinator).first()?;
        let any: SocketAddr = if target.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let s = UdpSocket::bind(any).ok()?;
        s.connect(target).ok()?;
        Some(s.local_addr().ok()?.ip())
    })();
    let ip = guess.unwrap_or(IpAddr::from([127, 0, 0, 1]));
    SocketAddr::new(ip, bound.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(s: &[&str]) -> Vec<SocketAddr> {
        s.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn the_listener_follows_the_coordinator() {
        let l = |s: &[&str]| listen_for(&addrs(s)).to_string();
        assert_eq!(l(&["127.0.0.1:7733"]), "127.0.0.1:0");
        assert_eq!(l(&["[::1]:7733"]), "[::1]:0");
        assert_eq!(l(&["[::1]:7733", "127.0.0.1:7733"]), "[::1]:0");
        // Another machine's coordinator: peers on other hosts must reach this worker.
        assert_eq!(l(&["10.1.2.3:7733"]), "0.0.0.0:0");
        assert_eq!(l(&["[fd00::5]:7733"]), "[::]:0");
        assert_eq!(l(&["127.0.0.1:7733", "10.1.2.3:7733"]), "0.0.0.0:0");
        assert_eq!(l(&[]), "0.0.0.0:0");
        // Resolution, through the URL forms the CLI accepts.
        assert_eq!(
            default_listen("http://127.0.0.1:7733/").to_string(),
            "127.0.0.1:0"
        );
        assert_eq!(default_listen("127.0.0.1:7733").to_string(), "127.0.0.1:0");
        assert_eq!(
            default_listen("https://10.1.2.3:7733").to_string(),
            "0.0.0.0:0"
        );
    }

    #[test]
    fn advertise_keeps_specific_ips() {
        let a: SocketAddr = "10.1.2.3:5".parse().unwrap();
        assert_eq!(advertised(a, "http://127.0.0.1:1"), a);
        let u: SocketAddr = "0.0.0.0:7".parse().unwrap();
        let got = advertised(u, "http://127.0.0.1:1");
        assert_eq!(got.port(), 7);
        assert!(!got.ip().is_unspecified());
    }
}
