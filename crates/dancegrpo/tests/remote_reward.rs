//! The remote reward client against a loopback server: timeouts, retries with
//! backoff, a dead service, malformed replies; never a hang, never a 0 score;
//! HTTPS with a self-signed certificate, and plain HTTP only on loopback.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dancegrpo::io::image::read_image;
use dancegrpo::rewards::loopback::echo;
use dancegrpo::rewards::remote::{
    base64_decode, check_url, LoopbackServer, RemoteConfig, RemoteReward, Reply,
};
use dancegrpo::rewards::{Reward, RewardBatch, Score};
use rustls_pki_types::PrivateKeyDer;
use tch::{Device, Kind, Tensor};

fn batch_images() -> Tensor {
    Tensor::arange(3 * 6 * 5 * 3, (Kind::Int64, Device::Cpu))
        .remainder(256)
        .to_kind(Kind::Uint8)
        .view([3, 6, 5, 3])
}

fn prompts() -> Vec<String> {
    vec!["one".into(), "two".into(), "three".into()]
}

fn client(url: &str, timeout_ms: u64, retries: u32, backoff_ms: u64) -> RemoteReward {
    let mut cfg = RemoteConfig::new(url, timeout_ms as f64 / 1000.0, retries);
    cfg.backoff = Duration::from_millis(backoff_ms);
    RemoteReward::new(cfg).unwrap()
}

fn score(r: &mut RemoteReward) -> (Vec<Score>, Duration) {
    let images = batch_images();
    let prompts = prompts();
    let start = Instant::now();
    let s = r
        .score(&RewardBatch {
            images: &images,
            prompts: &prompts,
        })
        .unwrap();
    (s, start.elapsed())
}

fn all_failed(s: &[Score], needle: &str) {
    assert_eq!(s.len(), 3);
    for x in s {
        match x {
            Score::Failed(why) => assert!(why.contains(needle), "{why}"),
            Score::Value(v) => panic!("expected a failure, got {v}"),
        }
    }
}

#[test]
fn slow_service_times_out_quickly() {
    let server = LoopbackServer::start(|_, _| Reply {
        status: 200,
        body: r#"{"scores": [1, 2, 3]}"#.into(),
        delay: Duration::from_secs(5),
        location: None,
    })
    .unwrap();
    // 300 ms per attempt, one retry after 50 ms: at most ~0.65 s, far below the 5 s delay.
    let mut r = client(&server.url(), 300, 1, 50);
    let (s, took) = score(&mut r);
    all_failed(&s, "2 attempt(s)");
    assert_eq!(r.last_attempts(), 2);
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    assert!(took >= Duration::from_millis(600), "took {took:?}");
    assert!(r.config().worst_case() < Duration::from_secs(1));
    assert_eq!(server.requests(), 2);
}

/// What the server saw in one request: the prompts, and per image (height, width, one pixel).
type Seen = (Vec<String>, Vec<Vec<i64>>);

#[test]
fn failing_twice_then_answering_gives_the_scores_after_two_retries() {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    let server = LoopbackServer::start(move |i, body| {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        let prompts: Vec<String> = serde_json::from_value(v["prompts"].clone()).unwrap();
        // decode every PNG the client sent
        let dims = v["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b64| {
                let png = base64_decode(b64.as_str().unwrap()).unwrap();
                let path = std::env::temp_dir()
                    .join(format!("dancegrpo-remote-{}-{i}.png", std::process::id()));
                std::fs::write(&path, png).unwrap();
                let t = read_image(&path).unwrap();
                let _ = std::fs::remove_file(&path);
                vec![t.size()[0], t.size()[1], t.int64_value(&[1, 2, 0])]
            })
            .collect();
        log.lock().unwrap().push((prompts, dims));
        if i < 2 {
            Reply {
                status: 500,
                body: "overloaded".into(),
                delay: Duration::ZERO,
                location: None,
            }
        } else {
            Reply::ok(r#"{"scores": [0.25, -1.5, null], "errors": [null, null, "nsfw"]}"#.into())
        }
    })
    .unwrap();
    let mut r = client(&server.url(), 2000, 3, 20);
    let (s, took) = score(&mut r);
    assert_eq!(s[0], Score::Value(0.25));
    assert_eq!(s[1], Score::Value(-1.5));
    assert!(
        matches!(&s[2], Score::Failed(w) if w.contains("nsfw")),
        "{s:?}"
    );
    assert_eq!(r.last_attempts(), 3);
    assert_eq!(server.requests(), 3);
    // backoff 20 ms then 40 ms
    assert!(took >= Duration::from_millis(60), "took {took:?}");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[2].0, prompts());
    // each image came through as a 6x5 PNG with its pixels intact
    let images = batch_images();
    for (b, d) in seen[2].1.iter().enumerate() {
        assert_eq!(d[..2], [6, 5]);
        assert_eq!(d[2], images.int64_value(&[b as i64, 1, 2, 0]));
    }
}

#[test]
fn a_dead_service_fails_every_item_within_the_retry_budget() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // closed again: connections are refused
    let mut r = client(&format!("http://127.0.0.1:{port}/score"), 500, 2, 10);
    let (s, took) = score(&mut r);
    all_failed(&s, "3 attempt(s)");
    assert_eq!(r.last_attempts(), 3);
    assert!(
        took < r.config().worst_case() + Duration::from_secs(1),
        "took {took:?}"
    );
}

