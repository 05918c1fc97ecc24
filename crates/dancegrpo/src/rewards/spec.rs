//! Which reward to build: the `[[rewards]]` entries of the training config
//! (serde tag `kind`) and the `--reward SPEC` strings of `dancegrpo score`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use super::clip_score::{ClipScoreReward, ClipScoreScale};
use super::hps::HpsReward;
use super::jpeg::{JpegObjective, JpegReward, JpegSubsampling};
use super::pickscore::PickScoreReward;
use super::remote::{RemoteConfig, RemoteReward};
use super::Reward;
use crate::error::{Error, Result};

/// One reward and its weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RewardSpec {
    /// JPEG size at a fixed quality.
    Jpeg {
        /// Which direction is rewarded.
        objective: JpegObjective,
        /// JPEG quality.
        #[serde(default = "default_jpeg_quality")]
        quality: u8,
        /// Chroma subsampling: `"4:2:0"` (default, Pillow's) or `"4:4:4"`.
        #[serde(default)]
        subsampling: JpegSubsampling,
        /// Weight in the combined reward.
        #[serde(default = "one")]
        weight: f64,
    },
    /// HPSv2 (open_clip): a directory with the open_clip config, the weights
    /// (`open_clip_model.safetensors` or `HPS_v2.1_compressed.pt`) and the tokenizer.
    Hpsv2 {
        /// The directory.
        path: PathBuf,
        /// Weight in the combined reward.
        #[serde(default = "one")]
        weight: f64,
    },
    /// CLIP score of a transformers `CLIPModel` directory.
    ClipScore {
        /// The directory (`config.json`, weights, tokenizer, optional `preprocessor_config.json`).
        path: PathBuf,
        /// `cosine` (default) or `torchmetrics` (`max(100 cos, 0)`).
        #[serde(default)]
        scale: ClipScoreScale,
        /// Weight in the combined reward.
        #[serde(default = "one")]
        weight: f64,
    },
    /// PickScore: a transformers `CLIPModel` directory (PickScore_v1 with CLIP-H's processor).
    Pickscore {
        /// The directory.
        path: PathBuf,
        /// Weight in the combined reward.
        #[serde(default = "one")]
        weight: f64,
    },
    /// A reward service over HTTP (the protocol: `docs/rewards.md`).
    Remote {
        /// `https://host:port/path`, or `http://` to a loopback address.
        url: String,
        /// Seconds one attempt may take.
        #[serde(default = "default_timeout")]
        timeout_s: f64,
        /// Attempts after the first one.
        #[serde(default = "default_retries")]
        retries: u32,
        /// Seconds before the first retry (doubled for each further one).
        #[serde(default = "default_backoff")]
        backoff_s: f64,
        /// Seconds one batch may take, every attempt and wait included.
        #[serde(default = "default_budget")]
        budget_s: f64,
        /// A PEM file of CA certificates to trust besides the system's and the
        /// bundled Mozilla roots (a service with a private CA).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca_file: Option<PathBuf>,
        /// Allow plain `http://` to hosts other than loopback (prompts and
        /// images then cross the network unencrypted).
        #[serde(default)]
        allow_plain_http: bool,
        /// Weight in the combined reward.
        #[serde(default = "one")]
        weight: f64,
    },
}

fn default_jpeg_quality() -> u8 {
    95
}
fn one() -> f64 {
    1.0
}
fn default_timeout() -> f64 {
    60.0
}
fn default_retries() -> u32 {
    2
}
fn default_backoff() -> f64 {
    0.5
}
fn default_budget() -> f64 {
    300.0
}

/// The `--reward` forms [`RewardSpec::parse_cli`] accepts.
pub const CLI_FORMS: &str = "jpeg, jpeg:compressibility, jpeg:incompressibility, hpsv2:DIR, \
     clip:DIR, clip-torchmetrics:DIR, pickscore:DIR, remote:URL";

