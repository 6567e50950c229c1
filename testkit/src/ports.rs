//! Free ports: picked by binding port 0.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};

/// `n` free ports on `ip`, each picked by binding port 0; all are held until every
/// one is chosen, so they differ.
pub fn free_addrs(ip: IpAddr, n: usize) -> io::Result<Vec<SocketAddr>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((ip, 0)))
        .collect::<io::Result<Vec<_>>>()?;
    listeners.iter().map(|l| l.local_addr()).collect()
}

/// A free port on 127.0.0.1, for what must be reached there (a webhook URL, a
/// certificate's address).
pub fn free_port() -> u16 {
    free_addrs(Ipv4Addr::LOCALHOST.into(), 1).expect("a free port on 127.0.0.1")[0].port()
}

/// A free address on a loopback IP of its own (127.x.y.z) per call, so that tests
/// running in parallel, and the ephemeral ports of their client connections on
/// 127.0.0.1, can never take each other's ports.
pub fn free_addr() -> SocketAddr {
    let ip = own_loopback_ip();
    free_addrs(ip.into(), 1).unwrap_or_else(|e| panic!("a free port on {ip}: {e}"))[0]
}

fn own_loopback_ip() -> Ipv4Addr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let n = (std::process::id().wrapping_mul(2_654_435_761) ^ nanos)
        .wrapping_add(NEXT.fetch_add(7919, Ordering::Relaxed));
    Ipv4Addr::new(
        127,
        10 + (n % 200) as u8,
        (n >> 8) as u8,
        1 + ((n >> 16) % 250) as u8,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_distinct_bindable_ports() {
        let addrs = free_addrs(Ipv4Addr::LOCALHOST.into(), 3).unwrap();
        assert_eq!(addrs.len(), 3);
        assert!(addrs[0] != addrs[1] && addrs[1] != addrs[2] && addrs[0] != addrs[2]);
        TcpListener::bind(addrs[0]).unwrap();
        TcpListener::bind(("127.0.0.1", free_port())).unwrap();
    }

    #[test]
    fn own_loopback_addresses_are_loopback_and_bindable() {
        let a = free_addr();
        assert!(a.ip().is_loopback());
        TcpListener::bind(a).unwrap();
    }
}
