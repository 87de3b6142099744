//! `.safetensors` output: one tensor `video`, f32 `[T, 3, H, W]` in [-1, 1], the exact decoder
//! output the tests compare. Streamed: a header with room for any frame count is reserved, the
//! frames are appended as they come, and the header is rewritten in place (same length) once the
//! count is known, so memory stays constant over any length of stream.

use super::atomic::TempFile;
use crate::error::Result;
use crate::tensorfile::f32_header;
use std::collections::BTreeMap;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Bytes reserved for the JSON header: enough for 20-digit numbers everywhere.
const HEADER_RESERVE: usize = 320;

pub(crate) struct SafetensorsWriter {
    out: TempFile,
    buf: Option<BufWriter<std::fs::File>>,
    width: usize,
    height: usize,
    frames: usize,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsWriter {
    pub(crate) fn create(path: &Path, width: usize, height: usize, fps: f64) -> Result<Self> {
        let mut out = TempFile::create(path, "safetensors-tmp")?;
        let file = out.file()?.try_clone().map_err(|e| out.err(e))?;
        let mut buf = BufWriter::with_capacity(1 << 20, file);
        let metadata = BTreeMap::from([("fps".to_string(), format!("{fps}"))]);
        let header = Self::header(&metadata, 0, height, width)?;
        let res = (|| {
            buf.write_all(&(header.len() as u64).to_le_bytes())?;
            buf.write_all(&header)
        })();
        res.map_err(|e| out.err(e))?;
        Ok(SafetensorsWriter {
            out,
            buf: Some(buf),
            width,
            height,
            frames: 0,
            metadata,
        })
    }

    fn header(
        metadata: &BTreeMap<String, String>,
        t: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<u8>> {
        f32_header(&[("video", &[t, 3, h, w])], metadata, HEADER_RESERVE)
    }

    /// Appends `[count, 3, H, W]` values exactly as given (no clamp: TAEHV's output, like
    /// upstream's, may leave [-1, 1] slightly, and this format is the bit-exact one).
    pub(crate) fn write(&mut self, frames: &[f32], count: usize) -> Result<()> {
        let Some(buf) = self.buf.as_mut() else {
            return Ok(());
        };
        let mut bytes = Vec::with_capacity(4 * 3 * self.width * self.height);
        for frame in frames.chunks_exact(3 * self.width * self.height) {
            bytes.clear();
            for v in frame {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            buf.write_all(&bytes).map_err(|e| self.out.err(e))?;
        }
        self.frames += count;
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Result<PathBuf> {
        let header = Self::header(&self.metadata, self.frames, self.height, self.width)?;
        if let Some(buf) = self.buf.take() {
            let res = (|| {
                let mut f = buf.into_inner().map_err(|e| e.into_error())?;
                if header.len() != HEADER_RESERVE {
                    return Err(std::io::Error::other(format!(
                        "safetensors header grew to {} bytes, {HEADER_RESERVE} reserved",
                        header.len()
                    )));
                }
                f.seek(SeekFrom::Start(8))?;
                f.write_all(&header)
            })();
            res.map_err(|e| self.out.err(e))?;
        }
        self.out.commit()
    }
}
