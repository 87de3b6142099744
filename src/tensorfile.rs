//! Reading and writing safetensors files.
//!
//! Reading memory-maps the file and validates the header (offsets inside the file, sizes that
//! match shapes and dtypes) before any tensor is touched; tensors are converted to f32 one at a
//! time. Writing goes to a temporary file in the same folder that is renamed into place, so a
//! failed run never leaves a partial output behind.

use crate::{Error, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Element types this engine reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// IEEE float32.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE float16.
    F16,
}

impl Dtype {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "F32" => Some(Dtype::F32),
            "BF16" => Some(Dtype::BF16),
            "F16" => Some(Dtype::F16),
            _ => None,
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            _ => 2,
        }
    }
    /// The safetensors name (`F32`, `BF16`, `F16`).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::BF16 => "BF16",
            Dtype::F16 => "F16",
        }
    }
}

/// One tensor's entry in the header.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A memory-mapped safetensors file with a validated header.
pub struct TensorFile {
    path: PathBuf,
    map: memmap2::Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// Opens and validates `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a concurrent truncation by another process could fault,
        // which is the documented limitation of memory-mapped model files.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bad = |m: String| {
            Error::format(format!(
                "{}: not a valid safetensors file: {m}",
                path.display()
            ))
        };
        if map.len() < 8 {
            return Err(bad(format!(
                "{} bytes is too short for a header",
                map.len()
            )));
        }
        let mut n8 = [0u8; 8];
        n8.copy_from_slice(&map[..8]);
        let n = u64::from_le_bytes(n8);
        if n > (map.len() - 8) as u64 || n > 100 << 20 {
            return Err(bad(format!(
                "header length {n} exceeds the file size {} (truncated file?)",
                map.len()
            )));
        }
        let data_start = 8 + n as usize;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&map[8..data_start])
                .map_err(|e| bad(format!("header JSON: {e}")))?;
        let data_len = map.len() - data_start;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, v) in header {
            if name == "__metadata__" {
                if let Some(m) = v.as_object() {
                    for (k, v) in m {
                        metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                    }
                }
                continue;
            }
            let dt = v.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
            let dtype = Dtype::parse(dt).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` has unsupported dtype {dt} (F32, BF16, F16 are supported)"
                ))
            })?;
            let shape: Vec<usize> = v
                .get("shape")
                .and_then(|s| s.as_array())
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
                .ok_or_else(|| bad(format!("tensor `{name}` has no valid shape")))?;
            let off: Vec<usize> = v
                .get("data_offsets")
                .and_then(|s| s.as_array())
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
                .filter(|o: &Vec<usize>| o.len() == 2)
                .ok_or_else(|| bad(format!("tensor `{name}` has no valid data_offsets")))?;
            let (start, end) = (off[0], off[1]);
            let want = shape
                .iter()
                .try_fold(dtype.size(), |a, &b| a.checked_mul(b))
                .ok_or_else(|| bad(format!("tensor `{name}` shape overflows")))?;
            if start > end || end > data_len {
                return Err(bad(format!(
                    "tensor `{name}` data [{start}, {end}) lies outside the {data_len} data bytes (truncated file?)"
                )));
            }
            if end - start != want {
                return Err(bad(format!(
                    "tensor `{name}` holds {} bytes but shape {shape:?} {dt} needs {want}",
                    end - start
                )));
            }
            tensors.insert(
                name,
                TensorInfo {
                    dtype,
                    shape,
                    start,
                    end,
                },
            );
        }
        Ok(TensorFile {
            path: path.to_path_buf(),
            map,
            data_start,
            tensors,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names and entries.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// The `__metadata__` strings.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Converts tensor `name` to f32, checking its shape when `shape` is given.
    pub fn tensor_f32(&self, name: &str, shape: Option<&[usize]>) -> Result<Vec<f32>> {
        let info = self.tensors.get(name).ok_or_else(|| {
            Error::format(format!("{}: missing tensor `{name}`", self.path.display()))
        })?;
        if let Some(s) = shape {
            if info.shape != s {
                return Err(Error::format(format!(
                    "{}: tensor `{name}` has shape {:?}, expected {:?}",
                    self.path.display(),
                    info.shape,
                    s
                )));
            }
        }
        Ok(self.convert(info))
    }

    /// Converts the data of an entry of this file to f32.
    pub fn convert(&self, info: &TensorInfo) -> Vec<f32> {
        let raw = &self.map[self.data_start + info.start..self.data_start + info.end];
        match info.dtype {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }
}

/// A tensor to write: name, shape, f32 data.
pub type OutTensor<'a> = (&'a str, Vec<usize>, &'a [f32]);

/// Writes f32 tensors and string metadata to `path` atomically (temp file + rename).
pub fn write_f32(
    path: &Path,
    tensors: &[OutTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).unwrap_or_default(),
        );
    }
    let mut off = 0usize;
    for (name, shape, data) in tensors {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Internal(format!(
                "tensor {name}: shape {shape:?} but {} values",
                data.len()
            )));
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + 4 * n]}),
        );
        off += 4 * n;
    }
    let mut h = serde_json::to_vec(&header).map_err(|e| Error::Internal(e.to_string()))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|s| s.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(&(h.len() as u64).to_le_bytes())?;
        f.write_all(&h)?;
        for (_, _, data) in tensors {
            for v in data.iter() {
                f.write_all(&v.to_le_bytes())?;
            }
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}