impl RewardSpec {
    /// The weight in the combined reward.
    pub fn weight(&self) -> f64 {
        match self {
            RewardSpec::Jpeg { weight, .. }
            | RewardSpec::Hpsv2 { weight, .. }
            | RewardSpec::ClipScore { weight, .. }
            | RewardSpec::Pickscore { weight, .. }
            | RewardSpec::Remote { weight, .. } => *weight,
        }
    }

    /// The field that says where the reward comes from (`path`, `url`, `quality`).
    pub fn source_field(&self) -> &'static str {
        match self {
            RewardSpec::Jpeg { .. } => "quality",
            RewardSpec::Remote { .. } => "url",
            _ => "path",
        }
    }

    /// The first invalid field and why, if any.
    pub fn check(&self) -> Option<(&'static str, String)> {
        let w = self.weight();
        if !w.is_finite() {
            return Some(("weight", format!("must be finite, got {w}")));
        }
        match self {
            RewardSpec::Jpeg { quality, .. } if !(1..=100).contains(quality) => {
                Some(("quality", format!("must be in 1..=100, got {quality}")))
            }
            RewardSpec::Remote {
                url,
                timeout_s,
                retries,
                backoff_s,
                budget_s,
                allow_plain_http,
                ..
            } => {
                let max = super::remote::MAX_RETRIES;
                let day = 86400.0;
                if let Err(why) = super::remote::check_url(url, *allow_plain_http) {
                    Some(("url", format!("`{url}`: {why}")))
                } else if !(*timeout_s > 0.0 && *timeout_s <= day) {
                    Some((
                        "timeout_s",
                        format!("must be in (0, {day}], got {timeout_s}"),
                    ))
                } else if *retries > max {
                    Some(("retries", format!("must be at most {max}, got {retries}")))
                } else if !(*backoff_s >= 0.0 && *backoff_s <= 60.0) {
                    Some(("backoff_s", format!("must be in [0, 60], got {backoff_s}")))
                } else if !(*budget_s > 0.0 && *budget_s <= day) {
                    Some(("budget_s", format!("must be in (0, {day}], got {budget_s}")))
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    /// Builds the reward, its models on `device` in float32.
    pub fn build(&self, device: Device) -> Result<Box<dyn Reward>> {
        self.build_in(Kind::Float, device)
    }

    /// Builds the reward, its models stored in `kind` on `device`.
    pub fn build_in(&self, kind: Kind, device: Device) -> Result<Box<dyn Reward>> {
        if let Some((field, msg)) = self.check() {
            return Err(Error::Input(format!("reward field `{field}`: {msg}")));
        }
        Ok(match self {
            RewardSpec::Jpeg {
                objective,
                quality,
                subsampling,
                ..
            } => Box::new(JpegReward::new(*objective, *quality)?.with_subsampling(*subsampling)),
            RewardSpec::Hpsv2 { path, .. } => Box::new(HpsReward::from_dir(path, kind, device)?),
            RewardSpec::ClipScore { path, scale, .. } => {
                Box::new(ClipScoreReward::from_dir(path, *scale, kind, device)?)
            }
            RewardSpec::Pickscore { path, .. } => {
                Box::new(PickScoreReward::from_dir(path, kind, device)?)
            }
            RewardSpec::Remote {
                url,
                timeout_s,
                retries,
                backoff_s,
                budget_s,
                ca_file,
                allow_plain_http,
                ..
            } => {
                let mut cfg = RemoteConfig::new(url, *timeout_s, *retries);
                cfg.backoff = std::time::Duration::from_secs_f64(*backoff_s);
                cfg.budget = std::time::Duration::from_secs_f64(*budget_s);
                cfg.ca_file = ca_file.clone();
                cfg.allow_plain_http = *allow_plain_http;
                Box::new(RemoteReward::new(cfg)?)
            }
        })
    }

    /// Parses a command-line form (see [`CLI_FORMS`]); weight 1, the remote
    /// defaults (60 s timeout, 2 retries, 0.5 s first backoff).
    pub fn parse_cli(spec: &str) -> Result<Self> {
        let (kind, arg) = match spec.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (spec, None),
        };
        let need = |what: &str| -> Result<String> {
            arg.filter(|a| !a.is_empty())
                .map(str::to_string)
                .ok_or_else(|| {
                    Error::Input(format!("reward `{spec}`: `{kind}:{what}` needs a {what}"))
                })
        };
        let weight = 1.0;
        Ok(match kind {
            "jpeg" => RewardSpec::Jpeg {
                objective: match arg {
                    None | Some("compressibility") => JpegObjective::Compressibility,
                    Some("incompressibility") => JpegObjective::Incompressibility,
                    Some(o) => {
                        return Err(Error::Input(format!(
                            "reward `{spec}`: unknown JPEG objective `{o}` (compressibility, incompressibility)"
                        )))
                    }
                },
                quality: default_jpeg_quality(),
                subsampling: JpegSubsampling::default(),
                weight,
            },
            "hpsv2" => RewardSpec::Hpsv2 {
                path: need("DIR")?.into(),
                weight,
            },
            "clip" | "clip-torchmetrics" => RewardSpec::ClipScore {
                path: need("DIR")?.into(),
                scale: if kind == "clip" {
                    ClipScoreScale::Cosine
                } else {
                    ClipScoreScale::Torchmetrics
                },
                weight,
            },
            "pickscore" => RewardSpec::Pickscore {
                path: need("DIR")?.into(),
                weight,
            },
            "remote" => RewardSpec::Remote {
                url: need("URL")?,
                timeout_s: default_timeout(),
                retries: default_retries(),
                backoff_s: default_backoff(),
                budget_s: default_budget(),
                ca_file: None,
                allow_plain_http: false,
                weight,
            },
            _ => {
                return Err(Error::Input(format!(
                    "unknown reward `{spec}` (one of: {CLI_FORMS})"
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_subsampling_is_420_unless_set() {
        let parse = |t: &str| toml::from_str::<RewardSpec>(t);
        let spec = parse("kind = \"jpeg\"\nobjective = \"compressibility\"").unwrap();
        assert!(matches!(
            spec,
            RewardSpec::Jpeg {
                subsampling: JpegSubsampling::S420,
                ..
            }
        ));
        let spec =
            parse("kind = \"jpeg\"\nobjective = \"compressibility\"\nsubsampling = \"4:4:4\"");
        assert!(matches!(
            spec.unwrap(),
            RewardSpec::Jpeg {
                subsampling: JpegSubsampling::S444,
                ..
            }
        ));
        let err =
            parse("kind = \"jpeg\"\nobjective = \"compressibility\"\nsubsampling = \"4:2:2\"")
                .unwrap_err();
        assert!(err.to_string().contains("4:4:4"), "{err}");
    }

    #[test]
    fn cli_forms_parse_and_unknown_ones_are_named() {
        assert!(matches!(
            RewardSpec::parse_cli("jpeg").unwrap(),
            RewardSpec::Jpeg {
                objective: JpegObjective::Compressibility,
                ..
            }
        ));
        match RewardSpec::parse_cli("remote:http://127.0.0.1:9/x").unwrap() {
            RewardSpec::Remote { url, .. } => assert_eq!(url, "http://127.0.0.1:9/x"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            RewardSpec::parse_cli("clip-torchmetrics:/m").unwrap(),
            RewardSpec::ClipScore {
                scale: ClipScoreScale::Torchmetrics,
                ..
            }
        ));
        let e = RewardSpec::parse_cli("aesthetic:/m")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown reward `aesthetic:/m`") && e.contains("pickscore:DIR"),
            "{e}"
        );
        let e = RewardSpec::parse_cli("hpsv2").unwrap_err().to_string();
        assert!(e.contains("needs a DIR"), "{e}");
        assert!(RewardSpec::parse_cli("jpeg:sideways").is_err());
    }
}
