//! Safetensors files through the `safetensors` crate, memory-mapped.
//!
//! The crate parses and validates the header (the JSON, every dtype, shapes
//! against `data_offsets`, offsets contiguous and covering exactly the data
//! after the header) and supplies the header's types for writing. What stays
//! here: the memory map, the mapping between safetensors dtypes and libtorch
//! kinds, errors that name the file and say what is wrong in a user's words,
//! and writing, which streams tensor by tensor through [`write_atomic`] (a
//! sibling file, flushed to disk, then renamed) with the tensors in the
//! caller's order and `__metadata__` sorted, so a file's bytes depend only on
//! its contents. (The crate's own writer sorts tensors by dtype, does not
//! flush to disk before renaming, and orders `__metadata__` by hash.)

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::Metadata;
use safetensors::{SafeTensorError, SafeTensors};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;

pub use safetensors::Dtype;

/// The libtorch kind of a safetensors dtype (`None`: libtorch has none here,
/// e.g. the 8-bit floats).
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F64 => Kind::Double,
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// The safetensors dtype of a libtorch kind, if safetensors can store it.
pub fn dtype_of(kind: Kind) -> Option<Dtype> {
    [
        Dtype::F64,
        Dtype::F32,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I64,
        Dtype::I32,
        Dtype::I16,
        Dtype::I8,
        Dtype::U8,
        Dtype::BOOL,
    ]
    .into_iter()
    .find(|&d| kind_of(d) == Some(kind))
}

/// Where one tensor lives in a file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Element type (one libtorch can hold: [`kind_of`] is `Some`).
    pub dtype: Dtype,
    /// Shape (empty for a scalar).
    pub shape: Vec<i64>,
    /// Byte range in the data section.
    pub range: std::ops::Range<usize>,
}

impl TensorInfo {
    /// The libtorch kind of the tensor.
    pub fn kind(&self) -> Kind {
        kind_of(self.dtype).expect("checked when the file was opened")
    }
}

/// A memory-mapped safetensors file whose header has been validated.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    /// Opens and memory-maps `path`, validating the header against the file size.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only; a file truncated under us by another
        // process is the one hazard, as with every memory-mapped loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let bad = |msg: String| Error::Safetensors {
            path: path.clone(),
            msg,
        };
        let (n, header) = SafeTensors::read_metadata(&mmap).map_err(|e| bad(explain(&mmap, e)))?;
        let mut tensors = BTreeMap::new();
        for (name, info) in header.tensors() {
            if kind_of(info.dtype).is_none() {
                return Err(bad(format!(
                    "tensor `{name}` has dtype {}, which is not supported",
                    info.dtype
                )));
            }
            let (b, e) = info.data_offsets;
            let shape = info.shape.iter().map(|&d| d as i64).collect();
            tensors.insert(
                name,
                TensorInfo {
                    dtype: info.dtype,
                    shape,
                    range: b..e,
                },
            );
        }
        let metadata = header.metadata().clone().unwrap_or_default();
        Ok(SafetensorsFile {
            path,
            mmap,
            data_start: 8 + n,
            tensors,
            metadata: metadata.into_iter().collect(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Description of tensor `name`, if present.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The `__metadata__` map of the header (empty if absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The raw bytes of tensor `name`.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.info(name).ok_or_else(|| Error::MissingTensor {
            source_desc: self.path.display().to_string(),
            name: name.to_string(),
        })?;
        let start = self.data_start + info.range.start;
        Ok(&self.mmap[start..self.data_start + info.range.end])
    }

    /// Tensor `name` copied into a new CPU tensor of its stored dtype.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let bytes = self.bytes(name)?;
        let info = &self.tensors[name];
        Ok(Tensor::f_from_data_size(bytes, &info.shape, info.kind())?)
    }
}

/// A user's words for what the crate found wrong in the file `buf`.
fn explain(buf: &[u8], e: SafeTensorError) -> String {
    let n = buf
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    match e {
        SafeTensorError::HeaderTooSmall => format!(
            "file is {} bytes, shorter than the 8-byte header length",
            buf.len()
        ),
        SafeTensorError::InvalidHeaderLength | SafeTensorError::HeaderTooLarge => format!(
            "header length {} exceeds the file size {} (truncated?) or the 100 MB limit",
            n.unwrap_or(0),
            buf.len()
        ),
        SafeTensorError::InvalidHeader(e) => format!("header is not UTF-8: {e}"),
        SafeTensorError::InvalidHeaderDeserialization(e) => {
            format!("header is not valid JSON for safetensors: {e}")
        }
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "the tensors of the header do not cover the {} data bytes after it exactly (truncated file, or trailing bytes?)",
            buf.len() as u64 - 8 - n.unwrap_or(0)
        ),
        SafeTensorError::InvalidOffset(name) => format!(
            "tensor `{name}`: data_offsets do not start where the previous tensor ends"
        ),
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's data_offsets span another size than its shape and dtype need".into()
        }
        other => other.to_string(),
    }
}

