//! FLUX prompt encoding (diffusers `FluxPipeline.encode_prompt` with
//! `prompt_2 = prompt`): CLIP ids of 77 padded with `<|endoftext|>`, pooled =
//! CLIP pooled output; T5 ids of `max_sequence_length` padded with 0, no
//! attention mask, `prompt_embeds` = T5 last hidden state. (`text_ids` are
//! zeros `[Lt, 3]` and are not stored.)

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::models::clip_text::ClipTextModel;
use crate::models::t5::T5Encoder;
use crate::text::{batch_ids, ClipTokenizer, Padding, T5Tokenizer, TextHandling};

/// CLIP sequence length of FLUX.
pub const CLIP_LENGTH: usize = 77;

/// Prompt embeddings of a batch, on the CPU.
pub struct EncodedBatch {
    /// T5 last hidden state `[n, Lt, d]`.
    pub prompt_embeds: Tensor,
    /// CLIP pooled output `[n, p]`.
    pub pooled: Tensor,
    /// Per prompt: its CLIP ids were cut to 77.
    pub truncated_clip: Vec<bool>,
    /// Per prompt: its T5 ids were cut to `Lt`.
    pub truncated_t5: Vec<bool>,
}

/// The two FLUX text encoders and their tokenizers.
pub struct FluxTextEncoder {
    clip_tokenizer: ClipTokenizer,
    t5_tokenizer: T5Tokenizer,
    clip: ClipTextModel,
    t5: T5Encoder,
    max_sequence_length: usize,
}

impl FluxTextEncoder {
    /// Loads `tokenizer/`, `tokenizer_2/`, `text_encoder/` and `text_encoder_2/` of
    /// a FLUX.1 directory, the encoders in `kind` on `device`.
    pub fn from_dir(
        dir: &Path,
        max_sequence_length: usize,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::not_found(dir, "no such model directory"));
        }
        for (sub, what) in [
            ("tokenizer", "the CLIP tokenizer"),
            ("tokenizer_2", "the T5 tokenizer"),
            ("text_encoder", "the CLIP text encoder"),
            ("text_encoder_2", "the T5 encoder"),
        ] {
            let p = dir.join(sub);
            if !p.is_dir() {
                return Err(Error::not_found(
                    &p,
                    format!("missing: {what} of a FLUX.1 directory ({sub}/)"),
                ));
            }
        }
        if max_sequence_length < 1 {
            return Err(Error::Input("max_sequence_length must be >= 1".into()));
        }
        let clip_tokenizer =
            ClipTokenizer::from_dir_as(&dir.join("tokenizer"), TextHandling::SlowFtfy)?;
        let t5_tokenizer = T5Tokenizer::from_dir(&dir.join("tokenizer_2"))?;
        let clip = ClipTextModel::from_dir(&dir.join("text_encoder"), kind, device)?;
        let t5 = T5Encoder::from_dir(&dir.join("text_encoder_2"), kind, device)?;
        if (clip.config().max_position_embeddings as usize) < CLIP_LENGTH {
            return Err(Error::config(
                dir.join("text_encoder/config.json"),
                "max_position_embeddings",
                format!("must be >= {CLIP_LENGTH}"),
            ));
        }
        Ok(FluxTextEncoder {
            clip_tokenizer,
            t5_tokenizer,
            clip,
            t5,
            max_sequence_length,
        })
    }

    /// Text length `Lt`.
    pub fn text_len(&self) -> i64 {
        self.max_sequence_length as i64
    }

    /// Text embedding width (T5 `d_model`).
    pub fn text_dim(&self) -> i64 {
        self.t5.config().d_model
    }

    /// Pooled width (CLIP `hidden_size`).
    pub fn pooled_dim(&self) -> i64 {
        self.clip.config().hidden_size
    }

    /// Encodes `prompts` as one batch. Outputs are in the encoders' kind, on the CPU.
    pub fn encode(&self, prompts: &[&str]) -> Result<EncodedBatch> {
        let clip = prompts
            .iter()
            .map(|p| {
                self.clip_tokenizer
                    .encode(p, CLIP_LENGTH, Padding::EndOfText)
            })
            .collect::<Result<Vec<_>>>()?;
        let t5 = prompts
            .iter()
            .map(|p| self.t5_tokenizer.encode(p, self.max_sequence_length))
            .collect::<Result<Vec<_>>>()?;
        let _guard = tch::no_grad_guard();
        let pooled = self.clip.forward(&batch_ids(&clip)?, None)?.pooled;
        let prompt_embeds = self.t5.forward(&batch_ids(&t5)?, None)?;
        Ok(EncodedBatch {
            prompt_embeds: prompt_embeds.to_device(Device::Cpu),
            pooled: pooled.to_device(Device::Cpu),
            truncated_clip: clip.iter().map(|e| e.truncated).collect(),
            truncated_t5: t5.iter().map(|e| e.truncated).collect(),
        })
    }
}
