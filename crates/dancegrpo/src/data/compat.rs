//! Whether an existing dataset may be resumed by this run: the same settings
//! (encoders, lengths, batch, device, shard size, dtype, widths) and the same
//! input (prompts file or reference index). Errors name the field; the CLI
//! adds the flag that sets it.

use std::path::Path;

use super::format::{DatasetInfo, DatasetSource};
use crate::error::{Error, Result};

/// The settings of `info` a resumed dataset must share, `(field, value)` in
/// the order they are checked (the source's kind first).
fn settings(info: &DatasetInfo) -> Vec<(&'static str, String)> {
    let mut v = match &info.source {
        DatasetSource::Encoders {
            model,
            skip_cjk,
            max_sequence_length,
            clip_length,
            batch,
            device,
            ..
        } => vec![
            ("source.kind", "text encoders".to_string()),
            ("source.model", format!("model {model}")),
            ("source.skip_cjk", format!("skip_cjk {skip_cjk}")),
            (
                "source.max_sequence_length",
                format!("max_sequence_length {max_sequence_length}"),
            ),
            ("source.clip_length", clip_length.to_string()),
            ("source.batch", format!("batch {batch}")),
            ("source.device", format!("device {device}")),
        ],
        DatasetSource::Reference { dir, .. } => vec![
            ("source.kind", "a reference directory".to_string()),
            ("source.dir", format!("reference {dir}")),
        ],
    };
    v.push(("shard_size", format!("shard_size {}", info.shard_size)));
    v.push(("dtype", format!("dtype {}", info.dtype.name())));
    let widths = (info.text_len, info.text_dim, info.pooled_dim);
    v.push(("text_len/text_dim/pooled_dim", format!("{widths:?}")));
    v
}

/// Fails, naming the first setting that differs, when `stored` (from `path`)
/// was made with other settings than `now`.
pub(super) fn check_same_settings(
    path: &Path,
    stored: &DatasetInfo,
    now: &DatasetInfo,
) -> Result<()> {
    let now = settings(now);
    for (field, a) in settings(stored) {
        let b = now.iter().find(|(f, _)| *f == field).map(|(_, b)| b);
        if b == Some(&a) {
            continue;
        }
        let b = b.cloned().unwrap_or_default();
        let why = match field {
            "source.batch" => " (batched encoders round differently)",
            _ => "",
        };
        return Err(Error::config(
            path,
            field,
            format!("the dataset was made with {a}, this run has {b}{why}; use the same settings or another output directory"),
        ));
    }
    Ok(())
}

/// Fails when the input (prompts file or reference index) changed since `stored`.
pub(super) fn check_same_input(path: &Path, stored: &DatasetInfo, now: &DatasetInfo) -> Result<()> {
    let (field, h0, h1, what) = match (&stored.source, &now.source) {
        (
            DatasetSource::Encoders {
                prompts_hash: a, ..
            },
            DatasetSource::Encoders {
                prompts_hash: b, ..
            },
        ) => ("source.prompts_hash", a, b, "the prompts file"),
        (
            DatasetSource::Reference { index_hash: a, .. },
            DatasetSource::Reference { index_hash: b, .. },
        ) => (
            "source.index_hash",
            a,
            b,
            "the reference's videos2caption.json",
        ),
        _ => return Ok(()),
    };
    if h0 != h1 || stored.prompts != now.prompts {
        return Err(Error::config(
            path,
            field,
            format!(
                "{what} changed: the dataset was made from {} prompts (hash {h0}), this run has {} (hash {h1}); use the same input or another output directory",
                stored.prompts, now.prompts
            ),
        ));
    }
    Ok(())
}
