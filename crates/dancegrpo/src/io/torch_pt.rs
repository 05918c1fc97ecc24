//! PyTorch `torch.save` checkpoints (the zip format of torch >= 1.6), read
//! without executing any pickled code.
//!
//! Layout: `<root>/data.pkl` (the pickled object), `<root>/data/<key>` (one raw
//! storage per key), `<root>/byteorder` (`little`), `<root>/version`. The pickle
//! is interpreted by [`crate::io::pickle`] with only the globals that rebuild
//! tensors allowed; each tensor is rebuilt from (storage, offset, size, stride)
//! and copied into a contiguous CPU tensor of the storage's dtype.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::io::pickle::{unpickle, Value};

/// Globals a checkpoint may reference (none of them is ever called).
fn allowed_global(module: &str, name: &str) -> bool {
    match module {
        "collections" => name == "OrderedDict",
        "torch._utils" => matches!(
            name,
            "_rebuild_tensor_v2" | "_rebuild_parameter" | "_rebuild_parameter_with_state"
        ),
        "torch" => storage_kind(name).is_some(),
        "torch.storage" => name == "UntypedStorage",
        _ => false,
    }
}

/// The element kind of a storage class (`FloatStorage` -> float32).
fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" | "UntypedStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

fn elem_size(kind: Kind) -> usize {
    match kind {
        Kind::Double | Kind::Int64 => 8,
        Kind::Float | Kind::Int => 4,
        Kind::Half | Kind::BFloat16 | Kind::Int16 => 2,
        _ => 1,
    }
}

/// Reads every tensor of a `torch.save` checkpoint: the entries of its
/// `state_dict` (when the top-level dict has one) or of the top-level dict,
/// nested dicts flattened with `.`; a `module.` prefix shared by every key is
/// removed. Tensors are contiguous CPU tensors of their stored dtype.
pub fn read_torch_pt(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut out = read_archive(path, |value, rebuild| {
        let top = match value {
            Value::Dict(d) => {
                let sd = d.borrow().iter().find_map(|(k, v)| match (k, v) {
                    (Value::Str(k), Value::Dict(_)) if k == "state_dict" => Some(v.clone()),
                    _ => None,
                });
                sd.unwrap_or_else(|| value.clone())
            }
            other => return Err(format!(
                "the pickled object has type {}, expected a dict of tensors or {{\"state_dict\": {{...}}}}",
                other.type_name()
            )
            .into()),
        };
        let mut out = Vec::new();
        rebuild.collect("", &top, 0, &mut out)?;
        Ok(out)
    })?;
    if out.is_empty() {
        return Err(Error::TorchCheckpoint {
            path: path.to_path_buf(),
            msg: "the checkpoint holds no tensors".into(),
        });
    }
    if out.iter().all(|(n, _)| n.starts_with("module.")) {
        for (n, _) in out.iter_mut() {
            *n = n["module.".len()..].to_string();
        }
    }
    Ok(out)
}

/// Reads a `torch.save(tensor, path)` file: the pickled object must be one bare
/// tensor (views of a larger storage included, as `torch.save(batch[i])` writes
/// them). Returns a contiguous CPU tensor of the stored dtype.
pub fn read_torch_pt_tensor(path: &Path) -> Result<Tensor> {
    read_archive(path, |value, rebuild| match value {
        Value::Object { .. } => rebuild.tensor(value),
        other => Err(format!(
            "the pickled object has type {}, expected a single tensor",
            other.type_name()
        )
        .into()),
    })
}

/// Opens the zip archive of `path`, checks its byte order, unpickles `data.pkl`
/// with the allow-list, and hands the object and a tensor rebuilder to `f`.
fn read_archive<T>(
    path: &Path,
    f: impl FnOnce(&Value, &mut Rebuilder<'_>) -> std::result::Result<T, Failure>,
) -> Result<T> {
    let err = |msg: String| Error::TorchCheckpoint {
        path: path.to_path_buf(),
        msg,
    };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        err(format!(
            "not a torch zip checkpoint ({e}); legacy (pre-1.6) .pt files are not supported"
        ))
    })?;
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    let pkl = names
        .iter()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| n.len())
        .ok_or_else(|| err("no `data.pkl` in the archive".into()))?
        .clone();
    let root = pkl.strip_suffix("data.pkl").unwrap_or("").to_string();
    let mut read = |name: &str| -> Result<Vec<u8>> {
        let mut f = zip
            .by_name(name)
            .map_err(|e| err(format!("archive entry `{name}`: {e}")))?;
        let mut buf = Vec::with_capacity(f.size().min(1 << 30) as usize);
        f.read_to_end(&mut buf).map_err(|e| Error::io(path, e))?;
        Ok(buf)
    };
    let byteorder_name = format!("{root}byteorder");
    if names.contains(&byteorder_name) {
        let order = read(&byteorder_name)?;
        if order.trim_ascii() != b"little" {
            return Err(err(format!(
                "byte order `{}` is not supported (only little-endian)",
                String::from_utf8_lossy(&order)
            )));
        }
    }
    let data = read(&pkl)?;
    let value = unpickle(&data, &allowed_global).map_err(|m| err(format!("{pkl}: {m}")))?;

    let mut rebuild = Rebuilder {
        storages: HashMap::new(),
        read_storage: &mut |key: &str| read(&format!("{root}data/{key}")),
    };
    f(&value, &mut rebuild).map_err(|e| match e {
        Failure::Msg(m) => err(m),
        Failure::Other(e) => e,
    })
}

