//! A raw HTTP/1.0 GET or empty POST (no client library): the metrics, health,
//! readiness and shutdown endpoints the tests use. One request and one reading of the
//! answer, sent either blocking ([`get`], [`post`]) or on the tokio runtime
//! ([`get_async`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

/// The GET request for `path` on `host`.
fn request(host: &str, path: &str) -> String {
    format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")
}

/// (status, body) of an answer read to the end of the connection; None when it is
/// not an HTTP answer.
pub fn parse(answer: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(answer);
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// GET `path` on `addr`, blocking: (status, body), status 0 when the answer is not
/// HTTP. Panics when nothing answers at `addr` (a test's server must).
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    send(addr, &request(&addr.ip().to_string(), path), "GET", path)
}

/// POST with an empty body to `path` on `addr`, blocking, as [`get`].
pub fn post(addr: SocketAddr, path: &str) -> (u16, String) {
    let host = addr.ip().to_string();
    let req = format!("POST {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n");
    send(addr, &req, "POST", path)
}

fn send(addr: SocketAddr, req: &str, method: &str, path: &str) -> (u16, String) {
    let fail = |e: std::io::Error| -> ! { panic!("{method} {path} on {addr}: {e}") };
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| fail(e));
    s.write_all(req.as_bytes()).unwrap_or_else(|e| fail(e));
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap_or_else(|e| fail(e));
    parse(&answer).unwrap_or((0, String::new()))
}

/// GET `path` on `host:port` without blocking the runtime: (status, body), or None
/// when there is no HTTP answer.
pub async fn get_async(host: &str, port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect((host, port)).await.ok()?;
    s.write_all(request(host, path).as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.ok()?;
    parse(&answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Answers one request with `answer`; returns its address and the request seen.
    fn serve_once(answer: &'static str) -> (SocketAddr, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0; 512];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(answer.as_bytes()).unwrap();
            String::from_utf8(req).unwrap()
        });
        (addr, t)
    }

    #[test]
    fn blocking_get_returns_status_and_body() {
        let (addr, t) = serve_once("HTTP/1.1 503 Service Unavailable\r\nx: y\r\n\r\nnot ready");
        assert_eq!(get(addr, "/readyz"), (503, "not ready".into()));
        assert!(t.join().unwrap().starts_with("GET /readyz HTTP/1.0\r\n"));
    }

    #[tokio::test]
    async fn async_get_returns_status_and_body_or_none() {
        let (addr, t) = serve_once("HTTP/1.1 200 OK\r\n\r\nmetric 1\n");
        let got = get_async("127.0.0.1", addr.port(), "/metrics").await;
        assert_eq!(got, Some((200, "metric 1\n".into())));
        t.join().unwrap();
        let (addr, t) = serve_once("garbage");
        assert_eq!(get_async("127.0.0.1", addr.port(), "/").await, None);
        t.join().unwrap();
    }

    #[test]
    fn a_non_http_answer_is_status_0() {
        let (addr, t) = serve_once("");
        assert_eq!(get(addr, "/"), (0, String::new()));
        t.join().unwrap();
    }
}
