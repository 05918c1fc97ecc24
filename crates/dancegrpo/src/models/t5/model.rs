//! `T5EncoderModel`: token embedding, encoder blocks sharing block 0's relative
//! position bias, and the final RMS norm.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::config::T5Config;
use super::layers::{T5Block, T5LayerNorm};
use crate::error::{Error, Result};
use crate::weights::{Checkpoint, Init, ParamStore, Source, VarBuilder};

/// Key of the shared token embedding.
const SHARED: &str = "shared.weight";
/// Key of the (tied) encoder copy of the token embedding.
const EMBED_TOKENS: &str = "encoder.embed_tokens.weight";

/// A T5 encoder (`T5EncoderModel` semantics, eval mode).
pub struct T5Encoder {
    config: T5Config,
    embed_tokens: Tensor,
    blocks: Vec<T5Block>,
    final_layer_norm: T5LayerNorm,
    params: ParamStore,
}

impl T5Encoder {
    /// Builds the encoder with parameters from `source`, of `kind` (float32 or
    /// bfloat16) on `device`. The token embedding is read from `shared.weight`, or
    /// from its tied copy `encoder.embed_tokens.weight` when only that is stored.
    /// Decoder and LM-head tensors of a full T5 checkpoint are ignored.
    pub fn new(config: T5Config, source: Source, kind: Kind, device: Device) -> Result<Self> {
        check_kind(kind)?;
        config.validate(Path::new("T5 config"))?;
        let params = ParamStore::new();
        let vb = VarBuilder::new(source, &params, kind, device);
        let embed_name = match source {
            Source::Checkpoint(ck) if ck.shape(SHARED).is_none() => {
                if ck.shape(EMBED_TOKENS).is_none() {
                    return Err(Error::MissingTensor {
                        source_desc: ck.describe().to_string(),
                        name: format!("{SHARED}` (or `{EMBED_TOKENS}"),
                    });
                }
                EMBED_TOKENS
            }
            _ => SHARED,
        };
        let (prefix, leaf) = embed_name
            .rsplit_once('.')
            .expect("embedding key has a dot");
        let embed_tokens = vb.pp(prefix).get(
            leaf,
            &[config.vocab_size, config.d_model],
            Init::Normal(1.0),
        )?;
        let enc = vb.pp("encoder");
        let blocks = (0..config.num_layers)
            .map(|i| T5Block::new(&enc.pp("block").pp(i), &config, i == 0))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = T5LayerNorm::new(
            &enc.pp("final_layer_norm"),
            config.d_model,
            config.layer_norm_epsilon,
        )?;
        if let Source::Checkpoint(ck) = source {
            params.check_all_used_except(ck, |name| {
                name == EMBED_TOKENS
                    || name == SHARED
                    || name.starts_with("decoder.")
                    || name == "lm_head.weight"
            })?;
        }
        Ok(T5Encoder {
            config,
            embed_tokens,
            blocks,
            final_layer_norm,
            params,
        })
    }

    /// Loads a transformers model directory (`config.json` + `model.safetensors`
    /// or the shards of `model.safetensors.index.json`), converting the stored
    /// dtype to `kind`.
    pub fn from_dir(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let config = T5Config::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open_dir(dir, "model")?;
        Self::new(config, Source::Checkpoint(&ck), kind, device)
    }

    /// The architecture.
    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// All parameters with their checkpoint names.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.params.named()
    }

    /// Parameter dtype.
    pub fn kind(&self) -> Kind {
        self.embed_tokens.kind()
    }

    /// Parameter device.
    pub fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// `last_hidden_state (b, L, d_model)` for `input_ids (b, L)` (int64). Without
    /// `attention_mask` every position attends to every other (FLUX passes no mask,
    /// so padding is attended); with a mask `(b, L)` of 1/0 the masked keys get
    /// `finfo(dtype).min` added to their scores, as transformers does.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let size = input_ids.size();
        if size.len() != 2 || !matches!(input_ids.kind(), Kind::Int64 | Kind::Int) {
            return Err(Error::Input(format!(
                "T5 input_ids must be an integer tensor (batch, length), got {:?} {size:?}",
                input_ids.kind()
            )));
        }
        let (b, l) = (size[0], size[1]);
        if let Some(m) = attention_mask {
            if m.size() != [b, l] {
                return Err(Error::Input(format!(
                    "T5 attention_mask has shape {:?}, input_ids {size:?}",
                    m.size()
                )));
            }
        }
        check_ids(input_ids, self.config.vocab_size, "T5")?;
        let ids = input_ids.to_kind(Kind::Int64).to_device(self.device());
        let mut h = Tensor::embedding(&self.embed_tokens, &ids, -1, false, false);
        let Some(first) = self.blocks.first() else {
            return Ok(self.final_layer_norm.forward(&h));
        };
        let bias = first.attention().compute_bias(l, l);
        let bias = match attention_mask {
            None => bias,
            Some(m) => {
                let kind = self.kind();
                let m = m.to_device(self.device()).to_kind(kind).view([b, 1, 1, l]);
                bias + (m.ones_like() - m) * finfo_min(kind)
            }
        };
        for block in &self.blocks {
            h = block.forward(&h, &bias);
        }
        Ok(self.final_layer_norm.forward(&h))
    }
}

/// The encoders support float32, bfloat16 and float64 (the fixtures' float64
/// replay); float16 would need transformers' overflow clamping.
pub(crate) fn check_kind(kind: Kind) -> Result<()> {
    match kind {
        Kind::Float | Kind::BFloat16 | Kind::Double => Ok(()),
        other => Err(Error::Input(format!(
            "text encoders run in float32, bfloat16 or float64, not {other:?}"
        ))),
    }
}

/// Errors when an id is outside `[0, vocab)` (an embedding lookup would abort).
pub(crate) fn check_ids(ids: &Tensor, vocab: i64, model: &str) -> Result<()> {
    if ids.numel() == 0 {
        return Ok(());
    }
    let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
    if lo < 0 || hi >= vocab {
        return Err(Error::Input(format!(
            "{model} token ids must lie in [0, {vocab}), got range [{lo}, {hi}]"
        )));
    }
    Ok(())
}

/// `torch.finfo(kind).min`.
pub(crate) fn finfo_min(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Half => -65504.0,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}
