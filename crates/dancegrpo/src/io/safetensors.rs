//! Safetensors files: memory-mapped reading with full header validation, and
//! atomic writing.
//!
//! Format: an 8-byte little-endian header length `n`, `n` bytes of JSON mapping
//! tensor names to `{dtype, shape, data_offsets: [begin, end]}` (offsets relative
//! to the end of the header), an optional `__metadata__` map of strings, then the
//! raw little-endian tensor data.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;

/// Element types a safetensors file may hold (the subset libtorch can represent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// 64-bit float.
    F64,
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// 16-bit signed integer.
    I16,
    /// 8-bit signed integer.
    I8,
    /// 8-bit unsigned integer.
    U8,
    /// Boolean (one byte).
    Bool,
}

impl Dtype {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F64" => Dtype::F64,
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "I16" => Dtype::I16,
            "I8" => Dtype::I8,
            "U8" => Dtype::U8,
            "BOOL" => Dtype::Bool,
            _ => return None,
        })
    }

    /// The name used in safetensors headers.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
        }
    }

    /// The matching libtorch kind.
    pub fn kind(self) -> Kind {
        match self {
            Dtype::F64 => Kind::Double,
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::I64 => Kind::Int64,
            Dtype::I32 => Kind::Int,
            Dtype::I16 => Kind::Int16,
            Dtype::I8 => Kind::Int8,
            Dtype::U8 => Kind::Uint8,
            Dtype::Bool => Kind::Bool,
        }
    }

    /// The dtype for a libtorch kind, if safetensors can store it.
    pub fn from_kind(kind: Kind) -> Option<Self> {
        Some(match kind {
            Kind::Double => Dtype::F64,
            Kind::Float => Dtype::F32,
            Kind::Half => Dtype::F16,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Int64 => Dtype::I64,
            Kind::Int => Dtype::I32,
            Kind::Int16 => Dtype::I16,
            Kind::Int8 => Dtype::I8,
            Kind::Uint8 => Dtype::U8,
            Kind::Bool => Dtype::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }
}

/// Where one tensor lives in a file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Shape (empty for a scalar).
    pub shape: Vec<i64>,
    /// Byte range in the data section.
    pub range: std::ops::Range<usize>,
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
        let (data_start, tensors, metadata) =
            parse_header(&mmap).map_err(|msg| Error::Safetensors {
                path: path.clone(),
                msg,
            })?;
        Ok(SafetensorsFile {
            path,
            mmap,
            data_start,
            tensors,
            metadata,
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
        Ok(Tensor::f_from_data_size(
            bytes,
            &info.shape,
            info.dtype.kind(),
        )?)
    }
}

type Header = (
    usize,
    BTreeMap<String, TensorInfo>,
    BTreeMap<String, String>,
);

fn parse_header(buf: &[u8]) -> std::result::Result<Header, String> {
    if buf.len() < 8 {
        return Err(format!(
            "file is {} bytes, shorter than the 8-byte header length",
            buf.len()
        ));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")) as usize;
    if n > buf.len() - 8 {
        return Err(format!(
            "header length {n} exceeds the file size {} (truncated?)",
            buf.len()
        ));
    }
    let json: serde_json::Value = serde_json::from_slice(&buf[8..8 + n])
        .map_err(|e| format!("header is not valid JSON: {e}"))?;
    let obj = json.as_object().ok_or("header is not a JSON object")?;
    let data_len = buf.len() - 8 - n;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, value) in obj {
        if name == "__metadata__" {
            metadata = parse_metadata(value)?;
            continue;
        }
        let info = parse_info(name, value)?;
        if info.range.end > data_len {
            return Err(format!(
                "tensor `{name}` ends at data byte {} but the data section has only {data_len} bytes (truncated file?)",
                info.range.end
            ));
        }
        tensors.insert(name.clone(), info);
    }
    Ok((8 + n, tensors, metadata))
}

fn parse_metadata(
    value: &serde_json::Value,
) -> std::result::Result<BTreeMap<String, String>, String> {
    let obj = value.as_object().ok_or("`__metadata__` is not an object")?;
    obj.iter()
        .map(|(k, v)| match v.as_str() {
            Some(s) => Ok((k.clone(), s.to_string())),
            None => Err(format!("`__metadata__.{k}` is not a string")),
        })
        .collect()
}

fn parse_info(name: &str, value: &serde_json::Value) -> std::result::Result<TensorInfo, String> {
    let bad = |what: &str| format!("tensor `{name}`: {what}");
    let dtype_s = value
        .get("dtype")
        .and_then(|d| d.as_str())
        .ok_or_else(|| bad("no dtype"))?;
    let dtype =
        Dtype::parse(dtype_s).ok_or_else(|| bad(&format!("unsupported dtype {dtype_s}")))?;
    let shape: Vec<i64> = value
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or_else(|| bad("no shape"))?
        .iter()
        .map(|d| {
            d.as_u64()
                .map(|d| d as i64)
                .ok_or_else(|| bad("shape entry is not an integer"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let offs = value
        .get("data_offsets")
        .and_then(|o| o.as_array())
        .filter(|o| o.len() == 2)
        .ok_or_else(|| bad("no data_offsets pair"))?;
    let (b, e) = match (offs[0].as_u64(), offs[1].as_u64()) {
        (Some(b), Some(e)) if b <= e => (b as usize, e as usize),
        _ => return Err(bad("invalid data_offsets")),
    };
    let numel: i64 = shape.iter().product();
    if (e - b) as i64 != numel * dtype.size() as i64 {
        return Err(bad(&format!(
            "data_offsets span {} bytes but shape {shape:?} of {dtype_s} needs {}",
            e - b,
            numel * dtype.size() as i64
        )));
    }
    Ok(TensorInfo {
        dtype,
        shape,
        range: b..e,
    })
}

/// Writes `tensors` (any device, contiguous or not) to `path` atomically: the
/// file appears complete under its name or not at all.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("strings"),
        );
    }
    let mut cpu = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, t) in tensors {
        let dtype = Dtype::from_kind(t.kind()).ok_or_else(|| Error::Safetensors {
            path: path.to_path_buf(),
            msg: format!(
                "tensor `{name}` has kind {:?}, which safetensors cannot store",
                t.kind()
            ),
        })?;
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let nbytes = t.numel() * dtype.size();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.name(), "shape": t.size(), "data_offsets": [offset, offset + nbytes]}),
        );
        offset += nbytes;
        cpu.push(t);
    }
    let mut head = serde_json::to_vec(&header).expect("serialisable header");
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
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
}
