//! Throughput and peak memory of the T5 encoder on random weights.
//!
//! ```text
//! cargo run --release --example encode_bench -- [tiny|large|xxl] [f32|bf16] [prompts] [seq] [batch] [threads]
//! ```
//!
//! Encodes `prompts` random prompts of `seq` tokens in batches of `batch` and prints
//! prompts/s and the process's peak resident memory (`VmHWM`). Run one
//! configuration per process: the peak is a high-water mark. On a loaded machine
//! keep `threads` at or below the free cores: oversubscribed intra-op threads make
//! tiny models two orders of magnitude slower.

use std::time::Instant;

use dancegrpo::models::t5::{T5Config, T5Encoder};
use dancegrpo::weights::Source;
use tch::{Device, Kind, Tensor};

fn vm_hwm_mib() -> f64 {
    dancegrpo::process::peak_rss_mib().unwrap_or(f64::NAN)
}

fn main() -> dancegrpo::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let config = match arg(0, "tiny").as_str() {
        "tiny" => T5Config::tiny(),
        "large" => T5Config::t5_v1_1_large(),
        "xxl" => T5Config::t5_v1_1_xxl(),
        other => panic!("unknown config `{other}` (tiny, large, xxl)"),
    };
    let kind = match arg(1, "f32").as_str() {
        "f32" => Kind::Float,
        "bf16" => Kind::BFloat16,
        other => panic!("unknown dtype `{other}` (f32, bf16)"),
    };
    let parse = |i: usize, d: &str| arg(i, d).parse::<i64>().expect("an integer");
    let (prompts, seq, batch, threads) = (
        parse(2, "64"),
        parse(3, "512"),
        parse(4, "8"),
        parse(5, "2"),
    );
    tch::set_num_threads(threads as i32);
    let device = if tch::Cuda::is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let t0 = Instant::now();
    let model = T5Encoder::new(config.clone(), Source::Seeded(0), kind, device)?;
    let build_s = t0.elapsed().as_secs_f64();
    let rss_after_build = vm_hwm_mib();
    tch::manual_seed(0);
    let ids = Tensor::randint(
        config.vocab_size,
        [prompts, seq],
        (Kind::Int64, Device::Cpu),
    );
    let _guard = tch::no_grad_guard();
    // one warm-up batch
    let _ = model.forward(&ids.narrow(0, 0, batch.min(prompts)), None)?;
    let t1 = Instant::now();
    let mut start = 0;
    while start < prompts {
        let n = batch.min(prompts - start);
        let y = model.forward(&ids.narrow(0, start, n), None)?;
        let _ = y.to_device(Device::Cpu);
        start += n;
    }
    let secs = t1.elapsed().as_secs_f64();
    println!(
        "t5 d_model {} d_ff {} layers {} heads {} d_kv {} | {:?} on {:?}, {} threads | {} prompts x {} tokens, batch {} | {:.2} prompts/s ({:.2} s) | params {:.1} M, build {:.1} s | peak RSS {:.0} MiB (after build {:.0} MiB)",
        config.d_model,
        config.d_ff,
        config.num_layers,
        config.num_heads,
        config.d_kv,
        kind,
        device,
        threads,
        prompts,
        seq,
        batch,
        prompts as f64 / secs,
        secs,
        model.parameters().iter().map(|(_, t)| t.numel()).sum::<usize>() as f64 / 1e6,
        build_s,
        vm_hwm_mib(),
        rss_after_build,
    );
    Ok(())
}