enum Failure {
    Msg(String),
    Other(Error),
}

impl From<String> for Failure {
    fn from(m: String) -> Self {
        Failure::Msg(m)
    }
}

impl From<&str> for Failure {
    fn from(m: &str) -> Self {
        Failure::Msg(m.to_string())
    }
}

impl From<tch::TchError> for Failure {
    fn from(e: tch::TchError) -> Self {
        Failure::Other(e.into())
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Other(e)
    }
}

/// The deepest nesting of dicts accepted (pickles can be cyclic).
const MAX_DEPTH: usize = 32;

struct Rebuilder<'r> {
    storages: HashMap<String, Tensor>,
    read_storage: &'r mut dyn FnMut(&str) -> Result<Vec<u8>>,
}

impl Rebuilder<'_> {
    fn collect(
        &mut self,
        prefix: &str,
        v: &Value,
        depth: usize,
        out: &mut Vec<(String, Tensor)>,
    ) -> std::result::Result<(), Failure> {
        if depth > MAX_DEPTH {
            return Err(
                format!("dicts nested deeper than {MAX_DEPTH} levels at `{prefix}`").into(),
            );
        }
        let Value::Dict(d) = v else {
            return Err(format!("`{prefix}` has type {}, expected a dict", v.type_name()).into());
        };
        for (k, v) in d.borrow().iter() {
            let Value::Str(k) = k else {
                return Err(format!(
                    "a key of `{prefix}` has type {}, expected str",
                    k.type_name()
                )
                .into());
            };
            let name = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Dict(_) => self.collect(&name, v, depth + 1, out)?,
                _ => {
                    let t = self.tensor(v).map_err(|f| match f {
                        Failure::Msg(m) => Failure::Msg(format!("`{name}`: {m}")),
                        other => other,
                    })?;
                    out.push((name, t));
                }
            }
        }
        Ok(())
    }

    fn tensor(&mut self, v: &Value) -> std::result::Result<Tensor, Failure> {
        let Value::Object { callable, args, .. } = v else {
            return Err(format!("has type {}, expected a tensor", v.type_name()).into());
        };
        match callable.as_str() {
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
                let data = args.first().ok_or("parameter without data")?;
                self.tensor(data)
            }
            "torch._utils._rebuild_tensor_v2" => {
                if args.len() < 4 {
                    return Err(format!("_rebuild_tensor_v2 with {} arguments", args.len()).into());
                }
                let storage = self.storage(&args[0])?;
                let offset = int(&args[1], "storage offset")?;
                let size = ints(&args[2], "size")?;
                let stride = ints(&args[3], "stride")?;
                strided(&storage, offset, &size, &stride).map_err(Failure::Msg)
            }
            other => Err(format!("`{other}(...)` is not a tensor").into()),
        }
    }

    fn storage(&mut self, v: &Value) -> std::result::Result<Tensor, Failure> {
        let Value::Persistent(pid) = v else {
            return Err(format!(
                "tensor storage has type {}, expected a persistent id",
                v.type_name()
            )
            .into());
        };
        let Value::Tuple(fields) = pid.as_ref() else {
            return Err("persistent id is not a tuple".to_string().into());
        };
        let (ty, key, numel) = match fields.as_slice() {
            [Value::Str(tag), Value::Global(ty), Value::Str(key), Value::Str(_location), Value::Int(numel)]
                if tag == "storage" =>
            {
                (ty, key, *numel)
            }
            _ => {
                return Err(
                    "persistent id is not (\"storage\", type, key, location, numel)"
                        .to_string()
                        .into(),
                )
            }
        };
        let kind = ty
            .rsplit('.')
            .next()
            .and_then(storage_kind)
            .ok_or_else(|| format!("storage type `{ty}` is not supported"))?;
        if let Some(t) = self.storages.get(key) {
            return Ok(t.shallow_clone());
        }
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("storage key `{key}` is not a plain name").into());
        }
        let bytes = (self.read_storage)(key)?;
        let numel =
            usize::try_from(numel).map_err(|_| format!("storage `{key}` has negative size"))?;
        let need = numel
            .checked_mul(elem_size(kind))
            .ok_or_else(|| format!("storage `{key}` is too large"))?;
        if bytes.len() < need {
            return Err(format!(
                "storage `{key}` has {} bytes, {numel} elements of {kind:?} need {need}",
                bytes.len()
            )
            .into());
        }
        let t = Tensor::f_from_data_size(&bytes[..need], &[numel as i64], kind)?;
        self.storages.insert(key.clone(), t.shallow_clone());
        Ok(t)
    }
}

