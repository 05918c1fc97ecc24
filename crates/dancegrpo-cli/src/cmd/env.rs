//! `dancegrpo env`: what libtorch this binary runs on.

use std::process::ExitCode;

/// Arguments of `dancegrpo env`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Prints the libtorch version, CUDA and cuDNN availability and the CUDA device count.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let info = serde_json::json!({
        "dancegrpo": env!("CARGO_PKG_VERSION"),
        "libtorch": loaded_torch_version(),
        "libtorch_dir": torch_lib_dir().map(|d| d.display().to_string()),
        "libtorch_cuda_loaded": loaded_libs().iter().any(|l| l.ends_with("libtorch_cuda.so")),
        "cuda_feature": cfg!(feature = "cuda"),
        "cuda_available": tch::Cuda::is_available(),
        "cudnn_available": tch::Cuda::cudnn_is_available(),
        "cuda_device_count": tch::Cuda::device_count(),
        "cpu_threads": tch::get_num_threads(),
    });
    if args.json {
        println!("{info}");
    } else {
        for (k, v) in info.as_object().expect("object") {
            println!("{k:<18} {v}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Shared objects mapped into this process (from `/proc/self/maps`).
fn loaded_libs() -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut libs: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.contains(".so"))
        .map(String::from)
        .collect();
    libs.dedup();
    libs
}

/// The directory of the libtorch actually loaded.
fn torch_lib_dir() -> Option<std::path::PathBuf> {
    let lib = loaded_libs()
        .into_iter()
        .find(|l| l.ends_with("libtorch_cpu.so"))?;
    std::path::Path::new(&lib).parent().map(|p| p.to_path_buf())
}

/// The version of the loaded libtorch, read from the `torch/version.py` beside it.
fn loaded_torch_version() -> Option<String> {
    let dir = torch_lib_dir()?;
    let text = std::fs::read_to_string(dir.parent()?.join("version.py")).ok()?;
    let line = text.lines().find(|l| l.starts_with("__version__"))?;
    Some(line.split(['\'', '"']).nth(1)?.to_string())
}
