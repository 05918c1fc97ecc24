//! `dancegrpo serve`: a generation server over HTTP with a JSON API.
//!
//! - `POST /generate` with `{"prompt": ..., "seed": 0, "height": 64, "width":
//!   64, "steps": 8, "guidance": 3.5}` (all but the prompt optional) answers
//!   the image as `image/png`; a refused request answers 400 with
//!   `{"error": ...}` naming the field, a full queue 503.
//! - `GET /health` answers `{"status": "ok", ...}` with the queue and counters.
//!
//! HTTP threads ([`tiny_http`]) check each request and hand it to a bounded
//! queue; the model runs on the thread that called [`serve`] (libtorch models
//! stay on one thread), taking up to `max_batch` queued requests that share
//! a shape, step count and guidance into one ODE sampling. Prompt embeddings
//! are cached ([`embed::EmbeddingCache`]).

pub mod embed;
pub mod request;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use tch::Tensor;
use tiny_http::{Header, Method, Response, Server};

use crate::error::{Error, Result};
use crate::io::image::encode_png;
use crate::models::{LatentDecoder, PolicyModel};
use crate::rng::Philox;
use crate::sampler::generate::{generate, OdeSettings};
use crate::sampler::CachePolicy;
use embed::EmbeddingCache;
use request::{GenRequest, Limits};

/// How a server runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on (`127.0.0.1:0`: any free port on loopback).
    pub addr: String,
    /// Most requests sampled together.
    pub max_batch: usize,
    /// Most requests waiting; one more is answered 503.
    pub queue: usize,
    /// Threads reading and answering HTTP requests.
    pub http_threads: usize,
    /// Request limits and defaults.
    pub limits: Limits,
    /// The schedule's shift.
    pub shift: f64,
    /// Feature caching of the sampling, if any.
    pub cache: Option<CachePolicy>,
}

/// The server's counters (shared with the HTTP threads for `/health`).
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests waiting in the queue.
    pub queued: AtomicU64,
    /// Images answered.
    pub served: AtomicU64,
    /// Model batches run.
    pub batches: AtomicU64,
    /// Requests answered 503 (queue full).
    pub rejected: AtomicU64,
    /// Requests answered 400.
    pub refused: AtomicU64,
}

/// The answer to one request: a PNG, or a status and a message.
type Reply = std::result::Result<Vec<u8>, (u16, String)>;

/// A queued request and where its answer goes.
struct Job {
    req: GenRequest,
    reply: mpsc::Sender<Reply>,
}

/// What the model thread samples with.
pub struct Engine<'a> {
    /// The transformer.
    pub model: &'a dyn PolicyModel,
    /// The VAE.
    pub vae: &'a dyn LatentDecoder,
    /// The prompt embeddings.
    pub prompts: EmbeddingCache,
    /// Where the model runs.
    pub device: tch::Device,
}

/// Listens on `cfg.addr`, calls `ready` with the bound address, and serves
/// until the listener fails (runs the model on this thread).
pub fn serve(cfg: &ServeConfig, mut engine: Engine, ready: &dyn Fn(SocketAddr)) -> Result<()> {
    let server = Server::http(&cfg.addr)
        .map_err(|e| Error::Input(format!("cannot listen on {}: {e}", cfg.addr)))?;
    let addr = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| Error::Input(format!("{} is not an IP address", cfg.addr)))?;
    let server = Arc::new(server);
    let counters = Arc::new(Counters::default());
    let (tx, rx) = mpsc::sync_channel::<Job>(cfg.queue.max(1));
    for _ in 0..cfg.http_threads.max(1) {
        let (server, tx, counters) = (server.clone(), tx.clone(), counters.clone());
        let cfg = cfg.clone();
        std::thread::spawn(move || http_loop(&server, &tx, &counters, &cfg));
    }
    drop(tx);
    ready(addr);
    model_loop(cfg, &mut engine, &rx, &counters);
    Ok(())
}

/// Answers HTTP requests until the server is closed.
fn http_loop(server: &Server, jobs: &SyncSender<Job>, counters: &Counters, cfg: &ServeConfig) {
    while let Ok(mut rq) = server.recv() {
        let (status, body, png) = answer(&mut rq, jobs, counters, cfg);
        let kind = if png { "image/png" } else { "application/json" };
        let header = Header::from_bytes("Content-Type", kind).expect("a valid header");
        // a known length, never chunked: the simplest clients can read it
        let response = (Response::from_data(body).with_status_code(status))
            .with_header(header)
            .with_chunked_threshold(usize::MAX);
        let _ = rq.respond(response); // a client that went away is not an error
    }
}

/// `(status, body, whether the body is a PNG)` of one answer.
type Answer = (u16, Vec<u8>, bool);

/// A JSON error answer `{"error": msg}`.
fn error(status: u16, msg: &str) -> Answer {
    let body = serde_json::json!({ "error": msg }).to_string().into_bytes();
    (status, body, false)
}

