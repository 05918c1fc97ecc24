//! The output directory: prepared (and checked writable) before training,
//! filled under a temporary sibling name, renamed into place when complete.
//!
//! ```text
//! <out>/transformer/   config.json, diffusion_pytorch_model.safetensors (diffusers layout)
//! <out>/vae/           config.json, diffusion_pytorch_model.safetensors (encoder and decoder)
//! <out>/samples.png    rows: held-out procedural images of classes 0..n, their VAE
//!                      reconstructions, two rows of ODE samples of the same classes' prompts
//! <out>/loss.png       log10 of the loss per step: VAE stage (top), flow stage (bottom)
//! <out>/pretrain.json  configuration, figures, per-step losses (written last)
//! ```

use std::path::{Path, PathBuf};

use tch::Tensor;

use super::autoencoder::HELD_OUT;
use super::flow::ClassPrompts;
use super::images::{self, ProceduralImages};
use super::{PretrainConfig, Pretrained};
use crate::error::{Error, Result};
use crate::io::atomic::write_bytes_atomic;
use crate::io::image::{grid, write_png};
use crate::sampler::generate::{generate, OdeSettings};
use crate::train::curve::rolling_mean;
use crate::train::plot::{render, Chart, Corner, Scale, Series, Style};

/// Columns (classes) of `samples.png`.
const SAMPLE_CLASSES: u64 = 8;

/// A temporary directory beside `out` that becomes `out` on [`Staging::commit`]
/// and is removed if dropped before.
pub(super) struct Staging {
    tmp: PathBuf,
    out: PathBuf,
    committed: bool,
}

impl Staging {
    /// Checks that `out` can be (re)placed and creates the temporary sibling.
    /// `out` may be absent, empty, or an earlier pretrain output (it holds
    /// `pretrain.json`); anything else is refused.
    pub(super) fn prepare(out: &Path) -> Result<Self> {
        let refuse = |msg: &str| {
            Error::io(
                out,
                std::io::Error::new(std::io::ErrorKind::AlreadyExists, msg.to_string()),
            )
        };
        if out.exists() && !out.is_dir() {
            return Err(refuse("exists and is not a directory"));
        }
        if out.is_dir() && !out.join("pretrain.json").is_file() {
            let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
            if entries.next().is_some() {
                return Err(refuse(
                    "is a non-empty directory that is not a pretrain output; refusing to replace it",
                ));
            }
        }
        let name = out
            .file_name()
            .ok_or_else(|| Error::Input(format!("{}: not a directory name", out.display())))?;
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let tmp = parent.join(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Staging {
            tmp,
            out: out.to_path_buf(),
            committed: false,
        })
    }