/// Writes `tensors` (any device, contiguous or not) to `path` atomically: the
/// file appears complete under its name or not at all.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let bad = |msg: String| Error::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let mut infos = Vec::with_capacity(tensors.len());
    let mut cpu = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, t) in tensors {
        let dtype = dtype_of(t.kind()).ok_or_else(|| {
            bad(format!(
                "tensor `{name}` has kind {:?}, which safetensors cannot store",
                t.kind()
            ))
        })?;
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let nbytes = t.numel() * t.kind().elt_size_in_bytes();
        let shape = t.size().iter().map(|&d| d as usize).collect();
        let info = safetensors::tensor::TensorInfo {
            dtype,
            shape,
            data_offsets: (offset, offset + nbytes),
        };
        infos.push((name.clone(), info));
        offset += nbytes;
        cpu.push(t);
    }
    let head = header_bytes(infos, metadata).map_err(|e| bad(e.to_string()))?;
    write_atomic(path, |w| {
        w.write_all(&(head.len() as u64).to_le_bytes())?;
        w.write_all(&head)?;
        for t in &cpu {
            let mut buf = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
            t.copy_data_u8(&mut buf, t.numel());
            w.write_all(&buf)?;
        }
        Ok(())
    })
}

/// The header JSON of `infos` (in their order, after `__metadata__`), padded
/// with spaces to a multiple of 8 bytes; the crate's [`Metadata`] validates it.
fn header_bytes(
    infos: Vec<(String, safetensors::tensor::TensorInfo)>,
    metadata: &BTreeMap<String, String>,
) -> std::result::Result<Vec<u8>, SafeTensorError> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    for (name, info) in &infos {
        header.insert(name.clone(), serde_json::to_value(info)?);
    }
    Metadata::new(None, infos)?;
    let mut head = serde_json::to_vec(&header)?;
    head.resize(head.len().next_multiple_of(8), b' ');
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_truncation_is_reported() {
        let dir = std::env::temp_dir().join(format!("dg-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.safetensors");
        let a = Tensor::from_slice(&[1.5f32, -2.0, 3.25, 4.0]).reshape([2, 2]);
        let b = Tensor::from_slice(&[7i64, 8, 9]);
        write_safetensors(
            &p,
            &[
                ("a".into(), a.shallow_clone()),
                ("b".into(), b.shallow_clone()),
            ],
            &BTreeMap::new(),
        )
        .unwrap();
        // the bytes the format prescribes: header in the given order, padded to 8
        let bytes = std::fs::read(&p).unwrap();
        let head = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"I64","shape":[3],"data_offsets":[16,40]}}"#;
        let padded = head.len().next_multiple_of(8);
        assert_eq!(&bytes[..8], &(padded as u64).to_le_bytes());
        assert_eq!(&bytes[8..8 + head.len()], head.as_bytes());
        assert!(bytes[8 + head.len()..8 + padded].iter().all(|&b| b == b' '));
        assert_eq!(bytes.len(), 8 + padded + 40);
        assert_eq!(&bytes[8 + padded..8 + padded + 4], &1.5f32.to_le_bytes());
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.names().collect::<Vec<_>>(), vec!["a", "b"]);
        assert!(f.tensor("a").unwrap().equal(&a));
        assert!(f.tensor("b").unwrap().equal(&b));
        let err = f.tensor("c").unwrap_err().to_string();
        assert!(err.contains("missing tensor `c`"), "{err}");

        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
        let err = SafetensorsFile::open(&p)
            .err()
            .expect("truncated file must fail")
            .to_string();
        assert!(
            err.contains("a.safetensors") && err.contains("truncated"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file with `header` (JSON) and `data` bytes.
    fn raw(path: &Path, header: &str, data: usize) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data, 0);
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn bad_headers_are_named() {
        let dir = std::env::temp_dir().join(format!("dg-st-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.safetensors");
        let err = |header: &str, data: usize| {
            raw(&p, header, data);
            SafetensorsFile::open(&p).err().unwrap().to_string()
        };
        let e = err(
            r#"{"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}"#,
            2,
        );
        assert!(
            e.contains("x.safetensors") && e.contains("`w` has dtype F8_E4M3"),
            "{e}"
        );
        let e = err(
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        );
        assert!(e.contains("tensor `w`: data_offsets"), "{e}");
        let e = err(
            r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
        );
        assert!(e.contains("another size than its shape"), "{e}");
        let e = err(
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            9,
        );
        assert!(e.contains("do not cover the 9 data bytes"), "{e}");
        let e = err(
            r#"{"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#,
            8,
        );
        assert!(e.contains("not valid JSON for safetensors"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
