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

impl TensorInfo {
    /// Number of elements (the product of the shape; the header check guarantees it fits).
    pub fn elements(&self) -> usize {
        (self.end - self.start) / self.dtype.size()
    }
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
        Self::open_impl(path, false)
    }

    /// Opens and validates `path` like [`TensorFile::open`], except that `I64` tensors (the
    /// token ids `encode-prompt` writes next to `prompt_embeds`) are checked and left out
    /// instead of refused.
    pub fn open_skipping_ids(path: &Path) -> Result<Self> {
        Self::open_impl(path, true)
    }

    fn open_impl(path: &Path, skip_i64: bool) -> Result<Self> {
        let map = map_regular_file(path)?;
        let bad = |m: String| invalid(path, m);
        let (header, data_start) = read_header(&map, bad)?;
        let data_len = map.len() - data_start;
        let mut tensors = BTreeMap::new();
        // Every name, skipped I64 tensors included: a duplicate is an error either way.
        let mut seen = std::collections::HashSet::new();
        let mut metadata = None;
        for (name, v) in header.0 {
            if name == "__metadata__" {
                if metadata.is_some() {
                    return Err(bad("`__metadata__` appears twice in the header".into()));
                }
                metadata = Some(parse_metadata(&v, bad)?);
                continue;
            }
            if !seen.insert(name.clone()) {
                return Err(bad(format!("tensor `{name}` appears twice in the header")));
            }
            if let Some(info) = parse_entry(&name, &v, skip_i64, data_len, bad)? {
                tensors.insert(name, info);
            }
        }
        check_no_overlap(&tensors, bad)?;
        Ok(TensorFile {
            path: path.to_path_buf(),
            map,
            data_start,
            tensors,
            metadata: metadata.unwrap_or_default(),
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
        crate::host_memory::ensure(info.elements().saturating_mul(4), || {
            format!(
                "{}: tensor `{name}` {:?} (as f32)",
                self.path.display(),
                info.shape
            )
        })?;
        Ok(self.convert(info))
    }

    /// The raw little-endian bytes of an entry of this file, still memory-mapped: large
    /// weights (the text encoder's) are converted a tile at a time from here instead of as a
    /// whole f32 copy.
    pub fn raw(&self, info: &TensorInfo) -> &[u8] {
        &self.map[self.data_start + info.start..self.data_start + info.end]
    }

    /// Converts the data of an entry of this file to f32, in parallel chunks: loading is
    /// part of every run's time, and the page faults of the map and of the new vector are
    /// the bulk of it.
    pub fn convert(&self, info: &TensorInfo) -> Vec<f32> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        let raw = self.raw(info);
        let size = match info.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
        };
        let mut out = vec![0f32; raw.len() / size];
        out.par_chunks_mut(CHUNK)
            .zip(raw.par_chunks(CHUNK * size))
            .for_each(|(o, r)| match info.dtype {
                Dtype::F32 => o.iter_mut().zip(r.chunks_exact(4)).for_each(|(v, b)| {
                    *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }),
                Dtype::BF16 => o.iter_mut().zip(r.chunks_exact(2)).for_each(|(v, b)| {
                    *v = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }),
                Dtype::F16 => o.iter_mut().zip(r.chunks_exact(2)).for_each(|(v, b)| {
                    *v = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }),
            });
        out
    }
}

/// The format error of an invalid safetensors file at `path`.
fn invalid(path: &Path, m: String) -> Error {
    Error::format(format!(
        "{}: not a valid safetensors file: {m}",
        path.display()
    ))
}

