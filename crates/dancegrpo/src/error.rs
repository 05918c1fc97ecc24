//! Typed errors of the library. Every variant names what it is about (a file,
//! a tensor, a config field) so a user can act on the message alone.

use std::path::PathBuf;

/// Errors raised by the dancegrpo library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file did not parse, or did not have the expected structure.
    #[error("{path}: invalid JSON: {msg}")]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// A TOML file did not parse.
    #[error("{path}: invalid TOML: {msg}")]
    Toml {
        /// The TOML file.
        path: PathBuf,
        /// What was wrong (with its line and column).
        msg: String,
    },
    /// A safetensors file is malformed (bad header, truncated data, unknown dtype).
    #[error("{path}: invalid safetensors file: {msg}")]
    Safetensors {
        /// The safetensors file.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// A PyTorch `.pt` checkpoint is malformed, refers to something not allowed
    /// (its pickle is interpreted, never executed) or has an unsupported layout.
    #[error("{path}: torch checkpoint: {msg}")]
    TorchCheckpoint {
        /// The `.pt` file.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// A checkpoint lacks a whole part of a model (e.g. a tower of a CLIP model).
    #[error("{source_desc}: {msg}")]
    IncompleteCheckpoint {
        /// The checkpoint concerned.
        source_desc: String,
        /// What is missing.
        msg: String,
    },
    /// A tensor a model needs is absent from its checkpoint.
    #[error("{source_desc}: missing tensor `{name}`")]
    MissingTensor {
        /// The checkpoint (file or directory) that was searched.
        source_desc: String,
        /// The full tensor name.
        name: String,
    },
    /// A tensor exists but has the wrong shape.
    #[error("{source_desc}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The checkpoint (file or directory) holding the tensor.
        source_desc: String,
        /// The full tensor name.
        name: String,
        /// The shape the model needs.
        expected: Vec<i64>,
        /// The shape found in the checkpoint.
        found: Vec<i64>,
    },
    /// A checkpoint holds tensors the model does not have (a different architecture).
    #[error("{source_desc}: {count} unexpected tensor(s) for this model, e.g. `{example}`")]
    UnexpectedTensors {
        /// The checkpoint concerned.
        source_desc: String,
        /// How many tensors were not used.
        count: usize,
        /// One of them.
        example: String,
    },
    /// A configuration value is missing, of the wrong type or unsupported.
    #[error("{path}: field `{field}`: {msg}")]
    Config {
        /// The configuration file (or a description of where the value came from).
        path: PathBuf,
        /// The field concerned.
        field: String,
        /// What is wrong with it.
        msg: String,
    },
    /// Inputs of a computation do not fit together (shapes, lengths).
    #[error("invalid input: {0}")]
    Input(String),
    /// A run stopped because what it computes went wrong (non-finite values,
    /// failed rewards): the message names the first bad quantity.
    #[error("{0}")]
    Health(String),
    /// An error reported by libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result type of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A file or directory `path` that is missing, with what it should have been.
    pub fn not_found(path: impl AsRef<std::path::Path>, msg: impl Into<String>) -> Self {
        Self::io(
            path.as_ref(),
            std::io::Error::new(std::io::ErrorKind::NotFound, msg.into()),
        )
    }

    /// A configuration error for `field` of the file `path`.
    pub fn config(path: impl Into<PathBuf>, field: &str, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            field: field.to_string(),
            msg: msg.into(),
        }
    }
}
