//! A plain HTTP/1.0 GET of another binary's `/metrics` on this machine.
//!
//! The endpoints are local Prometheus pages served by our own binaries, so a
//! full HTTP client crate would be dead weight: we send one request with
//! `Connection: close`, read until EOF (bounded in size and time) and decode
//! the body, de-chunking it in case a server answers HTTP/1.0 with chunks
//! anyway. URL splitting and response decoding are pure and unit-tested.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::Error;

/// Largest body accepted; a Prometheus page of ours is a few KiB.
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// `host:port` and path of an `http://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port` to connect to (port 80 when the URL has none).
    pub authority: String,
    /// Path and query, at least `/`.
    pub path: String,
}

/// Splits an `http://host[:port][/path]` URL; anything else is a config error.
pub fn target(url: &str) -> Result<Target, Error> {
    let bad = || Error::MetricsUrl {
        url: url.to_owned(),
    };
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(bad());
    }
    let authority = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else if authority.contains(':') && !authority.ends_with(']') {
        return Err(bad());
    } else {
        format!("{authority}:80")
    };
    Ok(Target {
        authority,
        path: path.to_owned(),
    })
}

/// Status code and decoded body of a raw HTTP response.
pub fn decode_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..head_end]).ok()?;
    let body = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Some((status, body))
}

/// Decodes a chunked transfer-encoded body.
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

/// GETs `url` and returns its body as text; the whole exchange is bounded
/// by `timeout`.
pub async fn get(url: &str, timeout: Duration) -> Result<String, Error> {
    let t = target(url)?;
    let exchange = async {
        let mut stream = TcpStream::connect(&t.authority).await?;
        let request = format!(
            "GET {} HTTP/1.0\r\nHost: {}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
            t.path, t.authority
        );
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        (&mut stream)
            .take(MAX_RESPONSE as u64)
            .read_to_end(&mut raw)
            .await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Error::ScrapeTimeout {
            url: url.to_owned(),
        })?
        .map_err(|source| Error::Scrape {
            url: url.to_owned(),
            source,
        })?;
    let (status, body) = decode_response(&raw).ok_or_else(|| Error::ScrapeResponse {
        url: url.to_owned(),
        status: None,
    })?;
    if status != 200 {
        return Err(Error::ScrapeResponse {
            url: url.to_owned(),
            status: Some(status),
        });
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_authority_and_path() {
        assert_eq!(
            target("http://127.0.0.1:9472/metrics").ok(),
            Some(Target {
                authority: "127.0.0.1:9472".into(),
                path: "/metrics".into()
            })
        );
        assert_eq!(
            target("http://localhost").ok(),
            Some(Target {
                authority: "localhost:80".into(),
                path: "/".into()
            })
        );
        assert!(target("https://127.0.0.1:9472/metrics").is_err());
        assert!(target("http:///metrics").is_err());
        assert!(target("http://u:p@host:1/").is_err());
        assert!(target("http://host:notaport/").is_err());
    }

    #[test]
    fn plain_and_chunked_bodies_decode() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nup 1\n";
        assert_eq!(decode_response(plain), Some((200, b"up 1\n".to_vec())));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nup 1\r\n1;x=y\r\n\n\r\n0\r\n\r\n";
        assert_eq!(decode_response(chunked), Some((200, b"up 1\n".to_vec())));
        let missing = b"HTTP/1.0 404 Not Found\r\n\r\n";
        assert_eq!(decode_response(missing), Some((404, Vec::new())));
        assert_eq!(decode_response(b"garbage"), None);
        let truncated = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc";
        assert_eq!(decode_response(truncated), None);
    }

    #[tokio::test]
    async fn get_reads_from_a_real_socket_and_reports_refusal() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nx 2\n")
                    .await;
            }
        });
        let body = get(&format!("http://{addr}/metrics"), Duration::from_secs(2)).await;
        assert_eq!(body.ok().as_deref(), Some("x 2\n"));
        // Port 1 on loopback: nothing listens there.
        let refused = get("http://127.0.0.1:1/metrics", Duration::from_secs(2)).await;
        assert!(matches!(refused, Err(Error::Scrape { .. })));
    }
}