/// Memory-maps `path`, which must be a regular file: a directory, FIFO or device is refused
/// without a blocking open (opening a FIFO would block until some other process writes to
/// it), checked on the open file ([`crate::files::open_regular_file`]).
fn map_regular_file(path: &Path) -> Result<memmap2::Mmap> {
    let (file, _) = crate::files::open_regular_file(path, "a safetensors file")?;
    // SAFETY: the map is read-only; a concurrent truncation by another process could fault,
    // which is the documented limitation of memory-mapped model files.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// The header's entries in file order and where the data starts, after checking the header
/// length against the file (and a 100 MiB cap) before reading it.
fn read_header(map: &[u8], bad: impl Fn(String) -> Error) -> Result<(HeaderEntries, usize)> {
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
    let header: HeaderEntries = serde_json::from_slice(&map[8..data_start])
        .map_err(|e| bad(format!("header JSON: {e}")))?;
    Ok((header, data_start))
}

/// The `__metadata__` entry: an object of strings.
fn parse_metadata(
    v: &serde_json::Value,
    bad: impl Fn(String) -> Error,
) -> Result<BTreeMap<String, String>> {
    let m = v.as_object().ok_or_else(|| {
        bad(format!(
            "`__metadata__` must be an object of strings, got {}",
            json_brief(v)
        ))
    })?;
    let mut metadata = BTreeMap::new();
    for (k, v) in m {
        let s = v.as_str().ok_or_else(|| {
            bad(format!(
                "`__metadata__` value `{k}` must be a string, got {}",
                json_brief(v)
            ))
        })?;
        metadata.insert(k.clone(), s.to_string());
    }
    Ok(metadata)
}

/// A list of exactly `len` (any, when `None`) non-negative integers.
fn usize_list(v: Option<&serde_json::Value>, len: Option<usize>) -> Option<Vec<usize>> {
    v.and_then(|s| s.as_array())
        .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
        .filter(|o: &Vec<usize>| len.is_none_or(|n| o.len() == n))
}

/// One tensor entry of the header, checked against the `data_len` data bytes: dtype, shape,
/// offsets, and a byte count that matches the shape. `None` for an `I64` tensor skipped with
/// `skip_i64` (checked with its 8-byte size, then left out).
fn parse_entry(
    name: &str,
    v: &serde_json::Value,
    skip_i64: bool,
    data_len: usize,
    bad: impl Fn(String) -> Error,
) -> Result<Option<TensorInfo>> {
    let entry = v.as_object().ok_or_else(|| {
        bad(format!(
            "tensor `{name}`: the entry must be an object with dtype, shape and data_offsets, got {}",
            json_brief(v)
        ))
    })?;
    let skip = skip_i64 && entry.get("dtype").and_then(|d| d.as_str()) == Some("I64");
    let dtype = match entry.get("dtype") {
        None => return Err(bad(format!("tensor `{name}` has no dtype"))),
        // Sized like F32 below, then checked with its 8-byte size and dropped.
        Some(_) if skip => Dtype::F32,
        Some(d) => d.as_str().and_then(Dtype::parse).ok_or_else(|| {
            bad(format!(
                "tensor `{name}` has unsupported dtype {} (F32, BF16, F16 are supported)",
                d.as_str().map_or_else(|| json_brief(d), str::to_string)
            ))
        })?,
    };
    let shape = usize_list(entry.get("shape"), None).ok_or_else(|| {
        bad(format!(
            "tensor `{name}` has no valid shape (a list of non-negative integers), got {}",
            entry.get("shape").map_or_else(|| "none".into(), json_brief)
        ))
    })?;
    let off = usize_list(entry.get("data_offsets"), Some(2)).ok_or_else(|| {
        bad(format!(
            "tensor `{name}` has no valid data_offsets (two non-negative integers [begin, end]), got {}",
            entry
                .get("data_offsets")
                .map_or_else(|| "none".into(), json_brief)
        ))
    })?;
    let (start, end) = (off[0], off[1]);
    // The byte count, and the element count even when a dimension is 0, must be a valid
    // allocation size, so that nothing computed from the shape can overflow.
    let elem = if skip { 8 } else { dtype.size() };
    let want = shape.iter().try_fold(elem, |a, &b| a.checked_mul(b));
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(elem, |a, &b| a.checked_mul(b));
    let want = match (want, nonzero) {
        (Some(w), Some(nz)) if nz <= isize::MAX as usize => w,
        _ => {
            return Err(bad(format!(
                "tensor `{name}` shape {shape:?} overflows the address space"
            )))
        }
    };
    if start > end {
        return Err(bad(format!(
            "tensor `{name}` has reversed data_offsets [{start}, {end}]"
        )));
    }
    if end > data_len {
        return Err(bad(format!(
            "tensor `{name}` data [{start}, {end}) lies outside the {data_len} data bytes (truncated file?)"
        )));
    }
    if end - start != want {
        let dt = if skip { "I64" } else { dtype.name() };
        return Err(bad(format!(
            "tensor `{name}` holds {} bytes but shape {shape:?} {dt} needs {want}",
            end - start
        )));
    }
    if skip {
        return Ok(None);
    }
    Ok(Some(TensorInfo {
        dtype,
        shape,
        start,
        end,
    }))
}

/// Two tensors must not share bytes (a corrupt or hostile header).
fn check_no_overlap(
    tensors: &BTreeMap<String, TensorInfo>,
    bad: impl Fn(String) -> Error,
) -> Result<()> {
    let mut ranges: Vec<(usize, usize, &str)> = tensors
        .iter()
        .filter(|(_, t)| t.end > t.start)
        .map(|(n, t)| (t.start, t.end, n.as_str()))
        .collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(bad(format!(
                "tensors `{}` [{}, {}) and `{}` [{}, {}) overlap",
                w[0].2, w[0].0, w[0].1, w[1].2, w[1].0, w[1].1
            )));
        }
    }
    Ok(())
}

/// The top-level header object, in file order, duplicates kept (a JSON map would silently keep
/// only the last of two entries with the same name).
struct HeaderEntries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for HeaderEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = HeaderEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<HeaderEntries, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = m.next_entry::<String, serde_json::Value>()? {
                    v.push(e);
                }
                Ok(HeaderEntries(v))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// A JSON value for an error message, cut to a readable length.
