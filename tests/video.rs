//! The video writers: every format round-trips or parses, the MP4 is checked by ffprobe and
//! decoded back by ffmpeg (installed by scripts/install-test-tools.sh), and outputs are atomic.

use blockcascade::tensorfile::{Dtype, TensorFile};
use blockcascade::video::{to_rgb8, VideoFormat, VideoOptions, VideoWriter};
use blockcascade::Error;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `[t, 3, h, w]` frames in [-1, 1]: red ramps across, green down, blue drifts with time, plus a
/// small square moving right each frame (so frames differ and the order is checked).
fn pattern(t: usize, h: usize, w: usize) -> Vec<f32> {
    let mut v = vec![0f32; t * 3 * h * w];
    for ti in 0..t {
        for y in 0..h {
            for x in 0..w {
                let fx = x as f32 / w.max(2).saturating_sub(1) as f32;
                let fy = y as f32 / h.max(2).saturating_sub(1) as f32;
                let blue = ((fx + fy) * 0.5 + ti as f32 * 0.07).fract();
                let in_square = (x + w - (2 * ti) % w) % w < 4 && y >= h / 3 && y < h / 3 + 4;
                let rgb = if in_square {
                    [1.0, 1.0, 1.0]
                } else {
                    [fx, fy, blue]
                };
                for (c, val) in rgb.iter().enumerate() {
                    v[((ti * 3 + c) * h + y) * w + x] = val * 2.0 - 1.0;
                }
            }
        }
    }
    v
}

/// Writes `frames` (`[t, 3, h, w]`) to `path` in blocks of the given sizes.
fn write_blocks(path: &Path, frames: &[f32], blocks: &[usize], h: usize, w: usize) -> PathBuf {
    write_blocks_with(path, frames, blocks, h, w, &VideoOptions::default())
}

fn write_blocks_with(
    path: &Path,
    frames: &[f32],
    blocks: &[usize],
    h: usize,
    w: usize,
    opts: &VideoOptions,
) -> PathBuf {
    let mut wr = VideoWriter::create(path, w, h, opts).unwrap();
    let per = 3 * h * w;
    let mut at = 0;
    for &n in blocks {
        wr.write_frames(&frames[at * per..(at + n) * per], n)
            .unwrap();
        at += n;
    }
    assert_eq!(at * per, frames.len(), "blocks must cover the frames");
    assert_eq!(wr.frames(), at);
    wr.finish().unwrap()
}

/// Names in a folder, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Peak signal-to-noise ratio of two byte images, in dB.
fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let se: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let mse = se / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    }
}

