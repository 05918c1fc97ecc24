//! `dancegrpo bench matmul`: the matmul rate a device reaches on large square
//! matrices, the peak a model-FLOPs utilisation is reported against.

use std::process::ExitCode;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

/// Arguments of `dancegrpo bench matmul`.
#[derive(clap::Args)]
pub struct Args {
    /// Side of the square matrices.
    #[arg(long, default_value_t = 8192)]
    size: i64,
    /// `bf16` or `fp32`.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Timed products (after two warm-up ones).
    #[arg(long, default_value_t = 20)]
    repeats: u32,
    /// Device: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch CPU threads.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
}

/// Runs the products and prints TFLOP/s (a line and one JSON line).
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let device = super::train::parse_device(&args.device)?;
    let kind = match args.dtype.as_str() {
        "bf16" => Kind::BFloat16,
        "fp32" => Kind::Float,
        other => anyhow::bail!("--dtype: `{other}` is not bf16 or fp32"),
    };
    if args.size < 1 || args.repeats < 1 {
        anyhow::bail!("--size and --repeats must be >= 1");
    }
    let n = args.size;
    let a = Tensor::randn([n, n], (kind, device));
    let b = Tensor::randn([n, n], (kind, device));
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    for _ in 0..2 {
        let _ = a.matmul(&b);
    }
    sync();
    let start = Instant::now();
    for _ in 0..args.repeats {
        let _ = a.matmul(&b);
    }
    sync();
    let seconds = start.elapsed().as_secs_f64();
    let tflops = 2.0 * (n as f64).powi(3) * args.repeats as f64 / seconds / 1e12;
    println!(
        "bench matmul {n}x{n} {} on {}: {tflops:.2} TFLOP/s",
        args.dtype, args.device
    );
    let json = serde_json::json!({
        "size": n, "dtype": args.dtype, "device": args.device,
        "repeats": args.repeats, "seconds": seconds, "tflops": tflops,
    });
    println!("{json}");
    Ok(ExitCode::SUCCESS)
}
