//! `.mp4` output: H.264 (OpenH264, built from its bundled source) in a minimal ISO-BMFF file of
//! our own making, laid out for progressive playback ("faststart": `ftyp`, `moov`, `mdat`).
//!
//! While frames stream in, the coded samples go to a hidden temporary file; finish writes the
//! final temporary file as `ftyp` + `moov` (whose sample tables are only known then) + `mdat`
//! (copied from the first) and renames it over the target.
//!
//! The track is what browsers require: `avc1` with an `avcC` built from the encoder's SPS/PPS
//! (kept out of the samples), 4-byte length-prefixed NAL units, yuv420p, even sizes (odd ones
//! and sides under 16 are padded by repeating the last column/row), one chunk, sync samples
//! listed in `stss`.

use super::atomic::TempFile;
use super::color::{pad_to, rgb_to_yuv420, Yuv420};
use crate::error::{Error, Result};
use openh264::encoder::{
    BitRate, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, RateControlMode,
    UsageType, VuiConfig,
};
use openh264::formats::YUVSource;
use openh264::OpenH264API;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// OpenH264's size limits (level 5.2): the long side at most 3840, the short side at most 2160.
const MAX_LONG_SIDE: usize = 3840;
const MAX_SHORT_SIDE: usize = 2160;
/// Ticks per frame: the media timescale is `fps * 1000`, so fractional rates like 29.97 are exact.
const FRAME_TICKS: u32 = 1000;

/// OpenH264 refuses pictures smaller than this on either side.
const MIN_SIDE: usize = 16;

/// The coded size of a `width x height` picture: padded to even sides (4:2:0) of at least 16.
pub(crate) fn coded_size(width: usize, height: usize) -> (usize, usize) {
    let side = |s: usize| (s + s % 2).max(MIN_SIDE);
    (side(width), side(height))
}

/// Checks that OpenH264 can code a `width x height` picture (after padding, see [`coded_size`]).
pub(crate) fn check_size(width: usize, height: usize) -> Result<()> {
    let (w, h) = coded_size(width, height);
    if w.max(h) > MAX_LONG_SIDE || w.min(h) > MAX_SHORT_SIDE {
        return Err(Error::Unsupported(format!(
            "{width}x{height} is too large for the H.264 encoder (at most {MAX_LONG_SIDE}x\
             {MAX_SHORT_SIDE} or {MAX_SHORT_SIDE}x{MAX_LONG_SIDE}); write .y4m, PNG frames or \
             .safetensors instead"
        )));
    }
    Ok(())
}

/// The default bit rate: about 0.25 bits per pixel, between 200 kbit/s and 40 Mbit/s
/// (about 1.6 Mbit/s for 480x832 at 16 fps).
pub(crate) fn default_bitrate(width: usize, height: usize, fps: f64) -> u32 {
    let bps = (width * height) as f64 * fps * 0.25;
    bps.clamp(200_000.0, 40_000_000.0) as u32
}

/// One coded frame in the `mdat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    pub(crate) size: u32,
    pub(crate) duration: u32,
    pub(crate) sync: bool,
}

/// What the `moov` box describes.
pub(crate) struct Track {
    pub(crate) width: u16,
    pub(crate) height: u16,
    pub(crate) timescale: u32,
    pub(crate) sps: Vec<u8>,
    pub(crate) pps: Vec<u8>,
    pub(crate) samples: Vec<Sample>,
}

/// A box: 32-bit size, four-character type, body.
fn bx(kind: &[u8; 4], parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = 8 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&(len as u32).to_be_bytes());
    v.extend_from_slice(kind);
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

/// A full box: a box whose body starts with a version byte and 24 bits of flags.
fn full_bx(kind: &[u8; 4], version: u8, flags: u32, parts: &[&[u8]]) -> Vec<u8> {
    let vf = ((version as u32) << 24 | (flags & 0xFF_FFFF)).to_be_bytes();
    let mut all: Vec<&[u8]> = vec![&vf];
    all.extend_from_slice(parts);
    bx(kind, &all)
}

/// Big-endian byte builder.
#[derive(Default)]
struct Be(Vec<u8>);