/// Whether ffmpeg/ffprobe can be used. Missing tools fail the test (CI installs them); a local
/// run may skip with `BC_SKIP_FFMPEG_TESTS=1`, loudly, but never under CI.
fn ffmpeg_tools(test: &str) -> bool {
    let have = |tool: &str| {
        Command::new(tool)
            .arg("-version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if have("ffprobe") && have("ffmpeg") {
        return true;
    }
    let skip = std::env::var("BC_SKIP_FFMPEG_TESTS").is_ok_and(|v| v == "1");
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    if skip && !ci {
        eprintln!(
            "\n!!! SKIPPING {test}: ffmpeg/ffprobe not found and BC_SKIP_FFMPEG_TESTS=1 \
             (run scripts/install-test-tools.sh to check the video files) !!!\n"
        );
        return false;
    }
    panic!(
        "{test}: ffmpeg/ffprobe not found: run scripts/install-test-tools.sh \
         (or set BC_SKIP_FFMPEG_TESTS=1 to skip locally)"
    );
}

/// ffprobe's description of the first video stream, frames counted by decoding.
fn ffprobe(path: &Path) -> serde_json::Value {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-count_frames",
            "-show_entries",
            "stream=codec_name,pix_fmt,width,height,nb_read_frames,r_frame_rate,avg_frame_rate,\
             duration,color_range,color_space",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ffprobe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["streams"][0].clone()
}

/// Decodes every frame to packed RGB8 with ffmpeg; errors in the stream fail the test.
fn ffmpeg_rgb(path: &Path) -> Vec<u8> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-xerror", "-i"])
        .arg(path)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "ffmpeg decode of {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Crops `[t][h2][w2][3]` to `[t][h][w][3]` (the top-left corner).
fn crop(rgb: &[u8], t: usize, h2: usize, w2: usize, h: usize, w: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(t * h * w * 3);
    for ti in 0..t {
        for y in 0..h {
            let row = ((ti * h2 + y) * w2) * 3;
            out.extend_from_slice(&rgb[row..row + 3 * w]);
        }
    }
    out
}

/// Pads `[t, 3, h, w]` frames to `[t, 3, h2, w2]` by repeating the last column and row.
fn pad_frames(f: &[f32], t: usize, h: usize, w: usize, h2: usize, w2: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(t * 3 * h2 * w2);
    for plane in f.chunks_exact(h * w).take(t * 3) {
        for y in 0..h2 {
            for x in 0..w2 {
                out.push(plane[y.min(h - 1) * w + x.min(w - 1)]);
            }
        }
    }
    out
}

/// Top-level MP4 boxes: (type, size).
fn mp4_boxes(path: &Path) -> Vec<(String, u64)> {
    let d = std::fs::read(path).unwrap();
    let mut boxes = Vec::new();
    let mut i = 0usize;
    while i + 8 <= d.len() {
        let size = u32::from_be_bytes(d[i..i + 4].try_into().unwrap()) as u64;
        let kind = String::from_utf8_lossy(&d[i + 4..i + 8]).into_owned();
        assert!(size >= 8, "box {kind} has size {size}");
        boxes.push((kind, size));
        i += size as usize;
    }
    assert_eq!(i, d.len(), "boxes must tile the file");
    boxes
}

#[test]
fn safetensors_streams_the_exact_frames() {
    let dir = tempfile::tempdir().unwrap();
    let (t, h, w) = (9, 6, 10);
    let mut frames = pattern(t, h, w);
    // Every value is stored bit-exactly, out-of-range ones too (TAEHV overshoots [-1, 1]).
    frames[0] = 1.5;
    frames[1] = -3.0;
    frames[2] = 0.123_456_79;
    let path = dir.path().join("v.safetensors");
    // 1 + 4 + 4 frames: the block sizes a Wan VAE stream produces.
    assert_eq!(write_blocks(&path, &frames, &[1, 4, 4], h, w), path);
    let tf = TensorFile::open(&path).unwrap();
    let info = &tf.tensors()["video"];
    assert_eq!(info.dtype, Dtype::F32);
    assert_eq!(info.shape, vec![t, 3, h, w]);
    let back = tf.tensor_f32("video", Some(&[t, 3, h, w])).unwrap();
    assert_eq!(back, frames);
    assert_eq!(back[0], 1.5);
    assert_eq!(back[1], -3.0);
    assert_eq!(tf.metadata().get("fps").map(String::as_str), Some("16"));
    assert_eq!(listing(dir.path()), ["v.safetensors"]);
}

#[test]
fn png_frames_round_trip_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (t, h, w) = (5, 12, 20);
    let frames = pattern(t, h, w);
    let want = to_rgb8(&frames, t, h, w);
    let read_png = |p: &Path| {
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (w as u32, h as u32));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        buf
    };
    let frame = |i: usize| &want[i * h * w * 3..(i + 1) * h * w * 3];

    // A folder that does not exist yet (trailing slash).
    let folder = dir.path().join("frames");
    let arg = PathBuf::from(format!("{}/", folder.display()));
    assert_eq!(VideoFormat::from_path(&arg).unwrap(), VideoFormat::Png);
    write_blocks(&arg, &frames, &[2, 3], h, w);
    let names = listing(&folder);
    assert_eq!(names.len(), t);
    for (i, name) in names.iter().enumerate() {
        assert_eq!(name, &format!("frame_{i:06}.png"));
        assert_eq!(read_png(&folder.join(name)), frame(i), "frame {i}");
    }

    // An existing folder (no slash needed) with a file of its own, which is kept.
    let existing = dir.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::write(existing.join("keep.txt"), "x").unwrap();
    write_blocks(&existing, &frames, &[5], h, w);
    let names = listing(&existing);
    assert_eq!(names.len(), t + 1, "{names:?}");
    assert!(names.contains(&"keep.txt".to_string()));
    assert_eq!(read_png(&existing.join("frame_000004.png")), frame(4));

    // A printf pattern, numbered from 0.
    let pat = dir.path().join("out%04d.png");
    write_blocks(&pat, &frames, &[1, 1, 3], h, w);
    for i in 0..t {
        assert_eq!(
            read_png(&dir.path().join(format!("out{i:04}.png"))),
            frame(i)
        );
    }
    assert!(!dir.path().join(format!("out{t:04}.png")).exists());
    // No temporary folders are left anywhere.
    for d in [dir.path(), &folder, &existing] {
        assert!(
            listing(d).iter().all(|n| !n.starts_with('.')),
            "{:?}",
            listing(d)
        );
    }
}