fn json_brief(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

/// A tensor to write: name, shape, f32 data.
pub type OutTensor<'a> = (&'a str, Vec<usize>, &'a [f32]);

/// Data of a tensor to write with [`write_tensors`]: f32 values, or i64 (token ids).
#[derive(Clone, Copy, Debug)]
pub enum OutData<'a> {
    /// `F32` values.
    F32(&'a [f32]),
    /// `I64` values.
    I64(&'a [i64]),
}

impl OutData<'_> {
    fn len(&self) -> usize {
        match self {
            OutData::F32(d) => d.len(),
            OutData::I64(d) => d.len(),
        }
    }
    fn dtype(&self) -> (&'static str, usize) {
        match self {
            OutData::F32(_) => ("F32", 4),
            OutData::I64(_) => ("I64", 8),
        }
    }
}

/// The JSON header of a safetensors file holding tensors `(name, shape, dtype name, element
/// size)` stored back to back in `entries` order, padded with spaces to at least `min_len`
/// bytes and to a multiple of 8.
fn header(
    entries: &[(&str, &[usize], &str, usize)],
    metadata: &BTreeMap<String, String>,
    min_len: usize,
) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).unwrap_or_default(),
        );
    }
    let mut off = 0usize;
    for (name, shape, dtype, size) in entries {
        let n = shape
            .iter()
            .try_fold(*size, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::invalid(format!("tensor {name}: shape {shape:?} overflows")))?;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&header).map_err(|e| Error::Internal(e.to_string()))?;
    while h.len() < min_len || h.len() % 8 != 0 {
        h.push(b' ');
    }
    Ok(h)
}

/// The JSON header of a safetensors file holding f32 tensors stored back to back in `entries`
/// order, padded with spaces to at least `min_len` bytes and to a multiple of 8. A streaming
/// writer reserves a padded header, writes the data, then rewrites the header in place with the
/// final shapes (same length), so the data never has to be copied.
pub fn f32_header(
    entries: &[(&str, &[usize])],
    metadata: &BTreeMap<String, String>,
    min_len: usize,
) -> Result<Vec<u8>> {
    let e: Vec<(&str, &[usize], &str, usize)> = entries
        .iter()
        .map(|(name, shape)| (*name, *shape, "F32", 4))
        .collect();
    header(&e, metadata, min_len)
}

/// Writes f32 tensors and string metadata to `path` atomically (temp file + rename).
pub fn write_f32(
    path: &Path,
    tensors: &[OutTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let t: Vec<(&str, Vec<usize>, OutData)> = tensors
        .iter()
        .map(|(n, s, d)| (*n, s.clone(), OutData::F32(d)))
        .collect();
    write_tensors(path, &t, metadata)
}

/// Writes f32 and i64 tensors and string metadata to `path` atomically (temp file + rename).
pub fn write_tensors(
    path: &Path,
    tensors: &[(&str, Vec<usize>, OutData)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut entries = Vec::with_capacity(tensors.len());
    for (name, shape, data) in tensors {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Internal(format!(
                "tensor {name}: shape {shape:?} but {} values",
                data.len()
            )));
        }
        let (dtype, size) = data.dtype();
        entries.push((*name, shape.as_slice(), dtype, size));
    }
    let h = header(&entries, metadata, 0)?;
    crate::files::check_output_target(path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Unique per call: two writers of one path (threads of a library user) must not share it.
    // Created exclusively: whatever already sits at the (predictable) name, a symlink to
    // another file or a FIFO, is neither written through nor opened.
    let (tmp, file) = crate::video::atomic::create_temp_file(dir, path, "tmp", false)
        .map_err(|e| crate::video::atomic::create_error(path, e))?;
    let res = (|| -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(file);
        f.write_all(&(h.len() as u64).to_le_bytes())?;
        f.write_all(&h)?;
        for (_, _, data) in tensors {
            match data {
                OutData::F32(d) => d.iter().try_for_each(|v| f.write_all(&v.to_le_bytes()))?,
                OutData::I64(d) => d.iter().try_for_each(|v| f.write_all(&v.to_le_bytes()))?,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The temporary file of a write is created exclusively: a symlink already at its
    /// predictable name (`.NAME.tmp-PID-N`) is not written through (the file it points to
    /// is left as it was) and the write fails cleanly instead.
    #[cfg(unix)]
    #[test]
    fn a_symlink_at_the_temporary_name_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, b"keep").unwrap();
        let out = dir.path().join("o.safetensors");
        // Every name the next writes of this process may take (other tests run meanwhile).
        let next = crate::video::atomic::COUNTER.load(std::sync::atomic::Ordering::Relaxed);
        for n in next..next + 1000 {
            let name = format!(".o.safetensors.tmp-{}-{n}", std::process::id());
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
        }
        let r = write_f32(&out, &[("x", vec![2], &[1.0, 2.0])], &BTreeMap::new());
        assert!(matches!(r, Err(Error::Io { .. })), "{r:?}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(!out.exists());
    }
}
