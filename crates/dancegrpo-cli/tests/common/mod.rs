//! Helpers shared by the CLI test binaries.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use dancegrpo::io::torch_pt::write_torch_pt_view;
use tch::{Kind, Tensor};

/// A reference-format directory as DanceGRPO's `preprocess_flux_embedding.py`
/// writes it with batch 2: each `.pt` is `torch.save(batch[i])`, a view into the
/// batch's storage (bf16), `text_ids[i]` a row of the `[Lt, 3]` zeros.
pub fn write_reference(
    dir: &Path,
    n: usize,
    lt: i64,
    d: i64,
    p: i64,
) -> (Tensor, Tensor, Vec<String>) {
    for sub in ["prompt_embed", "pooled_prompt_embeds", "text_ids"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let n64 = n as i64;
    let embeds = (Tensor::arange(n64 * lt * d, (Kind::Float, tch::Device::Cpu)) * 0.37)
        .sin()
        .to_kind(Kind::BFloat16)
        .view([n64, lt, d]);
    let pooled = (Tensor::arange(n64 * p, (Kind::Float, tch::Device::Cpu)) * 1.3)
        .cos()
        .to_kind(Kind::BFloat16)
        .view([n64, p]);
    let text_ids = Tensor::zeros([lt, 3], (Kind::Float, tch::Device::Cpu));
    let mut items = Vec::new();
    let mut captions = Vec::new();
    for i in 0..n64 {
        let (b, j) = (i / 2, i % 2); // batch b, row j
        let rows = 2.min(n64 - 2 * b);
        let batch_e = embeds.narrow(0, 2 * b, rows).flatten(0, -1);
        let batch_p = pooled.narrow(0, 2 * b, rows).flatten(0, -1);
        let name = format!("{i}.pt");
        write_torch_pt_view(
            &dir.join("prompt_embed").join(&name),
            &batch_e,
            j * lt * d,
            &[lt, d],
            &[d, 1],
        )
        .unwrap();
        write_torch_pt_view(
            &dir.join("pooled_prompt_embeds").join(&name),
            &batch_p,
            j * p,
            &[p],
            &[1],
        )
        .unwrap();
        write_torch_pt_view(
            &dir.join("text_ids").join(&name),
            &text_ids.flatten(0, -1),
            j * 3,
            &[3],
            &[1],
        )
        .unwrap();
        let caption = format!("caption {i} ✓");
        items.push(serde_json::json!({
            "prompt_embed_path": name, "text_ids": name, "pooled_prompt_embeds_path": name, "caption": caption,
        }));
        captions.push(caption);
    }
    std::fs::write(
        dir.join("videos2caption.json"),
        serde_json::to_string_pretty(&items).unwrap(),
    )
    .unwrap();
    (embeds, pooled, captions)
}

/// Fails the test, showing the command's stderr, unless it succeeded.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The public fixture case `flux_tiny_a` (`DANCEGRPO_FIXTURES`, or the
/// workspace's `../shared/fixtures`).
pub fn case_dir() -> PathBuf {
    let root = std::env::var_os("DANCEGRPO_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
        });
    let case = root.join("public/flux_tiny_a");
    assert!(
        case.join("case.json").is_file(),
        "fixture case missing at {}",
        case.display()
    );
    case
}

/// The `dancegrpo` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dancegrpo"))
}

/// A fresh temporary directory `dancegrpo-<group>-<name>-<pid>`.
pub fn temp_dir(group: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dancegrpo-{group}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A TCP port free right now on 127.0.0.1.
pub fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}

/// `world` processes of `dancegrpo train --out OUT ARGS...` with the variables
/// torchrun sets, all awaited.
pub fn train_world(world: usize, out: &Path, args: &[&str]) -> Vec<Output> {
    launch(world, out, args, true)
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

/// [`train_world`], the processes left running (their output discarded: a
/// full pipe nobody reads would stall them).
pub fn spawn_train_world(world: usize, out: &Path, args: &[&str]) -> Vec<Child> {
    launch(world, out, args, false)
}

fn launch(world: usize, out: &Path, args: &[&str], piped: bool) -> Vec<Child> {
    let out = out.to_str().unwrap();
    let train = [&["train", "--out", out, "--dist-timeout", "60"][..], args].concat();
    launch_command(world, &train, piped)
}

/// `world` processes of `dancegrpo ARGS...` with the variables torchrun sets,
/// all awaited.
pub fn run_world(world: usize, args: &[&str]) -> Vec<Output> {
    launch_command(world, args, true)
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

fn launch_command(world: usize, args: &[&str], piped: bool) -> Vec<Child> {
    let port = free_port();
    let io = || if piped { Stdio::piped() } else { Stdio::null() };
    (0..world)
        .map(|rank| {
            bin()
                .args(args)
                .env("WORLD_SIZE", world.to_string())
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(io())
                .stderr(io())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// The run's `metrics.jsonl` without its wall-clock fields.
pub fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("seconds");
            o.remove("images_per_second");
            v
        })
        .collect()
}

/// Copies directory `from` into `to` recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// A tiny FLUX model directory (transformer and VAE, seeded) at `dir`.
pub fn tiny_model_dir(dir: &Path) -> PathBuf {
    use dancegrpo::models::flux::{FluxConfig, FluxTransformer};
    use dancegrpo::models::vae::{Vae, VaeConfig};
    use dancegrpo::weights::Source;
    let cpu = tch::Device::Cpu;
    let flux = FluxTransformer::new(FluxConfig::tiny(), Source::Seeded(0), Kind::Float, cpu);
    flux.unwrap().save_dir(&dir.join("transformer")).unwrap();
    let vae = Vae::new(VaeConfig::tiny(), Source::Seeded(1), Kind::Float, cpu);
    vae.unwrap().save_dir(&dir.join("vae")).unwrap();
    dir.to_path_buf()
}

/// Puts a NaN into the first element of tensor `name` of the safetensors
/// file `path` (its metadata kept).
pub fn poison_tensor(path: &Path, name: &str) {
    use dancegrpo::io::safetensors::{write_safetensors, SafetensorsFile};
    let file = SafetensorsFile::open(path).unwrap();
    let tensors: Vec<(String, Tensor)> = file
        .names()
        .map(|n| (n.to_string(), file.tensor(n).unwrap()))
        .collect();
    let meta = file.metadata().clone();
    drop(file);
    let t = &tensors.iter().find(|(n, _)| n == name).unwrap().1;
    let _ = t.view([-1]).get(0).fill_(f64::NAN);
    write_safetensors(path, &tensors, &meta).unwrap();
}