/// The storage class `torch.save` names for a dtype.
fn storage_name(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Float => "FloatStorage",
        Kind::Double => "DoubleStorage",
        Kind::Half => "HalfStorage",
        Kind::BFloat16 => "BFloat16Storage",
        Kind::Int64 => "LongStorage",
        Kind::Int => "IntStorage",
        Kind::Int16 => "ShortStorage",
        Kind::Int8 => "CharStorage",
        Kind::Uint8 => "ByteStorage",
        Kind::Bool => "BoolStorage",
        _ => return None,
    })
}

/// Writes what `torch.save(tensor, path)` writes for a contiguous tensor (zip
/// format, protocol-2 pickle of `_rebuild_tensor_v2`); `torch.load` reads it back
/// (also with `weights_only=True`). Written atomically.
pub fn write_torch_pt_tensor(path: &Path, tensor: &Tensor) -> Result<()> {
    let t = tensor.to_device(tch::Device::Cpu).contiguous();
    let size = t.size();
    let mut stride = vec![1i64; size.len()];
    for d in (0..size.len().saturating_sub(1)).rev() {
        stride[d] = stride[d + 1] * size[d + 1].max(1);
    }
    write_torch_pt_view(path, &t.flatten(0, -1), 0, &size, &stride)
}

/// Writes `torch.save(view)` for a view `(offset, size, stride)` of the 1-d
/// `storage`: the whole storage is saved, as PyTorch does for a slice such as
/// `batch[i]`. Written atomically.
pub fn write_torch_pt_view(
    path: &Path,
    storage: &Tensor,
    offset: i64,
    size: &[i64],
    stride: &[i64],
) -> Result<()> {
    let err = |msg: String| Error::TorchCheckpoint {
        path: path.to_path_buf(),
        msg,
    };
    let storage = storage.to_device(tch::Device::Cpu).contiguous();
    if storage.dim() != 1 {
        return Err(err(format!(
            "storage must be 1-d, got {:?}",
            storage.size()
        )));
    }
    let kind = storage.kind();
    let class = storage_name(kind).ok_or_else(|| err(format!("dtype {kind:?} unsupported")))?;
    let numel = storage.numel();
    // the view must lie inside the storage
    let _ = strided(&storage, offset, size, stride).map_err(err)?;

    let pickle = rebuild_pickle(class, numel as i64, offset, size, stride);
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    storage.copy_data_u8(&mut data, numel);
    write_archive(path, &pickle, &data)
}

/// The protocol-2 pickle of `_rebuild_tensor_v2(storage, offset, size,
/// stride, False, OrderedDict())` with `storage` the persistent id of a
/// `class` storage `"0"` of `numel` elements on the CPU.
fn rebuild_pickle(class: &str, numel: i64, offset: i64, size: &[i64], stride: &[i64]) -> Vec<u8> {
    let mut p: Vec<u8> = vec![0x80, 2];
    let global =
        |p: &mut Vec<u8>, m: &str, n: &str| p.extend_from_slice(format!("c{m}\n{n}\n").as_bytes());
    let string = |p: &mut Vec<u8>, s: &str| {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    };
    let long = |p: &mut Vec<u8>, v: i64| {
        p.extend([0x8a, 8]);
        p.extend(v.to_le_bytes());
    };
    global(&mut p, "torch._utils", "_rebuild_tensor_v2");
    p.extend(b"((");
    string(&mut p, "storage");
    global(&mut p, "torch", class);
    string(&mut p, "0");
    string(&mut p, "cpu");
    long(&mut p, numel);
    p.extend(b"tQ");
    long(&mut p, offset);
    p.push(b'(');
    for &s in size {
        long(&mut p, s);
    }
    p.extend(b"t(");
    for &s in stride {
        long(&mut p, s);
    }
    p.push(b't');
    p.push(0x89); // requires_grad = False
    global(&mut p, "collections", "OrderedDict");
    p.extend(b")RtR.");
    p
}

