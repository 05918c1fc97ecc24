//! A minimal HTTP/1.1 server on `127.0.0.1` (plain, or TLS through rustls)
//! that plays a remote reward service in tests and benchmarks. Hand-written
//! because it must misbehave on demand (slow, failing, redirecting, wrong
//! replies), which a real server framework makes harder, not easier.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

use crate::error::{Error, Result};

/// What a [`LoopbackServer`] handler answers: status, JSON body, and a delay
/// before answering.
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Body (sent as `application/json`).
    pub body: String,
    /// Wait before writing the reply.
    pub delay: Duration,
    /// A `Location` header (for redirects).
    pub location: Option<String>,
}

impl Reply {
    /// `200` with `body`, no delay.
    pub fn ok(body: String) -> Self {
        Reply {
            status: 200,
            body,
            delay: Duration::ZERO,
            location: None,
        }
    }
}

type Handler = dyn Fn(usize, &[u8]) -> Reply + Send + Sync;

/// A minimal HTTP/1.1 server on `127.0.0.1` for tests and benchmarks: each
/// connection is served on its own thread by `handler(request_index, body)`,
/// one request per connection. Stops when dropped.
pub struct LoopbackServer {
    addr: std::net::SocketAddr,
    scheme: &'static str,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LoopbackServer {
    /// Starts a plain HTTP server on a free port.
    pub fn start(handler: impl Fn(usize, &[u8]) -> Reply + Send + Sync + 'static) -> Result<Self> {
        Self::spawn(Arc::new(handler), None)
    }

    /// Starts an HTTPS server on a free port presenting `cert` (for
    /// `127.0.0.1`) with its `key`.
    pub fn start_tls(
        handler: impl Fn(usize, &[u8]) -> Reply + Send + Sync + 'static,
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self> {
        // ring (deprecated in rustls for lacking post-quantum key exchange) is the
        // provider ureq builds; aws-lc-rs would add a second C crypto library
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(vec![cert], key))
            .map_err(|e| Error::Input(format!("loopback TLS server: {e}")))?;
        Self::spawn(Arc::new(handler), Some(Arc::new(tls)))
    }

    fn spawn(handler: Arc<Handler>, tls: Option<Arc<rustls::ServerConfig>>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("127.0.0.1:0", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("127.0.0.1:0", e))?;
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (req, st) = (requests.clone(), stop.clone());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let index = req.fetch_add(1, Ordering::SeqCst);
                let (h, tls) = (handler.clone(), tls.clone());
                std::thread::spawn(move || {
                    let _ = match tls {
                        None => serve(conn, index, &*h),
                        Some(cfg) => serve_tls(conn, cfg, index, &*h),
                    };
                });
            }
        });
        Ok(LoopbackServer {
            addr,
            scheme,
            requests,
            stop,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT/score` (`https://` for a TLS server).
    pub fn url(&self) -> String {
        format!("{}://{}/score", self.scheme, self.addr)
    }

    /// Connections accepted so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// A server answering every request with [`echo`].
    pub fn echo() -> Result<Self> {
        Self::start(echo)
    }
}

/// A handler answering every request with `scores[i] = i` (one per prompt).
pub fn echo(_index: usize, body: &[u8]) -> Reply {
    let n = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("prompts").and_then(Value::as_array).map(Vec::len))
        .unwrap_or(0);
    let scores: Vec<f64> = (0..n).map(|i| i as f64).collect();
    Reply::ok(serde_json::json!({ "scores": scores }).to_string())
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One TLS connection: the handshake, then [`serve`] over the encrypted stream.
fn serve_tls(
    conn: TcpStream,
    cfg: Arc<rustls::ServerConfig>,
    index: usize,
    handler: &Handler,
) -> std::io::Result<()> {
    let session = rustls::ServerConnection::new(cfg).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(session, conn);
    serve(&mut tls, index, handler)?;
    tls.conn.send_close_notify();
    tls.flush()
}

/// One request on `conn`: headers, a `Content-Length` body, the handler's reply.
fn serve<S: Read + Write>(mut conn: S, index: usize, handler: &Handler) -> std::io::Result<()> {
    let mut reader = BufReader::new(&mut conn);
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    drop(reader);
    let reply = handler(index, &body);
    std::thread::sleep(reply.delay);
    let location = match &reply.location {
        Some(to) => format!("Location: {to}\r\n"),
        None => String::new(),
    };
    write!(
        conn,
        "HTTP/1.1 {} X\r\nContent-Type: application/json\r\n{location}Content-Length: {}\r\nConnection: close\r\n\r\n{}",
        reply.status,
        reply.body.len(),
        reply.body
    )?;
    conn.flush()
}
