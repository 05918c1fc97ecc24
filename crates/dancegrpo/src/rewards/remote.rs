//! A reward computed by an HTTP service (the protocol: `docs/rewards.md`).
//!
//! One `POST` per batch, `Content-Type: application/json`:
//!
//! ```text
//! request  {"prompts": ["a cat", ...], "images": ["<base64 PNG>", ...]}      (B of each, same order)
//! reply    200 {"scores": [0.31, null, ...], "errors": [null, "why", ...]}   ("errors" optional)
//! ```
//!
//! A `null` score, or a non-null `errors` entry, fails that item. Timeouts,
//! connection failures, HTTP 5xx and 429 are retried (at most `retries` times,
//! waiting `backoff * 2^k`, capped at 30 s); other HTTP statuses and malformed
//! replies (not JSON, wrong number of scores) are not. When no attempt
//! succeeds every item of the batch is a [`Score::Failed`] naming the cause.
//! Each attempt is bounded by `timeout` (connect, send and receive together),
//! and a whole batch by `budget`. Redirects are not followed, and a reply
//! larger than [`MAX_REPLY_BYTES`] fails the batch without a retry.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::{Reward, RewardBatch, Score};
use crate::error::{Error, Result};
use crate::io::image::encode_png;

pub use super::loopback::{LoopbackServer, Reply};

/// Where and how to call the service.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteConfig {
    /// `https://host:port/path`, or `http://` to a loopback address (any
    /// host with [`RemoteConfig::allow_plain_http`]).
    pub url: String,
    /// Bound of one attempt (connect, send and receive).
    pub timeout: Duration,
    /// Attempts after the first one.
    pub retries: u32,
    /// Wait before the first retry; doubled for each further one.
    pub backoff: Duration,
    /// Bound of one batch, every attempt and wait included: no retry starts
    /// after it, and the last attempt's timeout is cut to what is left.
    pub budget: Duration,
    /// PEM certificates of the CAs to trust besides the system's and the
    /// bundled Mozilla roots (a service with a private CA).
    pub ca_file: Option<PathBuf>,
    /// Allow plain `http://` to hosts other than loopback (prompts and images
    /// then cross the network unencrypted).
    pub allow_plain_http: bool,
}

/// The most retries a configuration may ask for.
pub const MAX_RETRIES: u32 = 10;

/// The largest reply read (a reply of scores is a few kB); a larger one is
/// malformed, not worth another attempt.
pub const MAX_REPLY_BYTES: u64 = 16 << 20;

impl RemoteConfig {
    /// `url` with a `timeout_s` per attempt, `retries` retries, a 0.5 s first
    /// backoff and a 300 s budget per batch.
    pub fn new(url: &str, timeout_s: f64, retries: u32) -> Self {
        RemoteConfig {
            url: url.to_string(),
            timeout: Duration::from_secs_f64(timeout_s.max(0.0)),
            retries,
            backoff: Duration::from_millis(500),
            budget: Duration::from_secs(300),
            ca_file: None,
            allow_plain_http: false,
        }
    }

    /// The longest [`RemoteReward::score`] can take when the service never
    /// answers: every attempt's timeout plus every backoff, at most the budget.
    pub fn worst_case(&self) -> Duration {
        let all = (0..=self.retries).map(|_| self.timeout).sum::<Duration>()
            + (0..self.retries)
                .map(|k| self.backoff_before(k))
                .sum::<Duration>();
        all.min(self.budget)
    }

    /// The wait before retry `k` (0-based).
    pub fn backoff_before(&self, k: u32) -> Duration {
        let f = 2f64.powi(k.min(30) as i32);
        Duration::from_secs_f64((self.backoff.as_secs_f64() * f).min(30.0))
    }
}

/// Whether the reward may call `url`: `https://` anywhere, `http://` to a
/// loopback host (`localhost`, `127.0.0.0/8`, `::1`), or anywhere when
/// `allow_plain_http`. The error says why not.
pub fn check_url(url: &str, allow_plain_http: bool) -> std::result::Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    let loopback = match parsed.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err("no host".into()),
    };
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback || allow_plain_http => Ok(()),
        "http" => Err(format!(
            "plain http:// to {} would send the prompts and images unencrypted: use https://, or set allow_plain_http = true",
            parsed.host_str().unwrap_or_default()
        )),
        other => Err(format!("scheme `{other}` (want https://, or http:// on loopback)")),
    }
}