#[test]
fn y4m_parses_with_the_documented_header_and_colours() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w) = (12, 20);
    // Frame 0 black, frame 1 white, then the pattern.
    let mut frames = vec![-1.0f32; 3 * h * w];
    frames.extend(vec![1.0f32; 3 * h * w]);
    frames.extend(pattern(3, h, w));
    let t = 5;
    let path = dir.path().join("v.y4m");
    write_blocks(&path, &frames, &[2, 3], h, w);
    let data = std::fs::read(&path).unwrap();
    let header_end = data.iter().position(|&b| b == b'\n').unwrap();
    assert_eq!(
        std::str::from_utf8(&data[..header_end]).unwrap(),
        "YUV4MPEG2 W20 H12 F16:1 Ip A1:1 C420jpeg XYSCSS=420JPEG XCOLORRANGE=LIMITED"
    );
    let (luma, chroma) = (h * w, (h / 2) * (w / 2));
    let frame_len = 6 + luma + 2 * chroma;
    let body = &data[header_end + 1..];
    assert_eq!(body.len(), t * frame_len);
    for (i, f) in body.chunks(frame_len).enumerate() {
        assert_eq!(&f[..6], b"FRAME\n", "frame {i}");
    }
    // Limited-range BT.601: black is Y=16, white Y=235, both with neutral chroma.
    let plane = |i: usize| &body[i * frame_len + 6..(i + 1) * frame_len];
    assert!(plane(0)[..luma].iter().all(|&y| y == 16));
    assert!(plane(1)[..luma].iter().all(|&y| y == 235));
    assert!(plane(0)[luma..]
        .iter()
        .chain(&plane(1)[luma..])
        .all(|&c| c == 128));

    // A fractional rate is written as a fraction.
    let p2 = dir.path().join("ntsc.y4m");
    let opts = VideoOptions {
        fps: 29.97,
        ..Default::default()
    };
    write_blocks_with(&p2, &frames[..3 * h * w], &[1], h, w, &opts);
    let d2 = std::fs::read(&p2).unwrap();
    assert!(d2.starts_with(b"YUV4MPEG2 W20 H12 F2997:100 "));

    if !ffmpeg_tools("y4m_parses_with_the_documented_header_and_colours") {
        return;
    }
    let s = ffprobe(&path);
    assert_eq!(s["pix_fmt"], "yuv420p");
    assert_eq!(s["nb_read_frames"], "5");
    assert_eq!(s["r_frame_rate"], "16/1");
    // Decoded back to RGB, the frames match the input up to 4:2:0 chroma (hard edges in the
    // pattern) and YUV rounding; a wrong matrix or range would cost far more.
    let back = ffmpeg_rgb(&path);
    let want = to_rgb8(&frames, t, h, w);
    let p = psnr(&back, &want);
    eprintln!("y4m vs input RGB: PSNR {p:.1} dB");
    assert!(p > 27.0, "y4m RGB PSNR {p:.1} dB");
    // The flat frames come back exactly (no chroma edges to blur).
    let n = h * w * 3;
    assert!(back[..n].iter().all(|&v| v == 0));
    assert!(back[n..2 * n].iter().all(|&v| v == 255));
}