/// `torch.save`'s zip archive (stored, not compressed) of one pickle and one
/// storage's bytes, written atomically.
fn write_archive(path: &Path, pickle: &[u8], data: &[u8]) -> Result<()> {
    crate::io::atomic::write_atomic(path, |w| {
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts =
            zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
        let to_io = |e: zip::result::ZipError| std::io::Error::other(e.to_string());
        for (name, bytes) in [
            ("archive/data.pkl", pickle),
            ("archive/byteorder", b"little".as_slice()),
            ("archive/data/0", data),
            ("archive/version", b"3\n".as_slice()),
        ] {
            zip.start_file(name, opts).map_err(to_io)?;
            std::io::Write::write_all(&mut zip, bytes)?;
        }
        let bytes = zip.finish().map_err(to_io)?.into_inner();
        w.write_all(&bytes)
    })
}

fn int(v: &Value, what: &str) -> std::result::Result<i64, String> {
    match v {
        Value::Int(i) => Ok(*i),
        other => Err(format!(
            "{what} has type {}, expected int",
            other.type_name()
        )),
    }
}

fn ints(v: &Value, what: &str) -> std::result::Result<Vec<i64>, String> {
    match v {
        Value::Tuple(items) => items.iter().map(|i| int(i, what)).collect(),
        other => Err(format!(
            "{what} has type {}, expected a tuple",
            other.type_name()
        )),
    }
}

/// `storage.as_strided(size, stride, offset)` copied to a contiguous tensor,
/// after checking that every element lies inside the storage.
fn strided(
    storage: &Tensor,
    offset: i64,
    size: &[i64],
    stride: &[i64],
) -> std::result::Result<Tensor, String> {
    if size.len() != stride.len() {
        return Err(format!(
            "size {size:?} and stride {stride:?} differ in length"
        ));
    }
    if offset < 0 || size.iter().any(|&s| s < 0) || stride.iter().any(|&s| s < 0) {
        return Err(format!(
            "negative offset/size/stride ({offset}, {size:?}, {stride:?})"
        ));
    }
    let len = storage.size()[0] as i128;
    if !size.contains(&0) {
        let last: i128 = offset as i128
            + size
                .iter()
                .zip(stride)
                .map(|(&n, &s)| (n as i128 - 1) * s as i128)
                .sum::<i128>();
        if last >= len {
            return Err(format!(
                "view (offset {offset}, size {size:?}, stride {stride:?}) reaches element {last} of a storage of {len}"
            ));
        }
    }
    let view = storage
        .f_as_strided(size, stride, Some(offset))
        .map_err(|e| e.to_string())?;
    // A fresh contiguous copy: tensors sharing a storage must not alias.
    let mut out =
        Tensor::f_empty(size, (storage.kind(), tch::Device::Cpu)).map_err(|e| e.to_string())?;
    out.f_copy_(&view).map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("dg-pt-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn bare_tensor_round_trips_in_every_dtype() {
        let dir = temp("bare");
        let path = dir.join("t.pt");
        let base = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).view([3, 4]) - 5.5;
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Int64] {
            let t = base.to_kind(kind);
            write_torch_pt_tensor(&path, &t).unwrap();
            let back = read_torch_pt_tensor(&path).unwrap();
            assert_eq!(back.kind(), kind);
            assert_eq!(back.size(), [3, 4]);
            assert!(back.equal(&t), "{kind:?}");
        }
        // a dict checkpoint is not a bare tensor, and a bare tensor is not a dict
        let e = read_torch_pt(&path).unwrap_err().to_string();
        assert!(e.contains("expected a dict"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_row_of_a_batch_is_read_from_its_offset() {
        // torch.save(batch[1]) for a (3, 2, 2) batch saves the whole storage
        let dir = temp("view");
        let path = dir.join("row.pt");
        let batch = Tensor::arange(12, (Kind::Float, tch::Device::Cpu));
        write_torch_pt_view(&path, &batch, 4, &[2, 2], &[2, 1]).unwrap();
        let t = read_torch_pt_tensor(&path).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap(),
            [4., 5., 6., 7.]
        );
        // a view past the storage is refused when writing
        assert!(write_torch_pt_view(&path, &batch, 10, &[2, 2], &[2, 1]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