/// Why an attempt failed.
enum AttemptError {
    /// Worth another attempt (timeout, connection, 5xx, 429).
    Retry(String),
    /// Another attempt would fail the same way (4xx, malformed reply).
    Fatal(String),
}

/// The remote reward client.
pub struct RemoteReward {
    cfg: RemoteConfig,
    agent: ureq::Agent,
    attempts: usize,
}

impl RemoteReward {
    /// A client for `cfg` ([`check_url`]; the timeout positive).
    pub fn new(cfg: RemoteConfig) -> Result<Self> {
        if let Err(why) = check_url(&cfg.url, cfg.allow_plain_http) {
            return Err(Error::Input(format!(
                "remote reward url `{}`: {why}",
                cfg.url
            )));
        }
        if cfg.timeout.is_zero() || cfg.budget.is_zero() {
            return Err(Error::Input(format!(
                "remote reward {}: the timeout and the budget must be positive",
                cfg.url
            )));
        }
        if cfg.retries > MAX_RETRIES {
            return Err(Error::Input(format!(
                "remote reward {}: at most {MAX_RETRIES} retries, got {}",
                cfg.url, cfg.retries
            )));
        }
        // a redirect is refused: following it would post the images elsewhere
        let tls = super::tls::client_config(cfg.ca_file.as_deref())?;
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .tls_config(tls)
            .build();
        Ok(RemoteReward {
            cfg,
            agent,
            attempts: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RemoteConfig {
        &self.cfg
    }

    /// Requests made by the last [`Reward::score`] call.
    pub fn last_attempts(&self) -> usize {
        self.attempts
    }

    /// The JSON request body of a batch.
    pub fn request_body(batch: &RewardBatch) -> Result<String> {
        let b = batch.images.size().first().copied().unwrap_or(0);
        if batch.images.dim() != 4 || batch.prompts.len() as i64 != b {
            return Err(Error::Input(format!(
                "remote reward: images of shape {:?} for {} prompts, expected uint8 (B, H, W, 3)",
                batch.images.size(),
                batch.prompts.len()
            )));
        }
        let images = (0..b)
            .map(|i| Ok(base64_encode(&encode_png(&batch.images.get(i))?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(serde_json::json!({"prompts": batch.prompts, "images": images}).to_string())
    }

    fn attempt(
        &self,
        body: &str,
        n: usize,
        timeout: Duration,
    ) -> std::result::Result<Vec<Score>, AttemptError> {
        let resp = self
            .agent
            .post(&self.cfg.url)
            .timeout(timeout)
            .set("Content-Type", "application/json")
            .send_string(body);
        let text = match resp {
            Ok(r) if (300..400).contains(&r.status()) => {
                let to = r.header("Location").unwrap_or("(no Location)").to_string();
                return Err(AttemptError::Fatal(format!(
                    "HTTP {} redirect to {to}: redirects are not followed; set the reward's url to the service's own address",
                    r.status()
                )));
            }
            Ok(r) => read_reply(r)?,
            Err(ureq::Error::Status(code, r)) => {
                let mut text = r.into_string().unwrap_or_default();
                text.truncate(200);
                let msg = format!("HTTP {code}: {text}");
                return Err(if code >= 500 || code == 429 {
                    AttemptError::Retry(msg)
                } else {
                    AttemptError::Fatal(msg)
                });
            }
            Err(e) => return Err(AttemptError::Retry(e.to_string())),
        };
        parse_reply(&text, n).map_err(AttemptError::Fatal)
    }
}

/// The reply's body, at most [`MAX_REPLY_BYTES`].
fn read_reply(r: ureq::Response) -> std::result::Result<String, AttemptError> {
    let mut bytes = Vec::new();
    r.into_reader()
        .take(MAX_REPLY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| AttemptError::Retry(format!("reading the reply: {e}")))?;
    if bytes.len() as u64 > MAX_REPLY_BYTES {
        let msg = format!("the reply is larger than {MAX_REPLY_BYTES} bytes");
        return Err(AttemptError::Fatal(msg));
    }
    String::from_utf8(bytes).map_err(|_| AttemptError::Fatal("the reply is not UTF-8".into()))
}

/// Reads `{"scores": [...], "errors": [...]}` for `n` items.
fn parse_reply(text: &str, n: usize) -> std::result::Result<Vec<Score>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("reply is not JSON: {e}"))?;
    let scores = v
        .get("scores")
        .and_then(Value::as_array)
        .ok_or("reply has no `scores` array")?;
    if scores.len() != n {
        return Err(format!("reply has {} scores for {n} images", scores.len()));
    }
    let errors = match v.get("errors") {
        None | Some(Value::Null) => vec![Value::Null; n],
        Some(Value::Array(e)) if e.len() == n => e.clone(),
        Some(e) => {
            return Err(format!(
                "reply `errors` is not an array of {n} entries: {e}"
            ))
        }
    };
    scores
        .iter()
        .zip(&errors)
        .enumerate()
        .map(|(i, (s, e))| {
            if !e.is_null() {
                let why = e.as_str().map_or_else(|| e.to_string(), str::to_string);
                return Ok(Score::Failed(format!("service error: {why}")));
            }
            match s {
                Value::Null => Ok(Score::Failed("service returned null".into())),
                Value::Number(x) => Ok(Score::Value(x.as_f64().unwrap_or(f64::NAN) as f32)),
                other => Err(format!("score {i} is not a number or null: {other}")),
            }
        })
        .collect()
}

impl Reward for RemoteReward {
    fn name(&self) -> &str {
        "remote"
    }

    fn score(&mut self, batch: &RewardBatch) -> Result<Vec<Score>> {
        let body = Self::request_body(batch)?;
        let n = batch.prompts.len();
        self.attempts = 0;
        let mut last = String::new();
        let start = std::time::Instant::now();
        for k in 0..=self.cfg.retries {
            if k > 0 {
                let wait = self.cfg.backoff_before(k - 1);
                if start.elapsed() + wait >= self.cfg.budget {
                    last = format!(
                        "{last}; no time left in the batch budget of {:?}",
                        self.cfg.budget
                    );
                    break;
                }
                std::thread::sleep(wait);
            }
            self.attempts += 1;
            let left = self.cfg.budget.saturating_sub(start.elapsed());
            match self.attempt(&body, n, self.cfg.timeout.min(left)) {
                Ok(scores) => return Ok(scores),
                Err(AttemptError::Retry(msg)) => last = msg,
                Err(AttemptError::Fatal(msg)) => {
                    last = msg;
                    break;
                }
            }
        }
        let why = format!(
            "remote reward {}: {last} ({} attempt(s))",
            self.cfg.url, self.attempts
        );
        Ok(vec![Score::Failed(why); n])
    }
}

/// Standard base64 (RFC 4648, with `=` padding), as the protocol sends images.
pub fn base64_encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Decodes standard base64, padding optional; `None` on anything else.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine;
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    GeneralPurpose::new(&base64::alphabet::STANDARD, config)
        .decode(text)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_rfc4648() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        let data: Vec<u8> = (0..=255u8).collect();
        assert_eq!(base64_decode(&base64_encode(&data)).unwrap(), data);
        assert!(base64_decode("a!b").is_none());
        // padding is optional on input, as before the crate
        assert_eq!(base64_decode("Zm8").unwrap(), b"fo");
        assert_eq!(base64_decode("Zm8=").unwrap(), b"fo");
    }

    #[test]
    fn replies_are_parsed_item_by_item() {
        let s = parse_reply(
            r#"{"scores": [1.5, null, 2], "errors": [null, null, "nsfw"]}"#,
            3,
        )
        .unwrap();
        assert_eq!(s[0], Score::Value(1.5));
        assert!(matches!(&s[1], Score::Failed(w) if w.contains("null")));
        assert!(matches!(&s[2], Score::Failed(w) if w.contains("nsfw")));
        assert!(parse_reply(r#"{"scores": [1]}"#, 2)
            .unwrap_err()
            .contains("1 scores for 2"));
        assert!(parse_reply("oops", 1).is_err());
        assert!(parse_reply(r#"{"scores": ["x"]}"#, 1).is_err());
    }
}
