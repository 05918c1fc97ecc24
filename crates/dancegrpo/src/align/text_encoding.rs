//! The `text_encoding` stage: FLUX `encode_prompt` (FORMAT.md section 1), teacher
//! forced from the stored token ids. CLIP (`text_encoders/text_encoder`) gives
//! `clip_last_hidden_state` and `pooled_prompt_embeds`; T5
//! (`text_encoders/text_encoder_2`, no attention mask) gives `prompt_embeds`;
//! `text_ids` are zeros. Prompts are encoded one at a time, as the reference does.

use tch::{Device, Tensor};

use super::case::ReferenceFiles;
use super::judge::Rule;
use super::{Case, Precision, Stage, StageAcc, StageReport, TensorCheck};
use crate::error::{Error, Result};
use crate::models::clip_text::ClipTextModel;
use crate::models::t5::T5Encoder;
use crate::text::{batch_ids, ClipTokenizer, Padding, T5Tokenizer, TextHandling};

/// Bound of the stage against the float32 reference when a case has no truth.
pub const TOL: f64 = 1e-5;

/// Runs the stage on `case` in `precision`.
pub fn run(case: &Case, precision: Precision) -> Result<StageReport> {
    let kind = precision.frozen_kind();
    let dir = case.dir().join("text_encoders");
    let expected = ReferenceFiles::open(&dir)?;
    let dev = case.device();
    let clip = ClipTextModel::from_dir(&dir.join("text_encoder"), kind, dev)?;
    let t5 = T5Encoder::from_dir(&dir.join("text_encoder_2"), kind, dev)?;
    let clip_ids = expected.expected("clip_input_ids")?; // (n, 77)
    let clip_hidden = expected.reference("clip_last_hidden_state")?; // (n, 77, d_clip)
    let pooled = expected.reference("pooled_prompt_embeds")?; // (n, d_clip)
    let t5_ids = expected.expected("t5_input_ids")?; // (n, Lt)
    let prompt_embeds = expected.reference("prompt_embeds")?; // (n, Lt, d_model)
    let text_ids = expected.reference("text_ids")?; // (Lt, 3)
    let n = clip_ids.size()[0];
    let counts = [&pooled, &prompt_embeds].map(|r| r.expected.size()[0]);
    if t5_ids.size()[0] != n || counts != [n, n] {
        return Err(Error::Input(format!(
            "{}: prompt counts differ: clip_input_ids {:?}, t5_input_ids {:?}, pooled_prompt_embeds {:?}, prompt_embeds {:?}",
            expected.expected_path().display(),
            clip_ids.size(),
            t5_ids.size(),
            pooled.expected.size(),
            prompt_embeds.expected.size()
        )));
    }
    let mut acc = StageAcc::new(Stage::TextEncoding, Rule::new(precision, TOL));
    compare_token_ids(case, &expected, &mut acc)?;
    let _guard = tch::no_grad_guard();
    for i in 0..n {
        let out = clip.forward(&clip_ids.narrow(0, i, 1).to_device(dev), None)?;
        acc.compare(
            format!("clip_last_hidden_state[{i}]"),
            &out.last_hidden_state.squeeze_dim(0),
            &clip_hidden.get(i),
        );
        acc.compare(
            format!("pooled_prompt_embeds[{i}]"),
            &out.pooled.squeeze_dim(0),
            &pooled.get(i),
        );
        let embeds = t5.forward(&t5_ids.narrow(0, i, 1).to_device(dev), None)?;
        acc.compare(
            format!("prompt_embeds[{i}]"),
            &embeds.squeeze_dim(0),
            &prompt_embeds.get(i),
        );
    }
    let lt = t5_ids.size()[1];
    acc.compare(
        "text_ids",
        &Tensor::zeros([lt, 3], (precision.state_kind(), Device::Cpu)),
        &text_ids,
    );
    Ok(acc.finish())
}

/// Tokenizer parity: the prompts of `case.json["prompts (dataset order)"]`
/// tokenized with `text_encoders/tokenizer` and `tokenizer_2` must give
/// `clip_input_ids` and `t5_input_ids` exactly.
fn compare_token_ids(case: &Case, expected: &ReferenceFiles, acc: &mut StageAcc) -> Result<()> {
    let prompts = case.strings("prompts (dataset order)")?;

    let dir = case.dir().join("text_encoders");
    let clip = ClipTokenizer::from_dir_as(&dir.join("tokenizer"), TextHandling::SlowFtfy)?;
    let t5 = T5Tokenizer::from_dir(&dir.join("tokenizer_2"))?;
    let want_t5 = expected.expected("t5_input_ids")?;
    let t5_len = want_t5.size()[1] as usize;
    let clip_ids = prompts
        .iter()
        .map(|p| clip.encode(p, 77, Padding::EndOfText))
        .collect::<Result<Vec<_>>>()?;
    let t5_ids = prompts
        .iter()
        .map(|p| t5.encode(p, t5_len))
        .collect::<Result<Vec<_>>>()?;
    for (name, ours, want) in [
        (
            "clip_input_ids",
            batch_ids(&clip_ids)?,
            expected.expected("clip_input_ids")?,
        ),
        ("t5_input_ids", batch_ids(&t5_ids)?, want_t5),
    ] {
        acc.push(TensorCheck::exact(
            format!("{name} (tokenizer, exact)"),
            super::errors(&ours, &want),
            ours.size() == want.size() && ours.equal(&want),
        ));
    }
    Ok(())
}