/// Writes the pattern to an MP4 and checks it as a player would see it.
fn check_mp4(dir: &Path, w: usize, h: usize, fps: f64, blocks: &[usize], min_psnr: f64) {
    let t: usize = blocks.iter().sum();
    let frames = pattern(t, h, w);
    let path = dir.join(format!("v{w}x{h}.mp4"));
    let opts = VideoOptions {
        fps,
        ..Default::default()
    };
    write_blocks_with(&path, &frames, blocks, h, w, &opts);
    // Faststart layout: the index comes before the data.
    let kinds: Vec<String> = mp4_boxes(&path).into_iter().map(|(k, _)| k).collect();
    assert_eq!(kinds, ["ftyp", "moov", "mdat"]);
    if !ffmpeg_tools("mp4") {
        return;
    }
    // Odd sides are padded to even, sides under 16 to 16.
    let side = |s: usize| (s + s % 2).max(16);
    let (w2, h2) = (side(w), side(h));
    let s = ffprobe(&path);
    assert_eq!(s["codec_name"], "h264", "{s}");
    assert_eq!(s["pix_fmt"], "yuv420p", "{s}");
    assert_eq!(s["width"], w2 as u64, "{s}");
    assert_eq!(s["height"], h2 as u64, "{s}");
    assert_eq!(s["nb_read_frames"], t.to_string(), "{s}");
    assert_eq!(s["color_space"], "smpte170m", "{s}");
    assert_eq!(s["color_range"], "tv", "{s}");
    let rate: Vec<f64> = s["avg_frame_rate"]
        .as_str()
        .unwrap()
        .split('/')
        .map(|x| x.parse().unwrap())
        .collect();
    assert!((rate[0] / rate[1] - fps).abs() < 1e-6, "{s}");
    let duration: f64 = s["duration"].as_str().unwrap().parse().unwrap();
    assert!((duration - t as f64 / fps).abs() < 1e-3, "{s}");

    let back = ffmpeg_rgb(&path);
    assert_eq!(back.len(), t * h2 * w2 * 3);
    let back = crop(&back, t, h2, w2, h, w);
    // Against the input: bounded by 4:2:0 chroma on the pattern's hard edges (a swapped
    // channel or a wrong matrix or range would fall far below).
    let want = to_rgb8(&frames, t, h, w);
    let p = psnr(&back, &want);
    eprintln!("{w}x{h} mp4 vs input RGB: PSNR {p:.1} dB");
    assert!(p > 20.0, "{w}x{h} mp4 vs input RGB: PSNR {p:.1} dB");
    // Against the same frames, padded alike, through the lossless 4:2:0 path (.y4m, decoded by
    // the same ffmpeg): what H.264 alone loses. (Padded because ffmpeg's RGB conversion of an
    // odd-sized 4:2:0 picture scales chroma by ceil(w/2)/w, not 1/2.) Frame by frame, so a
    // dropped or reordered frame cannot hide in the average.
    let y4m = dir.join(format!("v{w}x{h}.y4m"));
    let padded = pad_frames(&frames, t, h, w, h2, w2);
    write_blocks_with(&y4m, &padded, &[t], h2, w2, &opts);
    let reference = crop(&ffmpeg_rgb(&y4m), t, h2, w2, h, w);
    let n = h * w * 3;
    let mut worst = f64::INFINITY;
    for i in 0..t {
        worst = worst.min(psnr(
            &back[i * n..(i + 1) * n],
            &reference[i * n..(i + 1) * n],
        ));
    }
    eprintln!("{w}x{h} mp4 vs y4m: worst frame PSNR {worst:.1} dB");
    assert!(
        worst > min_psnr,
        "{w}x{h} mp4 vs y4m: worst frame PSNR {worst:.1} dB"
    );
}

#[test]
fn mp4_plays_in_ffmpeg_with_the_right_frames() {
    let dir = tempfile::tempdir().unwrap();
    check_mp4(dir.path(), 32, 48, 16.0, &[1, 4, 4], 35.0);
}

#[test]
fn mp4_odd_and_tiny_sizes_and_other_rates() {
    let dir = tempfile::tempdir().unwrap();
    check_mp4(dir.path(), 35, 27, 24.0, &[3, 3], 30.0);
    check_mp4(dir.path(), 8, 6, 16.0, &[2, 2], 30.0);
    check_mp4(dir.path(), 48, 16, 29.97, &[5], 30.0);
}

#[test]
fn dropped_writers_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w) = (16, 16);
    let frames = pattern(2, h, w);
    // An existing output is untouched until finish replaces it.
    let old = dir.path().join("old.mp4");
    std::fs::write(&old, b"previous video").unwrap();
    let before = listing(dir.path());
    let targets = [
        dir.path().join("a.safetensors"),
        dir.path().join("a.mp4"),
        dir.path().join("a.y4m"),
        PathBuf::from(format!("{}/", dir.path().join("frames").display())),
        dir.path().join("f%03d.png"),
        old.clone(),
    ];
    for target in &targets {
        let mut wr = VideoWriter::create(target, w, h, &VideoOptions::default()).unwrap();
        wr.write_frames(&frames, 2).unwrap();
        // A bad call in between does not spoil the writer, nor publish anything.
        assert!(wr.write_frames(&frames[1..], 2).is_err());
        drop(wr);
        assert_eq!(listing(dir.path()), before, "after dropping {target:?}");
    }
    assert_eq!(std::fs::read(&old).unwrap(), b"previous video");
    // A writer with no frames refuses to finish and leaves nothing either.
    for target in &targets {
        let wr = VideoWriter::create(target, w, h, &VideoOptions::default()).unwrap();
        let e = wr.finish().unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert_eq!(listing(dir.path()), before, "after an empty {target:?}");
    }
    // Finishing replaces the old file in one step.
    let mut wr = VideoWriter::create(&old, w, h, &VideoOptions::default()).unwrap();
    wr.write_frames(&frames, 2).unwrap();
    wr.finish().unwrap();
    assert_eq!(listing(dir.path()), before);
    assert!(std::fs::read(&old).unwrap().starts_with(&[0, 0, 0, 32]));
}