impl Be {
    fn u8(mut self, x: u8) -> Self {
        self.0.push(x);
        self
    }
    fn u16(mut self, x: u16) -> Self {
        self.0.extend_from_slice(&x.to_be_bytes());
        self
    }
    fn u32(mut self, x: u32) -> Self {
        self.0.extend_from_slice(&x.to_be_bytes());
        self
    }
    fn bytes(mut self, x: &[u8]) -> Self {
        self.0.extend_from_slice(x);
        self
    }
    fn zeros(mut self, n: usize) -> Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    /// The identity transformation matrix of `mvhd`/`tkhd`.
    fn matrix(self) -> Self {
        self.u32(0x0001_0000)
            .u32(0)
            .u32(0)
            .u32(0)
            .u32(0x0001_0000)
            .u32(0)
            .u32(0)
            .u32(0)
            .u32(0x4000_0000)
    }
}

/// The file-type box: ISO base media with H.264, as players expect from an `.mp4`.
pub(crate) fn ftyp() -> Vec<u8> {
    let body = Be::default()
        .bytes(b"isom")
        .u32(0x200)
        .bytes(b"isom")
        .bytes(b"iso2")
        .bytes(b"avc1")
        .bytes(b"mp41");
    bx(b"ftyp", &[&body.0])
}

/// The `mdat` header for `payload` bytes (the 64-bit form past 4 GiB).
pub(crate) fn mdat_header(payload: u64) -> Vec<u8> {
    if payload + 8 <= u32::MAX as u64 {
        Be::default().u32(payload as u32 + 8).bytes(b"mdat").0
    } else {
        let mut v = Be::default().u32(1).bytes(b"mdat").0;
        v.extend_from_slice(&(payload + 16).to_be_bytes());
        v
    }
}

/// The `avcC` decoder configuration: profile/level copied from the SPS, 4-byte NAL lengths.
fn avcc(sps: &[u8], pps: &[u8]) -> Vec<u8> {
    let profile = sps.get(1).copied().unwrap_or(66);
    let mut body = Be::default()
        .u8(1)
        .u8(profile)
        .u8(sps.get(2).copied().unwrap_or(0))
        .u8(sps.get(3).copied().unwrap_or(0))
        .u8(0xFC | 3)
        .u8(0xE0 | 1)
        .u16(sps.len() as u16)
        .bytes(sps)
        .u8(1)
        .u16(pps.len() as u16)
        .bytes(pps);
    if matches!(profile, 100 | 110 | 122 | 144) {
        // High profiles carry chroma format (4:2:0) and 8-bit depths, no SPS extensions.
        body = body.u8(0xFC | 1).u8(0xF8).u8(0xF8).u8(0);
    }
    bx(b"avcC", &[&body.0])
}

