//! The bad-input matrix, driven through the real binary: every subcommand
//! with bad arguments, configurations, weights, pickles, prompt files and
//! datasets. Each case must exit 2 (the input was refused) or 1 (a run went
//! wrong), name what was wrong, and never panic. The table of cases, with the
//! ones tested elsewhere (reward servers, kills, NaN training), is
//! `docs/hostile-inputs.md`.

mod common;

use std::io::Write;
use std::path::Path;

use common::{bin, poison_tensor, temp_dir, tiny_model_dir as model_dir};
use dancegrpo::models::open_clip::OpenClipConfig;
use tch::{Device, Kind, Tensor};

/// One case: the arguments (`{D}` is replaced by the prepared directory),
/// the exit code and what the message must contain.
struct Case {
    args: &'static str,
    code: i32,
    needles: &'static [&'static str],
}

const fn case(args: &'static str, code: i32, needles: &'static [&'static str]) -> Case {
    Case {
        args,
        code,
        needles,
    }
}

/// Command lines and what they must say (paths under `{D}` are prepared by [`prepare`]).
const CASES: &[Case] = &[
    // arguments the parser refuses
    case("align {D}/nothing --threads 0", 2, &["--threads", "0 is not in 1.."]),
    case("train --threads 0", 2, &["--threads"]),
    case("score {D}/bad.png --reward jpeg --prompt x --threads 0", 2, &["--threads"]),
    case("preprocess --from-reference {D}/empty --out {D}/o --threads 0", 2, &["--threads"]),
    case("generate --run {D}/empty --images 0", 2, &["--images"]),
    case("generate --run {D}/empty --steps 0", 2, &["--steps"]),
    case("bench train {D}/empty --iterations 0", 2, &["--iterations"]),
    case("bench generate tiny --size 24", 2, &["--size", "multiple of 16"]),
    case("bench generate random:{D}/no_vae", 2, &["no_vae", "vae/config.json"]),
    case("train --dist-timeout 0", 2, &["--dist-timeout"]),
    case("plan --world 0", 2, &["--world"]),
    case("plan --text-len 0", 2, &["--text-len"]),
    case("demo --min-rise nan", 2, &["--min-rise", "finite"]),
    case("pretrain --lr nan --out {D}/p", 2, &["learning_rate", "NaN"]),
    case("train --bogus", 2, &["--bogus"]),
    // devices
    case("train --device cuda:0 --out {D}/cuda", 2, &["cuda:0", "without CUDA"]),
    case("generate --run {D}/empty --device cuda:0", 2, &["cuda:0"]),
    case("score {D}/bad.png --reward jpeg --prompt x --device cuda:7", 2, &["cuda:7"]),
    case("align {D}/nothing --device tpu", 2, &["unknown device `tpu`"]),
    case("bench matmul --device cuda:0", 2, &["cuda:0"]),
    // configurations
    case("train --config {D}/syntax.toml --out {D}/r", 2, &["syntax.toml: invalid TOML", "line"]),
    case("train --config {D}/unknown.toml --out {D}/r", 2, &["unknown field `heigth`"]),
    case("train --config {D}/binary.txt --out {D}/r", 2, &["binary.txt", "UTF-8"]),
    case("train --config {D}/empty --out {D}/r", 2, &["empty"]),
    case("train --set optim.learning_rate=inf --out {D}/r", 2, &["optim.learning_rate", "(0, 1]"]),
    case("train --set optim.learning_rate=1e30 --out {D}/r", 2, &["optim.learning_rate"]),
    case("train --set sampler.guidance=nan --out {D}/r", 2, &["sampler.guidance", "finite"]),
    case("train --set sampler.eta=-1 --out {D}/r", 2, &["sampler.eta"]),
    case("train --set sampler.eta=0 --out {D}/r", 2, &["sampler.eta", "nothing to train"]),
    case("train --set sampler.sde=\"ode\" --out {D}/r", 2, &["sampler.sde", "nothing to train"]),
    case("train --set sampler.sde=\"sde\" --out {D}/r", 2, &["sampler.sde", "flow_grpo"]),
    case("train --set sampler.window={size=9} --out {D}/r", 2, &["sampler.window.size", "1..=7"]),
    case("train --set sampler.window={size=4,start=5} --out {D}/r", 2, &["sampler.window.start", "0..=3"]),
    case("train --set sampler.window={size=4,train=\"fraction\"} --set grpo.timestep_fraction=0.2 --out {D}/r", 2, &["grpo.timestep_fraction", "int(4"]),
    case("train --set sampler.window={size=4,post={solver=\"dpm_solver_2m\",compress=0.0}} --out {D}/r", 2, &["sampler.window.post.compress", "(0, 1]"]),
    case("train --set sampler.window={size=4,post={solver=\"unipc\"}} --out {D}/r", 2, &["sampler.window", "unipc", "dpm_solver_2m"]),
    case("train --set sampler.window={size=4,post={solver=\"dpm_solver_2m\"}} --set sampler.tree={branches=2,at=[1,3,5]} --out {D}/r", 2, &["sampler.window.post", "tree"]),
    case("train --set sampler.tree={branches=3,at=[2]} --out {D}/r", 2, &["sampler.tree.branches", "multiple of 3^1"]),
    case("train --set sampler.tree={branches=2,at=[4,2]} --out {D}/r", 2, &["sampler.tree.at", "increasing"]),
    case("train --set sampler.tree={branches=2,at=[9]} --out {D}/r", 2, &["sampler.tree.at", "outside the steps 0..8"]),
    case("train --set sampler.tree={branch=2,at=[1]} --out {D}/r", 2, &["unknown field `branch`"]),
    case("train --set sampler.tree={branches=2,at=[1,3]} --set sampler.rollout_batch=2 --out {D}/r", 2, &["sampler.rollout_batch", "4 leaves per root"]),
    case("train --set sampler.tree={branches=2,at=[1,3,5]} --set optim.gradient_accumulation=4 --out {D}/r", 2, &["optim.gradient_accumulation", "8 leaves per root"]),
    case("train --set sampler.tree={branches=2,at=[1]} --set optim.update_batching=\"window\" --out {D}/r", 2, &["optim.update_batching", "\"rollout\""]),
    case("train --set sampler.cache={kind=\"steps\",threshold=0.1} --out {D}/r", 2, &["sampler.cache", "log-probabilities", "eval.cache"]),
    case("train --set eval.cache={kind=\"blocks\",step_start=2,step_interval=1,step_end=6,block_start=0,block_end=1} --out {D}/r", 2, &["eval.cache.step_interval", ">= 2"]),
    case("train --set eval.parallel=\"sequence\" --set eval.cache={kind=\"blocks\",step_start=2,step_interval=2,step_end=6,block_start=0,block_end=1} --out {D}/r", 2, &["eval.parallel", "block cache", "steps"]),
    case("train --set eval.parallel=\"prompts\" --set eval.cache={kind=\"steps\",threshold=0.1} --out {D}/r", 2, &["eval.parallel", "whole-step cache", "shares"]),
    case("train --set eval.parallel=\"heads\" --out {D}/r", 2, &["eval.parallel", "writer", "sequence"]),
    case("train --set grpo.kl_beta=0.04 --out {D}/r", 2, &["grpo.kl_beta", "reference policy", "[optim.lora]"]),
    case("train --set grpo.kl_beta=-1 --out {D}/r", 2, &["grpo.kl_beta", ">= 0"]),
    case("train --set grpo.guard=\"strict\" --out {D}/r", 2, &["grpo.guard", "ratio_norm"]),
    case("train --set sampler.height=100000 --out {D}/r", 2, &["sampler.height", "at most"]),
    case("train --set sampler.steps=1000000000 --out {D}/r", 2, &["sampler.steps"]),
    case("train --set run.prompts_per_iteration=100000000 --set sampler.group_size=100000 --out {D}/r", 2, &["samples per iteration"]),
    case("train --set data.prompts=1000000000000 --out {D}/r", 2, &["data.prompts"]),
    case("train --set optim.first_window=\"rollout_graphs\" --set optim.activation_checkpointing=\"per_block\" --out {D}/r", 2, &["optim.first_window", "activation_checkpointing = \"off\""]),
    case("train --set optim.first_window=\"rollout_graphs\" --set optim.activation_checkpointing=\"off\" --set parallel.sharding=\"optimizer\" --out {D}/r", 2, &["optim.first_window", "parallel.sharding"]),
    case("train --set optim.first_window=\"rollout_graphs\" --set optim.activation_checkpointing=\"off\" --set sampler.tree={branches=2,at=[1]} --out {D}/r", 2, &["optim.first_window", "tree"]),
    case("train --set optim.first_window=\"keep\" --out {D}/r", 2, &["first_window", "rollout_graphs"]),
    case("train --set optim.lora={rank=0,alpha=1.0} --out {D}/r", 2, &["optim.lora.rank"]),
    case("train --set optim.ema={decay=1.5} --out {D}/r", 2, &["optim.ema.decay"]),
    case("train --set rewards=[{kind=\"remote\",url=\"http://127.0.0.1:9/x\",retries=1000000}] --out {D}/r", 2, &["rewards[0].retries", "at most 10"]),
    case("train --set rewards=[{kind=\"remote\",url=\"ftp://x/y\"}] --out {D}/r", 2, &["rewards[0].url", "scheme `ftp`"]),
    case("train --set rewards=[{kind=\"remote\",url=\"http://10.0.0.1/y\"}] --out {D}/r", 2, &["rewards[0].url", "allow_plain_http"]),
    case("train --set model={kind=\"dir\",path=\"{D}/nothing\"} --dry-run", 2, &["model.path", "no such directory"]),
    case("train --set model={kind=\"dir\",path=\"{D}/empty\"} --dry-run", 2, &["model.path", "transformer/config.json is missing"]),
    case("train --set data={kind=\"dataset\",path=\"{D}/empty\"} --out {D}/r", 2, &["data.path", "dataset.json is missing"]),
    case("train --set sampler.height=16384 --set sampler.width=16384 --out {D}/r", 2, &["sampler.height, sampler.width", "would need about"]),
    case("plan --gpu-memory lots", 2, &["memory size `lots`"]),
    // run directories
    case("train --resume --out {D}/nothing", 2, &["no such run directory"]),
    case("train --resume --out {D}/empty", 2, &["has no config.toml", "--config"]),
    case("train --out {D}/file/run", 2, &["file"]),
    case("generate --run {D}/nothing", 2, &["config.toml"]),
    case("export --checkpoint {D}/empty --out {D}/x", 2, &["not a training checkpoint"]),
    // weights
    case("train --set model={kind=\"dir\",path=\"{D}/truncated\"} --out {D}/r", 2, &["diffusion_pytorch_model.safetensors"]),
    case("train --set model={kind=\"dir\",path=\"{D}/typo_config\"} --out {D}/r", 2, &["config.json", "field `num_layers`: invalid type"]),
    case("train --set model={kind=\"dir\",path=\"{D}/escape\"} --out {D}/r", 2, &["shard `../outside.safetensors`, not a file name inside"]),
    case("train --set model={kind=\"dir\",path=\"{D}/nan\"} --out {D}/r", 1, &["`context_embedder.weight` holds non-finite values"]),
    // pickles: interpreted, never executed
    case("score {D}/good.png --reward hpsv2:{D}/evil_hps --prompt x", 2, &["HPS_v2.1_compressed.pt", "os.system"]),
    // images and prompt files
    case("score {D}/bad.png --reward jpeg --prompt x", 2, &["bad.png", "not a PNG or JPEG"]),
    case("score {D}/nothing.png --reward jpeg --prompt x", 2, &["nothing.png"]),
    case("score {D}/bad.png --reward bogus --prompt x", 2, &["unknown reward `bogus`"]),
    case("score {D}/bad.png --reward jpeg --prompts {D}/binary.txt", 2, &["binary.txt", "UTF-8"]),
    case("preprocess --model {D}/empty --prompts {D}/binary.txt --out {D}/o", 2, &["binary.txt", "not valid UTF-8"]),
    case("preprocess --from-reference {D}/empty --out {D}/o", 2, &["videos2caption.json"]),
    case("align {D}/empty", 2, &["case.json"]),
    case("bench train {D}/nothing", 2, &["no such case directory"]),
];

#[test]
fn every_bad_input_is_refused_by_name_without_a_panic() {
    let dir = temp_dir("hostile", "matrix");
    prepare(&dir);
    let d = dir.to_str().unwrap();
    let mut failures = Vec::new();
    for c in CASES {
        let args: Vec<String> = split(c.args).iter().map(|a| a.replace("{D}", d)).collect();
        let out = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let code = out.status.code();
        let missing: Vec<_> = c.needles.iter().filter(|n| !err.contains(*n)).collect();
        if code != Some(c.code) || !missing.is_empty() || err.contains("panicked") {
            failures.push(format!(
                "{}: exit {code:?} (want {}), missing {missing:?}:\n{err}",
                c.args, c.code
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(!dir.join("pwned").exists(), "pickled code was executed");
    assert!(!dir.join("nothing").exists() && !dir.join("r").join("checkpoints").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Splits on spaces, except inside `{...}` and `[...]` (TOML values).
fn split(args: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0);
    for ch in args.chars() {
        match ch {
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            ' ' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    out.push(cur);
    out
}

/// Writes the inputs the cases name.
fn prepare(d: &Path) {
    std::fs::create_dir_all(d.join("empty")).unwrap();
    std::fs::write(d.join("file"), "x").unwrap();
    std::fs::write(d.join("bad.png"), "not an image").unwrap();
    let image = Tensor::zeros([8, 8, 3], (Kind::Uint8, Device::Cpu));
    dancegrpo::io::image::write_png(&d.join("good.png"), &image).unwrap();
    std::fs::write(d.join("binary.txt"), b"\xff\xfe\x00bad\n").unwrap();
    std::fs::write(d.join("syntax.toml"), "[sampler\nheight = 64\n").unwrap();
    std::fs::write(d.join("unknown.toml"), "[sampler]\nheigth = 64\n").unwrap();
    let weights = |m: &Path| m.join("transformer/diffusion_pytorch_model.safetensors");
    let truncated = model_dir(&d.join("truncated"));
    let bytes = std::fs::read(weights(&truncated)).unwrap();
    std::fs::write(weights(&truncated), &bytes[..bytes.len() / 2]).unwrap();
    let typo = model_dir(&d.join("typo_config"));
    let cfg = typo.join("transformer/config.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    json["num_layers"] = "one".into();
    std::fs::write(&cfg, json.to_string()).unwrap();
    let escape = model_dir(&d.join("escape"));
    let index = serde_json::json!({"weight_map": {"x_embedder.weight": "../outside.safetensors"}});
    std::fs::remove_file(weights(&escape)).unwrap();
    let index_path = escape.join("transformer/diffusion_pytorch_model.safetensors.index.json");
    std::fs::write(index_path, index.to_string()).unwrap();
    let no_vae = model_dir(&d.join("no_vae"));
    std::fs::remove_dir_all(no_vae.join("vae")).unwrap();
    let nan = model_dir(&d.join("nan"));
    poison_tensor(&weights(&nan), "context_embedder.weight");
    evil_hps(&d.join("evil_hps"), &d.join("pwned"));
}

/// An HPSv2 directory whose `.pt` pickle calls `os.system("touch <marker>")`.
fn evil_hps(dir: &Path, marker: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = serde_json::to_string(&OpenClipConfig::tiny()).unwrap();
    std::fs::write(dir.join("model_config.json"), cfg).unwrap();
    let cmd = format!("touch {}", marker.display());
    let mut pickle = b"\x80\x02cos\nsystem\n".to_vec();
    pickle.push(b'X');
    pickle.extend((cmd.len() as u32).to_le_bytes());
    pickle.extend(cmd.as_bytes());
    pickle.extend(b"\x85R.");
    let file = std::fs::File::create(dir.join("HPS_v2.1_compressed.pt")).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(&pickle).unwrap();
    zip.start_file("archive/byteorder", opts).unwrap();
    zip.write_all(b"little").unwrap();
    zip.finish().unwrap();
}