#[test]
fn malformed_replies_fail_the_batch_without_retrying() {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let server = LoopbackServer::start(move |_, _| {
        c.fetch_add(1, Ordering::SeqCst);
        Reply::ok(r#"{"scores": [1.0, 2.0]}"#.into())
    })
    .unwrap();
    let mut r = client(&server.url(), 2000, 3, 10);
    let (s, _) = score(&mut r);
    all_failed(&s, "2 scores for 3 images");
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert_eq!(r.last_attempts(), 1);

    let bad = LoopbackServer::start(|i, _| match i {
        0 => Reply::ok("<html>".into()),
        _ => Reply {
            status: 404,
            body: "no such route".into(),
            delay: Duration::ZERO,
            location: None,
        },
    })
    .unwrap();
    let mut r = client(&bad.url(), 2000, 3, 10);
    all_failed(&score(&mut r).0, "not JSON");
    all_failed(&score(&mut r).0, "HTTP 404");
    assert_eq!(bad.requests(), 2);
}

#[test]
fn bad_configs_and_inputs_are_errors() {
    let mut cfg = RemoteConfig::new("ftp://example.com/x", 1.0, 0);
    let err = RemoteReward::new(cfg.clone()).err().unwrap().to_string();
    assert!(err.contains("scheme `ftp`"), "{err}");
    cfg.url = "http://127.0.0.1:9/x".into();
    cfg.timeout = Duration::ZERO;
    assert!(RemoteReward::new(cfg).is_err());
    let mut r = client("http://127.0.0.1:9/x", 100, 0, 0);
    let rgba = Tensor::zeros([1, 4, 4, 4], (Kind::Uint8, Device::Cpu));
    let p = vec!["a".to_string()];
    assert!(r
        .score(&RewardBatch {
            images: &rgba,
            prompts: &p
        })
        .is_err());
}

#[test]
fn a_redirect_is_refused_naming_where_it_points() {
    let server = LoopbackServer::start(|_, _| Reply {
        status: 307,
        body: String::new(),
        delay: Duration::ZERO,
        location: Some("http://10.9.9.9/elsewhere".into()),
    })
    .unwrap();
    let mut r = client(&server.url(), 2000, 3, 10);
    let (s, _) = score(&mut r);
    all_failed(&s, "redirect to http://10.9.9.9/elsewhere");
    all_failed(&s, "1 attempt(s)");
    assert_eq!(server.requests(), 1);
}

#[test]
fn a_reply_over_the_size_limit_is_not_retried() {
    let big = dancegrpo::rewards::remote::MAX_REPLY_BYTES as usize + 10;
    let server = LoopbackServer::start(move |_, _| Reply::ok(" ".repeat(big))).unwrap();
    let mut r = client(&server.url(), 10_000, 3, 10);
    let (s, _) = score(&mut r);
    all_failed(&s, "larger than");
    assert_eq!(server.requests(), 1);
}

#[test]
fn the_batch_budget_bounds_every_retry() {
    let server = LoopbackServer::start(|_, _| Reply {
        status: 503,
        body: "busy".into(),
        delay: Duration::from_millis(150),
        location: None,
    })
    .unwrap();
    // ten retries 100 ms apart would take ~2.5 s; the budget stops them after ~0.6 s
    let mut cfg = RemoteConfig::new(&server.url(), 2.0, 10);
    cfg.backoff = Duration::from_millis(100);
    cfg.budget = Duration::from_millis(600);
    let mut r = RemoteReward::new(cfg).unwrap();
    let (s, took) = score(&mut r);
    all_failed(&s, "batch budget");
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert!(r.last_attempts() < 5, "{} attempts", r.last_attempts());
    assert!(r.config().worst_case() <= Duration::from_millis(600));
    let mut cfg = RemoteConfig::new(&server.url(), 2.0, 11);
    cfg.budget = Duration::from_secs(1);
    let err = RemoteReward::new(cfg).err().unwrap().to_string();
    assert!(err.contains("at most 10 retries"), "{err}");
}

#[test]
fn https_with_a_private_ca_and_plain_http_only_on_loopback() {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let server = LoopbackServer::start_tls(echo, cert.cert.der().clone(), key).unwrap();
    assert!(server.url().starts_with("https://127.0.0.1:"));
    // a self-signed certificate is nobody's root: every item fails, naming it
    let mut r = client(&server.url(), 5000, 0, 0);
    all_failed(&score(&mut r).0, "UnknownIssuer");
    // trusted through ca_file: scored over TLS
    let dir = std::env::temp_dir().join(format!("dancegrpo-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pem = dir.join("ca.pem");
    std::fs::write(&pem, cert.cert.pem()).unwrap();
    let mut cfg = RemoteConfig::new(&server.url(), 5.0, 0);
    cfg.ca_file = Some(pem.clone());
    let mut r = RemoteReward::new(cfg.clone()).unwrap();
    let (s, _) = score(&mut r);
    assert_eq!(s, [Score::Value(0.0), Score::Value(1.0), Score::Value(2.0)]);
    // a ca_file that holds no certificate is refused, naming file and field
    std::fs::write(&pem, "not a certificate").unwrap();
    let err = RemoteReward::new(cfg).err().unwrap().to_string();
    assert!(err.contains("ca.pem") && err.contains("`ca_file`"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
    // plain http: loopback only, unless allowed
    for ok in [
        "http://127.0.0.1:9/x",
        "http://localhost/x",
        "http://[::1]:80/",
        "https://10.0.0.1/x",
    ] {
        assert_eq!(check_url(ok, false), Ok(()), "{ok}");
    }
    let err = check_url("http://10.0.0.1:8000/score", false).unwrap_err();
    assert!(
        err.contains("unencrypted") && err.contains("allow_plain_http"),
        "{err}"
    );
    assert_eq!(check_url("http://10.0.0.1:8000/score", true), Ok(()));
}