    /// Where the files are written until the commit.
    pub(super) fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Moves the complete directory into place (an earlier output is replaced).
    pub(super) fn commit(mut self) -> Result<()> {
        let old = self.tmp.with_file_name(format!(
            ".{}.old-{}",
            self.out.file_name().expect("checked").to_string_lossy(),
            std::process::id()
        ));
        let had_old = self.out.exists();
        if had_old {
            std::fs::rename(&self.out, &old).map_err(|e| Error::io(&self.out, e))?;
        }
        std::fs::rename(&self.tmp, &self.out).map_err(|e| Error::io(&self.out, e))?;
        self.committed = true;
        if had_old {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        if let Some(parent) = self.out.parent() {
            if let Ok(d) = std::fs::File::open(parent) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Writes the model directory's files into `dir`, `pretrain.json` last.
pub(super) fn write_model(pre: &Pretrained, cfg: &PretrainConfig, dir: &Path) -> Result<()> {
    pre.transformer.save_dir(&dir.join("transformer"))?;
    pre.vae.save_dir(&dir.join("vae"))?;
    write_png(&dir.join("samples.png"), &samples_grid(pre, cfg)?)?;
    write_png(
        &dir.join("loss.png"),
        &loss_plot(&pre.report.vae_losses, &pre.report.flow_losses)?,
    )?;
    let json = serde_json::json!({
        "format": "dancegrpo-pretrain",
        "version": 1,
        "config": cfg,
        "figures": pre.report.figures(),
        "trainer_settings": trainer_settings(cfg),
        "losses": { "vae": pre.report.vae_losses, "flow": pre.report.flow_losses },
    });
    let text = serde_json::to_string_pretty(&json).expect("json");
    write_bytes_atomic(&dir.join("pretrain.json"), text.as_bytes())
}

/// The `--set` overrides of `dancegrpo train` that use this model as it was trained
/// (besides `model.kind="dir"` and `model.path`).
pub fn trainer_settings(cfg: &PretrainConfig) -> Vec<String> {
    vec![
        "data.kind=\"synthetic\"".into(),
        format!("data.prompts={}", cfg.classes),
        format!("data.seed={}", cfg.prompt_seed),
        format!("sampler.height={}", cfg.image_size),
        format!("sampler.width={}", cfg.image_size),
        format!("sampler.guidance={}", cfg.guidance),
    ]
}

/// References, reconstructions and two rows of ODE samples, uint8 `(4H, nW, 3)`.
fn samples_grid(pre: &Pretrained, cfg: &PretrainConfig) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let images = ProceduralImages::new(cfg.seed, cfg.image_size, cfg.classes)?;
    let n = cfg.classes.min(SAMPLE_CLASSES);
    let device = pre.vae.parameters()[0].1.device();
    let base = HELD_OUT - HELD_OUT % cfg.classes; // an index of class 0
    let indices: Vec<u64> = (base..base + n).collect();
    let (refs, classes) = images.batch(&indices);
    let refs = refs.to_device(device); // (n, 3, H, W)
    let recon = pre.vae.decode(&pre.vae.encode(&refs)?.mean, None);
    let prompts = ClassPrompts::new(cfg, &pre.transformer, device)?;
    let (text, pooled) = prompts.select(&classes);
    let lat = cfg.image_size / 8;
    let settings = OdeSettings {
        steps: cfg.sample_steps,
        shift: cfg.sample_shift,
        guidance: pre
            .transformer
            .config()
            .guidance_embeds
            .then_some(cfg.guidance),
        cache: None,
    };
    let mut rows = vec![images::to_uint8(&refs), images::to_uint8(&recon)];
    for row in 0..2 {
        let noise = crate::rng::Philox::for_stream(cfg.seed, &format!("pretrain/samples/{row}"))
            .normal_tensor(&[n as i64, 16, lat, lat]);
        let out = generate(
            &pre.transformer,
            &pre.vae,
            &text,
            &pooled,
            &noise.to_device(device),
            &settings,
        )?;
        rows.push(out);
    }
    let all = Tensor::cat(&rows, 0).to_device(tch::Device::Cpu); // (4n, H, W, 3)
    Ok(grid(&all, n as i64))
}

/// Two stacked charts of the VAE's and the flow's loss per step (log scale)
/// with a rolling mean, uint8 `(2 * 260, 640, 3)`.
fn loss_plot(vae: &[f64], flow: &[f64]) -> Result<Tensor> {
    let chart = |title: &str, losses: &[f64]| {
        let points: Vec<(f64, f64)> = (losses.iter().enumerate())
            .map(|(i, &l)| (i as f64 + 1.0, l))
            .collect();
        let k = (points.len() / 50).max(1);
        let mut series = vec![Series {
            name: "per step".into(),
            points: points.clone(),
            colour: [160, 185, 230],
            style: Style::Line { width: 1 },
        }];
        if k > 1 {
            series.push(Series {
                name: format!("mean of the last {k}"),
                points: rolling_mean(&points, k),
                colour: [20, 60, 200],
                style: Style::Line { width: 2 },
            });
        }
        Chart {
            title: title.into(),
            x_title: "step".into(),
            y_title: "loss".into(),
            y_scale: Scale::Log,
            series,
            legend: Corner::UpperRight,
        }
    };
    render(&[chart("VAE", vae), chart("flow matching", flow)], 640, 260)
}