/// The `moov` box for `track` whose single chunk starts at byte `chunk_offset` of the file.
pub(crate) fn moov(t: &Track, chunk_offset: u64) -> Result<Vec<u8>> {
    let n = t.samples.len() as u32;
    let duration_u64: u64 = t.samples.iter().map(|s| s.duration as u64).sum();
    let duration = u32::try_from(duration_u64).map_err(|_| {
        Error::Unsupported("the video is too long for a 32-bit MP4 duration".into())
    })?;
    let (w, h) = (t.width, t.height);

    let mvhd = full_bx(
        b"mvhd",
        0,
        0,
        &[&Be::default()
            .u32(0)
            .u32(0)
            .u32(t.timescale)
            .u32(duration)
            .u32(0x0001_0000)
            .u16(0x0100)
            .zeros(10)
            .matrix()
            .zeros(24)
            .u32(2)
            .0],
    );
    let tkhd = full_bx(
        b"tkhd",
        0,
        3,
        &[&Be::default()
            .u32(0)
            .u32(0)
            .u32(1)
            .u32(0)
            .u32(duration)
            .zeros(8)
            .u16(0)
            .u16(0)
            .u16(0)
            .u16(0)
            .matrix()
            .u32((w as u32) << 16)
            .u32((h as u32) << 16)
            .0],
    );
    let mdhd = full_bx(
        b"mdhd",
        0,
        0,
        &[&Be::default()
            .u32(0)
            .u32(0)
            .u32(t.timescale)
            .u32(duration)
            .u16(0x55C4) // "und"
            .u16(0)
            .0],
    );
    let hdlr = full_bx(
        b"hdlr",
        0,
        0,
        &[&Be::default()
            .u32(0)
            .bytes(b"vide")
            .zeros(12)
            .bytes(b"VideoHandler\0")
            .0],
    );
    let vmhd = full_bx(b"vmhd", 0, 1, &[&[0u8; 8]]);
    let dref = full_bx(
        b"dref",
        0,
        0,
        &[&1u32.to_be_bytes(), &full_bx(b"url ", 0, 1, &[])],
    );
    let dinf = bx(b"dinf", &[&dref]);

    let avc1 = bx(
        b"avc1",
        &[
            &Be::default()
                .zeros(6)
                .u16(1) // data reference index
                .zeros(16)
                .u16(w)
                .u16(h)
                .u32(0x0048_0000)
                .u32(0x0048_0000)
                .u32(0)
                .u16(1) // frames per sample
                .zeros(32) // compressor name
                .u16(0x0018)
                .u16(0xFFFF)
                .0,
            &avcc(&t.sps, &t.pps),
        ],
    );
    let stsd = full_bx(b"stsd", 0, 0, &[&1u32.to_be_bytes(), &avc1]);

    // Run-length coded sample durations.
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for s in &t.samples {
        match runs.last_mut() {
            Some((count, d)) if *d == s.duration => *count += 1,
            _ => runs.push((1, s.duration)),
        }
    }
    let mut stts = Be::default().u32(runs.len() as u32);
    for (count, d) in runs {
        stts = stts.u32(count).u32(d);
    }
    let stts = full_bx(b"stts", 0, 0, &[&stts.0]);

    let syncs: Vec<u32> = (1..=n)
        .filter(|&i| t.samples[i as usize - 1].sync)
        .collect();
    let mut stss = Be::default().u32(syncs.len() as u32);
    for i in syncs {
        stss = stss.u32(i);
    }
    let stss = full_bx(b"stss", 0, 0, &[&stss.0]);

    let stsc = full_bx(
        b"stsc",
        0,
        0,
        &[&Be::default().u32(1).u32(1).u32(n).u32(1).0],
    );
    let mut stsz = Be::default().u32(0).u32(n);
    for s in &t.samples {
        stsz = stsz.u32(s.size);
    }
    let stsz = full_bx(b"stsz", 0, 0, &[&stsz.0]);
    let stco = match u32::try_from(chunk_offset) {
        Ok(off) => full_bx(b"stco", 0, 0, &[&Be::default().u32(1).u32(off).0]),
        Err(_) => full_bx(
            b"co64",
            0,
            0,
            &[&1u32.to_be_bytes(), &chunk_offset.to_be_bytes()],
        ),
    };
    let stbl = bx(b"stbl", &[&stsd, &stts, &stss, &stsc, &stsz, &stco]);
    let minf = bx(b"minf", &[&vmhd, &dinf, &stbl]);
    let mdia = bx(b"mdia", &[&mdhd, &hdlr, &minf]);
    let trak = bx(b"trak", &[&tkhd, &mdia]);
    Ok(bx(b"moov", &[&mvhd, &trak]))
}

/// The NAL units of an Annex-B byte stream, without start codes or trailing zero bytes.
pub(crate) fn split_annexb(data: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            starts.push((i, i + 3));
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut nals = Vec::with_capacity(starts.len());
    for (k, &(_, begin)) in starts.iter().enumerate() {
        let end = starts.get(k + 1).map_or(data.len(), |&(next, _)| next);
        let mut nal = &data[begin..end];
        while let [rest @ .., 0] = nal {
            nal = rest;
        }
        if !nal.is_empty() {
            nals.push(nal);
        }
    }
    nals
}

/// Lends a [`Yuv420`] picture to OpenH264.
struct YuvRef<'a>(&'a Yuv420);