#[test]
fn unwritable_outputs_fail_before_any_frame() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    std::fs::create_dir(dir.path().join("taken.mp4")).unwrap();
    let before = listing(dir.path());
    let missing = dir.path().join("no-such-folder");
    let bad = [
        missing.join("v.safetensors"),
        missing.join("v.mp4"),
        missing.join("v.y4m"),
        missing.join("f%04d.png"),
        PathBuf::from(format!("{}/", missing.join("frames").display())),
        // A file where a folder should be (fails even for root, unlike permission bits).
        file.join("v.mp4"),
        file.join("v.y4m"),
        PathBuf::from(format!("{}/", file.display())),
        // A folder where the file should be.
        dir.path().join("taken.mp4"),
    ];
    for p in &bad {
        match VideoWriter::create(p, 32, 32, &VideoOptions::default()) {
            Ok(_) => panic!("{p:?} was accepted"),
            Err(e) => {
                let msg = e.to_string();
                assert!(matches!(e, Error::Io { .. }), "{p:?}: {msg}");
                assert!(!msg.is_empty());
            }
        }
    }
    assert_eq!(listing(dir.path()), before);
    assert!(!missing.exists());
}

#[test]
fn bad_arguments_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.mp4");
    let opts = VideoOptions::default();
    let invalid = |r: blockcascade::Result<VideoWriter>| match r {
        Err(Error::InvalidArgument(m)) => m,
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("accepted"),
    };
    assert!(invalid(VideoWriter::create(&p, 0, 16, &opts)).contains("0x16"));
    for fps in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e6] {
        let o = VideoOptions {
            fps,
            ..opts.clone()
        };
        assert!(invalid(VideoWriter::create(&p, 16, 16, &o)).contains("fps"));
    }
    // Rates OpenH264 would refuse at the first frame (an encoder error after the decoding
    // work) are refused when the writer is made.
    for b in [0, 1, 999, 500_000_000, u32::MAX] {
        let o = VideoOptions {
            bitrate: Some(b),
            ..opts.clone()
        };
        assert!(invalid(VideoWriter::create(&p, 16, 16, &o)).contains("bit rate"));
    }
    // The ends of the accepted range code a frame.
    for b in [
        blockcascade::video::MIN_BITRATE,
        blockcascade::video::MAX_BITRATE,
    ] {
        let o = VideoOptions {
            bitrate: Some(b),
            ..opts.clone()
        };
        let mut w = VideoWriter::create(&dir.path().join("ok.mp4"), 16, 16, &o).unwrap();
        w.write_frames(&vec![0.25f32; 3 * 16 * 16], 1).unwrap();
        std::fs::remove_file(w.finish().unwrap()).unwrap();
    }
    let m = invalid(VideoWriter::create(
        &dir.path().join("v.avi"),
        16,
        16,
        &opts,
    ));
    assert!(m.contains(".avi") && m.contains(".mp4"), "{m}");
    // Too large for H.264: refused up front (other formats take it).
    match VideoWriter::create(&p, 4096, 4096, &opts) {
        Err(Error::Unsupported(m)) => assert!(m.contains("4096x4096"), "{m}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("accepted"),
    }
    // A frame buffer of the wrong length.
    let mut wr = VideoWriter::create(&dir.path().join("v.y4m"), 4, 2, &opts).unwrap();
    let m = match wr.write_frames(&[0.0; 10], 1) {
        Err(Error::InvalidArgument(m)) => m,
        r => panic!("{r:?}"),
    };
    assert!(m.contains("24") && m.contains("10"), "{m}");
    wr.write_frames(&[0.0; 24], 1).unwrap();
    wr.finish().unwrap();
    assert_eq!(listing(dir.path()), ["v.y4m"]);
}

