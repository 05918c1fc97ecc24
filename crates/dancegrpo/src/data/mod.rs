//! Prompt-embedding datasets: the FLUX text encoders run once over a prompts
//! file ([`preprocess()`]), or the reference's `.pt` files converted
//! ([`convert_reference`]); the trainer reads the result ([`EmbeddingDataset`],
//! a [`PromptSet`]), or the reference's files in place
//! ([`ReferenceSet`], the reader the conversion uses). Layout in [`mod@format`].

mod compat;
pub mod encode;
pub mod format;
pub mod preprocess;
pub mod prompts;
pub mod reader;
pub mod reference;
pub mod reference_set;
pub mod set;
pub mod writer;

pub use encode::FluxTextEncoder;
pub use format::{DatasetInfo, EmbedDtype, ManifestEntry};
pub use preprocess::{
    convert_reference, preprocess, ConvertOptions, PreprocessOptions, PreprocessReport, Progress,
};
pub use reader::EmbeddingDataset;
pub use reference_set::ReferenceSet;
pub use set::{stack, PromptEntry, PromptSet, SyntheticPrompts};