impl YUVSource for YuvRef<'_> {
    fn dimensions(&self) -> (usize, usize) {
        (self.0.width, self.0.height)
    }
    fn strides(&self) -> (usize, usize, usize) {
        let c = self.0.chroma_width();
        (self.0.width, c, c)
    }
    fn y(&self) -> &[u8] {
        &self.0.y
    }
    fn u(&self) -> &[u8] {
        &self.0.u
    }
    fn v(&self) -> &[u8] {
        &self.0.v
    }
}

fn h264_err(e: openh264::Error) -> Error {
    Error::Internal(format!("H.264 encoder: {e}"))
}

/// Encodes frames as they come and writes the MP4 on finish.
pub(crate) struct Mp4Writer {
    out: TempFile,
    mdat: TempFile,
    mdat_buf: Option<BufWriter<std::fs::File>>,
    mdat_len: u64,
    encoder: Encoder,
    width: usize,
    height: usize,
    track: Track,
}

impl Mp4Writer {
    pub(crate) fn create(
        path: &Path,
        width: usize,
        height: usize,
        fps: f64,
        bitrate: Option<u32>,
    ) -> Result<Self> {
        check_size(width, height)?;
        let out = TempFile::create(path, "mp4-tmp")?;
        let mut mdat = TempFile::create(path, "mdat-tmp")?;
        let file = mdat.file()?.try_clone().map_err(|e| mdat.err(e))?;
        let bitrate = bitrate.unwrap_or_else(|| default_bitrate(width, height, fps));
        // A key frame every 4 seconds keeps seeking quick in players.
        let key_period = ((fps * 4.0).round() as u32).max(1);
        let config = EncoderConfig::new()
            .max_frame_rate(FrameRate::from_hz(fps as f32))
            .bitrate(BitRate::from_bps(bitrate))
            .rate_control_mode(RateControlMode::Quality)
            .skip_frames(false)
            .usage_type(UsageType::CameraVideoRealTime)
            .intra_frame_period(IntraFramePeriod::from_num_frames(key_period))
            .vui(VuiConfig::bt601())
            .num_threads(1);
        let encoder =
            Encoder::with_api_config(OpenH264API::from_source(), config).map_err(h264_err)?;
        let (w2, h2) = coded_size(width, height);
        let mut encoder = encoder;
        // OpenH264 prints warnings to stderr while it initialises (before the crate applies its
        // quiet trace level); silence it from the start.
        // OpenH264 reads the level as a uint32; WELS_LOG_QUIET is 0.
        const _: () = assert!(openh264_sys2::WELS_LOG_QUIET == 0);
        let mut quiet: u32 = 0;
        // SAFETY: the trace level may be set before initialisation (OpenH264 allows exactly this
        // option then); the pointer is to a live i32, read during the call only.
        let rc = unsafe {
            encoder.raw_api().set_option(
                openh264_sys2::ENCODER_OPTION_TRACE_LEVEL,
                (&mut quiet as *mut u32).cast(),
            )
        };
        if rc != 0 {
            return Err(Error::Internal(format!(
                "H.264 encoder: setting the trace level failed ({rc})"
            )));
        }
        Ok(Mp4Writer {
            out,
            mdat,
            mdat_buf: Some(BufWriter::with_capacity(1 << 20, file)),
            mdat_len: 0,
            encoder,
            width,
            height,
            track: Track {
                width: w2 as u16,
                height: h2 as u16,
                timescale: (fps * FRAME_TICKS as f64).round() as u32,
                sps: Vec::new(),
                pps: Vec::new(),
                samples: Vec::new(),
            },
        })
    }

    /// Encodes `[T][H][W][3]` RGB8 frames.
    pub(crate) fn write_rgb(&mut self, rgb: &[u8]) -> Result<()> {
        let (w, h) = (self.track.width as usize, self.track.height as usize);
        for f in rgb.chunks_exact(self.width * self.height * 3) {
            let padded = pad_to(f, self.width, self.height, w, h);
            let yuv = rgb_to_yuv420(&padded, w, h);
            self.encode(&yuv)?;
        }
        Ok(())
    }