/// The answer to one HTTP request.
fn answer(
    rq: &mut tiny_http::Request,
    jobs: &SyncSender<Job>,
    counters: &Counters,
    cfg: &ServeConfig,
) -> Answer {
    match (rq.method(), rq.url()) {
        (Method::Get, "/health") => {
            let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
            let body = serde_json::json!({
                "status": "ok", "queued": n(&counters.queued), "queue": cfg.queue,
                "max_batch": cfg.max_batch, "served": n(&counters.served),
                "batches": n(&counters.batches), "rejected": n(&counters.rejected),
                "refused": n(&counters.refused),
            });
            (200, body.to_string().into_bytes(), false)
        }
        (Method::Post, "/generate") => queue_generation(rq, jobs, counters, cfg),
        (_, "/health" | "/generate") => {
            error(405, "method not allowed: GET /health, POST /generate")
        }
        (_, url) => error(
            404,
            &format!("no such endpoint {url}: GET /health, POST /generate"),
        ),
    }
}

/// `POST /generate`: the request parsed, queued for the model thread and its
/// PNG awaited (400 on a bad request, 503 when the queue is full).
fn queue_generation(
    rq: &mut tiny_http::Request,
    jobs: &SyncSender<Job>,
    counters: &Counters,
    cfg: &ServeConfig,
) -> Answer {
    let mut body = Vec::new();
    let limit = 64 * 1024;
    let read = rq.as_reader().take(limit + 1).read_to_end(&mut body);
    if read.is_err() || body.len() as u64 > limit {
        counters.refused.fetch_add(1, Ordering::Relaxed);
        return error(400, "the request body must be JSON of at most 64 KiB");
    }
    let req = match request::parse(&body, &cfg.limits) {
        Ok(r) => r,
        Err(msg) => {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            return error(400, &msg);
        }
    };
    let (reply, answer) = mpsc::channel();
    counters.queued.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = jobs.try_send(Job { req, reply }) {
        counters.queued.fetch_sub(1, Ordering::Relaxed);
        if let TrySendError::Full(_) = e {
            counters.rejected.fetch_add(1, Ordering::Relaxed);
            let msg = format!(
                "the queue is full ({} requests waiting): try again later",
                cfg.queue
            );
            return error(503, &msg);
        }
        return error(500, "the model thread has stopped");
    }
    match answer.recv_timeout(Duration::from_secs(3600)) {
        Ok(Ok(png)) => (200, png, true),
        Ok(Err((status, msg))) => error(status, &msg),
        Err(_) => error(500, "no answer from the model thread"),
    }
}

/// Takes queued requests in batches and answers them, until every HTTP thread is gone.
fn model_loop(cfg: &ServeConfig, engine: &mut Engine, jobs: &Receiver<Job>, counters: &Counters) {
    let mut waiting: Vec<Job> = Vec::new();
    loop {
        let first = match waiting.is_empty() {
            true => match jobs.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
            false => waiting.remove(0),
        };
        counters.queued.fetch_sub(1, Ordering::Relaxed);
        let mut batch = vec![first];
        // the earlier waiting requests first, then whatever has arrived since
        let mut i = 0;
        while i < waiting.len() && batch.len() < cfg.max_batch {
            match waiting[i].req.batches_with(&batch[0].req) {
                true => {
                    counters.queued.fetch_sub(1, Ordering::Relaxed);
                    batch.push(waiting.remove(i))
                }
                false => i += 1,
            }
        }
        while batch.len() < cfg.max_batch {
            let Ok(j) = jobs.try_recv() else { break };
            match j.req.batches_with(&batch[0].req) {
                true => {
                    counters.queued.fetch_sub(1, Ordering::Relaxed);
                    batch.push(j)
                }
                false => waiting.push(j), // still counted as queued
            }
        }
        let reqs: Vec<GenRequest> = batch.iter().map(|j| j.req.clone()).collect();
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_batch(cfg, engine, &reqs)
        }));
        let results = match run {
            Ok(Ok(pngs)) => pngs.into_iter().map(Ok).collect(),
            Ok(Err(e)) => vec![Err((500, e.to_string())); batch.len()],
            Err(_) => vec![Err((500, "the sampling failed".to_string())); batch.len()],
        };
        counters.batches.fetch_add(1, Ordering::Relaxed);
        for (job, result) in batch.into_iter().zip(results) {
            if result.is_ok() {
                counters.served.fetch_add(1, Ordering::Relaxed);
            }
            let _ = job.reply.send(result);
        }
    }
}

/// One ODE sampling of `reqs` (sharing shape, steps and guidance): one PNG each.
fn run_batch(cfg: &ServeConfig, engine: &mut Engine, reqs: &[GenRequest]) -> Result<Vec<Vec<u8>>> {
    let r0 = &reqs[0];
    let [c, h, w] = engine.vae.latent_shape(r0.height, r0.width);
    let (mut texts, mut pooled, mut noise) = (Vec::new(), Vec::new(), Vec::new());
    for r in reqs {
        let (t, p) = engine.prompts.embed(&r.prompt)?;
        texts.push(t);
        pooled.push(p);
        noise.push(Philox::for_stream(r.seed, "serve/noise").normal_tensor(&[1, c, h, w]));
    }
    let device = engine.device;
    let on = |t: Tensor| t.to_device(device);
    let settings = OdeSettings {
        steps: r0.steps,
        shift: cfg.shift,
        guidance: engine.model.guidance_embeds().then_some(r0.guidance),
        cache: cfg.cache.clone(),
    };
    let images = generate(
        engine.model,
        engine.vae,
        &on(Tensor::stack(&texts, 0)),
        &on(Tensor::stack(&pooled, 0)),
        &on(Tensor::cat(&noise, 0)),
        &settings,
    )?; // (n, H, W, 3)
    (0..reqs.len() as i64)
        .map(|i| encode_png(&images.get(i)))
        .collect()
}