#[test]
fn writers_can_move_to_another_thread() {
    // A decoder thread may hand its writer to a separate encoding thread.
    fn send<T: Send>() {}
    send::<VideoWriter>();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.mp4");
    let mut wr = VideoWriter::create(&path, 16, 16, &VideoOptions::default()).unwrap();
    let out = std::thread::spawn(move || {
        wr.write_frames(&pattern(2, 16, 16), 2).unwrap();
        wr.finish().unwrap()
    })
    .join()
    .unwrap();
    assert_eq!(out, path);
    assert_eq!(VideoFormat::from_path(&out).unwrap(), VideoFormat::Mp4);
}

#[test]
fn a_failed_write_spends_the_writer_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("f%02d.png");
    let mut wr = VideoWriter::create(&target, 8, 8, &VideoOptions::default()).unwrap();
    let frames = pattern(1, 8, 8);
    wr.write_frames(&frames, 1).unwrap();
    // Pull the hidden working folder away: the next write fails on I/O.
    let hidden: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(hidden.len(), 1, "{hidden:?}");
    assert!(hidden[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with('.'));
    std::fs::remove_dir_all(&hidden[0]).unwrap();
    assert!(matches!(wr.write_frames(&frames, 1), Err(Error::Io { .. })));
    // Spent: further writes and finish refuse, and nothing appears.
    assert!(wr.write_frames(&frames, 1).is_err());
    assert!(wr.finish().is_err());
    assert!(listing(dir.path()).is_empty());
}

/// A FIFO, a device or a folder already at a frame's name is refused (the rule of every
/// output: `files::check_output_target`) instead of being replaced by the frame's rename, and
/// nothing is published: no frame of the set, no temporary folder. Checked when the frame is
/// written and again, for every frame, before the first one is moved.
#[cfg(unix)]
#[test]
fn a_fifo_or_folder_at_a_frame_name_is_refused_and_nothing_is_published() {
    use std::os::unix::fs::FileTypeExt;
    let mkfifo = |p: &Path| {
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    };
    let is_fifo = |p: &Path| std::fs::symlink_metadata(p).unwrap().file_type().is_fifo();
    let (t, h, w) = (4, 8, 8);
    let frames = pattern(t, h, w);

    // A FIFO at frame 2 of a pattern, there before the writer: the write of frame 2 fails.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("out0002.png");
    mkfifo(&fifo);
    let mut wr = VideoWriter::create(
        &dir.path().join("out%04d.png"),
        w,
        h,
        &VideoOptions::default(),
    )
    .unwrap();
    let m = wr.write_frames(&frames, t).unwrap_err().to_string();
    assert!(
        m.contains("not a regular file") && m.contains("out0002.png"),
        "{m}"
    );
    assert!(wr.finish().is_err());
    assert_eq!(listing(dir.path()), ["out0002.png"]);
    assert!(is_fifo(&fifo));

    // A FIFO that appears at frame 3 after the frames were written: finish refuses and moves
    // none of them.
    let dir = tempfile::tempdir().unwrap();
    let mut wr = VideoWriter::create(
        &dir.path().join("out%04d.png"),
        w,
        h,
        &VideoOptions::default(),
    )
    .unwrap();
    wr.write_frames(&frames, t).unwrap();
    let fifo = dir.path().join("out0003.png");
    mkfifo(&fifo);
    let m = wr.finish().unwrap_err().to_string();
    assert!(m.contains("not a regular file"), "{m}");
    assert_eq!(listing(dir.path()), ["out0003.png"]);
    assert!(is_fifo(&fifo));

    // A folder at frame 1 of an existing frames folder: refused, the folder and its content
    // kept, no frame published.
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("frame_000001.png");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("keep.txt"), "x").unwrap();
    let mut wr = VideoWriter::create(dir.path(), w, h, &VideoOptions::default()).unwrap();
    let m = wr.write_frames(&frames, t).unwrap_err().to_string();
    assert!(
        m.contains("frame_000001.png") && m.contains("folder"),
        "{m}"
    );
    assert!(wr.finish().is_err());
    assert_eq!(listing(dir.path()), ["frame_000001.png"]);
    assert_eq!(listing(&sub), ["keep.txt"]);
}