    fn encode(&mut self, yuv: &Yuv420) -> Result<()> {
        let bits = self.encoder.encode(&YuvRef(yuv)).map_err(h264_err)?;
        let frame_type = bits.frame_type();
        let stream = bits.to_vec();
        let mut sample = Vec::with_capacity(stream.len() + 16);
        let mut sync = matches!(frame_type, FrameType::IDR);
        for nal in split_annexb(&stream) {
            match nal[0] & 0x1F {
                7 => {
                    if self.track.sps.is_empty() {
                        self.track.sps = nal.to_vec();
                    } else if self.track.sps != nal {
                        return Err(Error::Internal(
                            "H.264 encoder changed its SPS mid-stream".into(),
                        ));
                    }
                }
                8 => {
                    if self.track.pps.is_empty() {
                        self.track.pps = nal.to_vec();
                    } else if self.track.pps != nal {
                        return Err(Error::Internal(
                            "H.264 encoder changed its PPS mid-stream".into(),
                        ));
                    }
                }
                t => {
                    sync |= t == 5;
                    sample.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                    sample.extend_from_slice(nal);
                }
            }
        }
        if sample.is_empty() {
            // A skipped frame: the previous picture stays on screen one frame longer.
            return match self.track.samples.last_mut() {
                Some(prev) => {
                    prev.duration += FRAME_TICKS;
                    Ok(())
                }
                None => Err(Error::Internal(
                    "H.264 encoder produced no data for the first frame".into(),
                )),
            };
        }
        if self.track.samples.is_empty() && !sync {
            return Err(Error::Internal(
                "H.264 encoder did not start with a key frame".into(),
            ));
        }
        let buf = self
            .mdat_buf
            .as_mut()
            .ok_or_else(|| Error::Internal("mp4 writer used after finish".into()))?;
        buf.write_all(&sample).map_err(|e| self.mdat.err(e))?;
        self.mdat_len += sample.len() as u64;
        self.track.samples.push(Sample {
            size: sample.len() as u32,
            duration: FRAME_TICKS,
            sync,
        });
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Result<PathBuf> {
        if self.track.sps.is_empty() || self.track.pps.is_empty() {
            return Err(Error::Internal("H.264 encoder produced no SPS/PPS".into()));
        }
        let mut mdat_file = match self.mdat_buf.take() {
            Some(b) => b.into_inner().map_err(|e| self.mdat.err(e.into_error()))?,
            None => return Err(Error::Internal("mp4 writer finished twice".into())),
        };
        let ftyp = ftyp();
        let mdat_head = mdat_header(self.mdat_len);
        // The moov's size does not depend on the offset's value (stco vs co64 aside), so size it
        // with a guess and build it again with the true offset.
        let guess = moov(&self.track, 0)?.len() as u64;
        let offset = (ftyp.len() + mdat_head.len()) as u64 + guess;
        let moov = moov(&self.track, offset)?;
        if moov.len() as u64 != guess {
            return Err(Error::Internal(
                "mp4 moov size changed with its offset".into(),
            ));
        }
        let out_file = self.out.file()?.try_clone().map_err(|e| self.out.err(e))?;
        let mut w = BufWriter::with_capacity(1 << 20, out_file);
        let res = (|| {
            w.write_all(&ftyp)?;
            w.write_all(&moov)?;
            w.write_all(&mdat_head)?;
            mdat_file.seek(SeekFrom::Start(0))?;
            let copied = std::io::copy(&mut mdat_file, &mut w)?;
            if copied != self.mdat_len {
                return Err(std::io::Error::other(format!(
                    "copied {copied} of {} coded bytes",
                    self.mdat_len
                )));
            }
            w.flush()
        })();
        res.map_err(|e| self.out.err(e))?;
        drop(w);
        self.out.commit()
        // `self.mdat` is deleted on drop.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annexb_splits_on_both_start_code_lengths() {
        let stream = [
            0, 0, 0, 1, 0x67, 1, 2, 0, // SPS with a trailing zero byte
            0, 0, 1, 0x68, 3, // PPS after a 3-byte start code
            0, 0, 0, 1, 0x65, 0, 0, 3, 1, 9, // IDR slice with an emulation-prevention byte
        ];
        let nals = split_annexb(&stream);
        assert_eq!(
            nals,
            [
                &[0x67, 1, 2][..],
                &[0x68, 3][..],
                &[0x65, 0, 0, 3, 1, 9][..]
            ]
        );
        assert!(split_annexb(&[1, 2, 3]).is_empty());
    }

    #[test]
    fn mdat_header_switches_to_64_bit() {
        assert_eq!(mdat_header(10), [0, 0, 0, 18, b'm', b'd', b'a', b't']);
        let big = mdat_header(u32::MAX as u64);
        assert_eq!(&big[..8], &[0, 0, 0, 1, b'm', b'd', b'a', b't']);
        assert_eq!(
            u64::from_be_bytes(big[8..].try_into().unwrap()),
            u32::MAX as u64 + 16
        );
    }

    /// The direct children of a box body: (type, body).
    fn children(mut d: &[u8]) -> Vec<([u8; 4], &[u8])> {
        let mut v = Vec::new();
        while d.len() >= 8 {
            let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
            v.push((d[4..8].try_into().unwrap(), &d[8..n]));
            d = &d[n..];
        }
        assert!(d.is_empty());
        v
    }

    fn find<'a>(d: &'a [u8], path: &[&[u8; 4]]) -> &'a [u8] {
        let (first, rest) = path.split_first().unwrap();
        let (_, body) = children(d)
            .into_iter()
            .find(|(k, _)| k == *first)
            .unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(*first)));
        if rest.is_empty() {
            body
        } else {
            find(body, rest)
        }
    }

    #[test]
    fn moov_tables_describe_the_samples() {
        let s = |size, duration, sync| Sample {
            size,
            duration,
            sync,
        };
        let t = Track {
            width: 32,
            height: 48,
            timescale: 16000,
            sps: vec![0x67, 66, 0xC0, 30, 0xAA],
            pps: vec![0x68, 0xBB],
            samples: vec![
                s(100, 1000, true),
                s(20, 1000, false),
                s(30, 2000, false),
                s(40, 1000, true),
            ],
        };
        let moov = moov(&t, 1234).unwrap();
        assert_eq!(
            u32::from_be_bytes(moov[..4].try_into().unwrap()) as usize,
            moov.len()
        );
        let root = &moov[..];
        let stbl: &[&[u8; 4]] = &[b"moov", b"trak", b"mdia", b"minf", b"stbl"];
        let table = |k: &[u8; 4]| {
            let mut p = stbl.to_vec();
            p.push(k);
            find(root, &p).to_vec()
        };
        let words = |b: Vec<u8>| -> Vec<u32> {
            b.chunks(4)
                .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
                .collect()
        };
        // Full boxes: the first word is version + flags (0).
        assert_eq!(words(table(b"stts")), [0, 3, 2, 1000, 1, 2000, 1, 1000]);
        assert_eq!(words(table(b"stss")), [0, 2, 1, 4]);
        assert_eq!(words(table(b"stsz")), [0, 0, 4, 100, 20, 30, 40]);
        assert_eq!(words(table(b"stsc")), [0, 1, 1, 4, 1]);
        assert_eq!(words(table(b"stco")), [0, 1, 1234]);
        // mdhd: timescale 16000 and a duration of 5000 ticks.
        let mdhd = words(find(root, &[b"moov", b"trak", b"mdia", b"mdhd"]).to_vec());
        assert_eq!(&mdhd[3..5], &[16000, 5000]);
        // avcC inside avc1 (after the 78-byte visual sample entry), inside stsd (after 8 bytes).
        let stsd = table(b"stsd");
        let avc1 = children(&stsd[8..]);
        assert_eq!(&avc1[0].0, b"avc1");
        let entry = avc1[0].1;
        assert_eq!(&entry[24..28], &[0, 32, 0, 48]);
        let avcc = children(&entry[78..]);
        assert_eq!(&avcc[0].0, b"avcC");
        assert_eq!(
            avcc[0].1,
            &[1, 66, 0xC0, 30, 0xFF, 0xE1, 0, 5, 0x67, 66, 0xC0, 30, 0xAA, 1, 0, 2, 0x68, 0xBB]
        );
    }
}
