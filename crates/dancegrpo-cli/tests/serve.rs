//! `dancegrpo serve` on loopback: concurrent clients answered (and batched),
//! the same request the same image whatever it was batched with, a full
//! queue answered 503, bad requests 400 with a message naming the field.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::thread;
use std::time::Duration;

use common::bin;

/// A running server and its address; killed when dropped.
struct Running {
    child: Child,
    addr: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str]) -> Running {
    let mut child = bin()
        .args(["serve", "tiny", "--port", "0", "--threads", "1"])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    Running { child, addr }
}

/// An HTTP answer: `(status, body)`.
type Answer = (u16, Vec<u8>);

/// One HTTP/1.1 request.
fn http(addr: &str, method: &str, path: &str, body: &str) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, raw[split + 4..].to_vec())
}

fn png_size(bytes: &[u8]) -> (u32, u32) {
    let info = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    (info.info().width, info.info().height)
}

/// A slow request of its own (512x512, 40 steps) in a thread, then, once it
/// runs, `n` concurrent requests `body(i)`: the answers of both.
fn behind_a_slow_one(addr: &str, n: usize, body: fn(usize) -> String) -> (Answer, Vec<Answer>) {
    let slow = {
        let addr = addr.to_string();
        let big = r#"{"prompt": "slow", "height": 512, "width": 512, "steps": 40}"#;
        thread::spawn(move || http(&addr, "POST", "/generate", big))
    };
    thread::sleep(Duration::from_millis(150));
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let addr = addr.to_string();
            thread::spawn(move || http(&addr, "POST", "/generate", &body(i)))
        })
        .collect();
    let answers = clients.into_iter().map(|c| c.join().unwrap()).collect();
    (slow.join().unwrap(), answers)
}

fn health(addr: &str) -> serde_json::Value {
    let (status, body) = http(addr, "GET", "/health", "");
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

#[test]
fn concurrent_clients_are_answered_in_batches_and_deterministically() {
    let server = start(&["--max-batch", "4", "--queue", "32", "--max-side", "512"]);
    let addr = server.addr.clone();
    // a slow request of its own size first, so that the others queue up behind it
    let body = |i: usize| format!(r#"{{"prompt": "synthetic prompt {}", "seed": {i}}}"#, i % 4);
    let ((status, big), answers) = behind_a_slow_one(&addr, 16, body);
    assert_eq!((status, png_size(&big)), (200, (512, 512)));
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{}", String::from_utf8_lossy(body));
        assert_eq!(png_size(body), (64, 64));
    }
    // the same request alone: the same image as in its batch
    let (status, alone) = http(
        &addr,
        "POST",
        "/generate",
        r#"{"prompt": "synthetic prompt 1", "seed": 5}"#,
    );
    assert_eq!(status, 200);
    assert_eq!(alone, answers[5].1);
    assert_ne!(answers[5].1, answers[6].1);
    let h = health(&addr);
    assert_eq!(h["served"], 18);
    let batches = h["batches"].as_u64().unwrap();
    assert!(batches < 18, "requests were batched: {h}");
    assert_eq!(h["queued"], 0);
}

#[test]
fn a_full_queue_answers_503_and_bad_requests_400() {
    let server = start(&["--max-batch", "1", "--queue", "1", "--max-side", "512"]);
    let addr = server.addr.clone();
    let body = |i: usize| format!(r#"{{"prompt": "p", "seed": {i}}}"#);
    let ((slow, _), answers) = behind_a_slow_one(&addr, 6, body);
    assert_eq!(slow, 200);
    let full = answers.iter().filter(|(s, _)| *s == 503).count();
    assert!(full >= 1, "some requests found the queue full");
    for (status, body) in &answers {
        let text = String::from_utf8_lossy(body);
        match status {
            200 => assert_eq!(png_size(body), (64, 64)),
            503 => assert!(text.contains("queue is full"), "{text}"),
            other => panic!("status {other}: {text}"),
        }
    }
    assert_eq!(health(&addr)["rejected"].as_u64().unwrap() as usize, full);
    for (method, path, body, status, needle) in [
        (
            "POST",
            "/generate",
            "{not json",
            400,
            "invalid request JSON",
        ),
        (
            "POST",
            "/generate",
            r#"{"prompt": "x", "height": 100}"#,
            400,
            "height: must be a multiple of 16",
        ),
        (
            "POST",
            "/generate",
            r#"{"prompt": "x", "width": 1024}"#,
            400,
            "width: must be a multiple of 16 in 16..=512",
        ),
        (
            "POST",
            "/generate",
            r#"{"prompt": "x", "steps": 1000}"#,
            400,
            "steps",
        ),
        (
            "POST",
            "/generate",
            r#"{"prompt": "x", "size": 64}"#,
            400,
            "unknown field `size`",
        ),
        ("GET", "/generate", "", 405, "method not allowed"),
        ("GET", "/metrics", "", 404, "no such endpoint /metrics"),
    ] {
        let (got, text) = http(&addr, method, path, body);
        let text = String::from_utf8_lossy(&text);
        assert_eq!(got, status, "{body}: {text}");
        assert!(text.contains(needle), "{body}: {text}");
    }
    // still serving
    assert_eq!(
        http(&addr, "POST", "/generate", r#"{"prompt": "p"}"#).0,
        200
    );
}
