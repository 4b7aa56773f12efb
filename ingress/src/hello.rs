//! Reading the TLS ClientHello off a connection without terminating TLS: the bytes are
//! buffered (to be replayed to the backend as they came) and a COPY of them is fed to
//! `rustls::server::Acceptor`, which only parses the ClientHello (it holds no key and no
//! configuration); we read its `server_name()`.
//!
//! [`Sniffer`] is the sans-I/O part (bytes in, a verdict out), tested without sockets;
//! [`read`] is the thin async loop around it. The caller puts a deadline on [`read`].

use std::io;

use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// How much the ingress buffers at most before it has the whole ClientHello. Real ones are
/// well under 2 KiB (a few KiB with post-quantum key shares).
pub const MAX_HELLO: usize = 16 * 1024;

/// Why a connection's first bytes are not a ClientHello we can route.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The first bytes are not a TLS handshake record.
    #[error("not TLS (the first bytes are not a TLS handshake record)")]
    Plaintext,
    /// TLS, but the ClientHello does not parse.
    #[error("malformed ClientHello: {0}")]
    Malformed(String),
    /// More than [`MAX_HELLO`] bytes without a complete ClientHello.
    #[error("no complete ClientHello in the first {MAX_HELLO} bytes")]
    TooLarge,
    /// The client closed before its ClientHello was complete.
    #[error("the client closed the connection before its ClientHello was complete")]
    Closed,
    #[error("reading the ClientHello: {0}")]
    Io(#[from] io::Error),
}

/// What a complete ClientHello says: the SNI (a DNS name), if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub server_name: Option<String>,
}

/// Accumulates the connection's first bytes until the ClientHello is complete.
pub struct Sniffer {
    acceptor: Acceptor,
    buf: Vec<u8>,
    limit: usize,
}

impl Default for Sniffer {
    fn default() -> Self {
        Sniffer::new(MAX_HELLO)
    }
}

impl Sniffer {
    pub fn new(limit: usize) -> Sniffer {
        Sniffer {
            acceptor: Acceptor::default(),
            buf: Vec::with_capacity(2048),
            limit,
        }
    }

    /// Everything received so far: what to write to the backend first.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    pub fn into_buffered(self) -> Vec<u8> {
        self.buf
    }

    /// Take more bytes. `Ok(Some)` once the ClientHello is complete, `Ok(None)` when more
    /// bytes are needed.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<Hello>, Error> {
        let before = self.buf.len();
        self.buf.extend_from_slice(bytes);
        // A TLS record header: handshake (22), version 3.x (x <= 4). Checked on the bytes
        // we have, so one byte of HTTP is enough to say "plaintext".
        let head = &self.buf[..self.buf.len().min(3)];
        let plausible = match head {
            [] => true,
            [0x16] => true,
            [0x16, 0x03] => true,
            [0x16, 0x03, minor] => *minor <= 0x04,
            _ => false,
        };
        if !plausible {
            return Err(Error::Plaintext);
        }
        let mut new = &self.buf[before..];
        while !new.is_empty() {
            // `read_tls` on a slice never blocks; it may take only part of it.
            match self.acceptor.read_tls(&mut new) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(Error::Malformed(e.to_string())),
            }
        }
        match self.acceptor.accept() {
            Ok(Some(accepted)) => Ok(Some(Hello {
                server_name: accepted.client_hello().server_name().map(str::to_string),
            })),
            Ok(None) if self.buf.len() >= self.limit => Err(Error::TooLarge),
            Ok(None) => Ok(None),
            Err((e, _alert)) => Err(Error::Malformed(e.to_string())),
        }
    }
}

/// Read from `io` until the ClientHello is complete; returns it and every byte read.
pub async fn read<S: AsyncRead + Unpin>(io: &mut S) -> Result<(Hello, Vec<u8>), Error> {
    let mut sniffer = Sniffer::default();
    let mut chunk = [0u8; 4096];
    loop {
        let room = (sniffer.limit - sniffer.buf.len()).min(chunk.len());
        let n = io.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Err(Error::Closed);
        }
        if let Some(hello) = sniffer.push(&chunk[..n])? {
            return Ok((hello, sniffer.into_buffered()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The first flight of a real rustls client for `sni`.
    fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = match sni {
            Some(s) => rustls_pki_types::ServerName::try_from(s.to_string()).unwrap(),
            None => {
                config.enable_sni = false;
                rustls_pki_types::ServerName::try_from("example.com").unwrap()
            }
        };
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn sni_from_a_real_client_hello() {
        let bytes = client_hello(Some("backend.east.payments.weft"));
        let mut s = Sniffer::default();
        let hello = s.push(&bytes).unwrap().unwrap();
        assert_eq!(
            hello.server_name.as_deref(),
            Some("backend.east.payments.weft")
        );
        assert_eq!(
            s.buffered(),
            &bytes[..],
            "every byte is kept for the backend"
        );
    }

    #[test]
    fn byte_by_byte() {
        let bytes = client_hello(Some("backend.east.payments.weft"));
        let mut s = Sniffer::default();
        for (i, b) in bytes.iter().enumerate() {
            let r = s.push(std::slice::from_ref(b)).unwrap();
            if i + 1 < bytes.len() {
                assert!(
                    r.is_none(),
                    "complete after {} of {} bytes",
                    i + 1,
                    bytes.len()
                );
            } else {
                assert_eq!(
                    r.unwrap().server_name.as_deref(),
                    Some("backend.east.payments.weft")
                );
            }
        }
    }

    /// A ClientHello split over two TLS records (allowed by the spec; some stacks do it).
    #[test]
    fn split_over_two_records() {
        let bytes = client_hello(Some("backend.east.payments.weft"));
        let (header, body) = bytes.split_at(5);
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        assert_eq!(body.len(), len, "one record");
        let (a, b) = body.split_at(len / 2);
        let mut split = Vec::new();
        for part in [a, b] {
            split.extend_from_slice(&header[..3]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        let mut s = Sniffer::default();
        let hello = s.push(&split).unwrap().unwrap();
        assert_eq!(
            hello.server_name.as_deref(),
            Some("backend.east.payments.weft")
        );
    }

    #[test]
    fn no_sni() {
        let mut s = Sniffer::default();
        let hello = s.push(&client_hello(None)).unwrap().unwrap();
        assert_eq!(hello.server_name, None);
    }

    #[test]
    fn refusals() {
        assert!(matches!(
            Sniffer::default().push(b"GET / HTTP/1.1\r\n"),
            Err(Error::Plaintext)
        ));
        assert!(matches!(
            Sniffer::default().push(b"\x16\x01"),
            Err(Error::Plaintext)
        ));
        // A handshake record that is not a ClientHello (type 2: ServerHello).
        assert!(matches!(
            Sniffer::default().push(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"),
            Err(Error::Malformed(_))
        ));
        // A record header announcing more than the limit allows.
        let mut s = Sniffer::new(64);
        let mut big = b"\x16\x03\x01\x10\x00\x01\x00\x0f\xfc".to_vec();
        big.resize(64, 0);
        assert!(matches!(s.push(&big), Err(Error::TooLarge)));
    }

    #[tokio::test]
    async fn read_stops_at_the_limit_and_at_eof() {
        let bytes = client_hello(Some("a.b.c.weft"));
        let (hello, buffered) = read(&mut &bytes[..]).await.unwrap();
        assert_eq!(hello.server_name.as_deref(), Some("a.b.c.weft"));
        assert_eq!(buffered, bytes);
        let half = &bytes[..bytes.len() / 2];
        assert!(matches!(read(&mut &half[..]).await, Err(Error::Closed)));
    }
}
