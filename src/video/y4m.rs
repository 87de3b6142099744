//! YUV4MPEG2 (`.y4m`): uncompressed 4:2:0 frames behind a one-line text header, the format
//! encoders (ffmpeg, x264, aomenc) read from a pipe. `C420jpeg` (centred chroma) with ffmpeg's
//! `XCOLORRANGE=LIMITED` extension; BT.601 matrix (see `color`).

use super::atomic::TempFile;
use super::color::rgb_to_yuv420;
use crate::error::Result;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Streams frames to a temporary `.y4m` and renames it on finish.
pub(crate) struct Y4mWriter {
    out: TempFile,
    buf: Option<BufWriter<std::fs::File>>,
    width: usize,
    height: usize,
}

/// The frame rate as a reduced fraction `num:den` with a denominator of at most 1000.
pub(crate) fn fps_fraction(fps: f64) -> (u64, u64) {
    let den = 1000u64;
    let num = (fps * den as f64).round() as u64;
    let g = gcd(num, den);
    (num / g, den / g)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a.max(1)
    } else {
        gcd(b, a % b)
    }
}

impl Y4mWriter {
    pub(crate) fn create(path: &Path, width: usize, height: usize, fps: f64) -> Result<Self> {
        let mut out = TempFile::create(path, "y4m-tmp")?;
        let file = out.file()?.try_clone().map_err(|e| out.err(e))?;
        let mut buf = BufWriter::with_capacity(1 << 20, file);
        let (num, den) = fps_fraction(fps);
        writeln!(
            buf,
            "YUV4MPEG2 W{width} H{height} F{num}:{den} Ip A1:1 C420jpeg XYSCSS=420JPEG XCOLORRANGE=LIMITED"
        )
        .map_err(|e| out.err(e))?;
        Ok(Y4mWriter {
            out,
            buf: Some(buf),
            width,
            height,
        })
    }

    /// Writes `[T][H][W][3]` RGB8 frames.
    pub(crate) fn write_rgb(&mut self, rgb: &[u8]) -> Result<()> {
        let frame = self.width * self.height * 3;
        let Some(buf) = self.buf.as_mut() else {
            return Ok(());
        };
        for f in rgb.chunks_exact(frame) {
            let yuv = rgb_to_yuv420(f, self.width, self.height);
            let res = (|| {
                buf.write_all(b"FRAME\n")?;
                buf.write_all(&yuv.y)?;
                buf.write_all(&yuv.u)?;
                buf.write_all(&yuv.v)
            })();
            res.map_err(|e| self.out.err(e))?;
        }
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Result<PathBuf> {
        if let Some(buf) = self.buf.take() {
            buf.into_inner().map_err(|e| self.out.err(e.into_error()))?;
        }
        self.out.commit()
    }
}
