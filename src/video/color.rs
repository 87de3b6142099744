//! RGB8 to planar YUV 4:2:0 for the Y4M and H.264 outputs: BT.601 matrix, limited ("TV")
//! range, chroma sited at the centre of each 2x2 block (JPEG/MPEG-1 siting, Y4M's `C420jpeg`).
//!
//! BT.601 because it is what ffmpeg assumes for an untagged Y4M file and what the MP4's SPS
//! signals, so every reader converts back with the same matrix; limited range because it is what
//! every player and browser handles.

/// One picture in planar YUV 4:2:0 (I420): `y` is `width * height`, `u` and `v` are
/// `ceil(width/2) * ceil(height/2)`.
pub(crate) struct Yuv420 {
    pub(crate) width: usize,
    pub(crate) height: usize,
    pub(crate) y: Vec<u8>,
    pub(crate) u: Vec<u8>,
    pub(crate) v: Vec<u8>,
}

impl Yuv420 {
    /// Width of the chroma planes.
    pub(crate) fn chroma_width(&self) -> usize {
        self.width.div_ceil(2)
    }
}

/// Limited-range BT.601 luma of an RGB triple in 0..=255 (unrounded).
fn luma(r: f32, g: f32, b: f32) -> f32 {
    16.0 + (219.0 / 255.0) * (0.299 * r + 0.587 * g + 0.114 * b)
}

/// Limited-range BT.601 (Cb, Cr) of an RGB triple in 0..=255 (unrounded).
fn chroma(r: f32, g: f32, b: f32) -> (f32, f32) {
    let k = 224.0 / 255.0;
    (
        128.0 + k * (-0.168_736 * r - 0.331_264 * g + 0.5 * b),
        128.0 + k * (0.5 * r - 0.418_688 * g - 0.081_312 * b),
    )
}

fn to_u8(x: f32) -> u8 {
    x.round().clamp(0.0, 255.0) as u8
}

/// Converts one `[height][width][3]` RGB8 picture. Odd sizes are allowed: the last chroma column
/// or row averages the pixels that exist.
pub(crate) fn rgb_to_yuv420(rgb: &[u8], width: usize, height: usize) -> Yuv420 {
    let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
    let mut y = Vec::with_capacity(width * height);
    for px in rgb.chunks_exact(3).take(width * height) {
        y.push(to_u8(luma(px[0] as f32, px[1] as f32, px[2] as f32)));
    }
    let mut u = Vec::with_capacity(cw * ch);
    let mut v = Vec::with_capacity(cw * ch);
    for cy in 0..ch {
        for cx in 0..cw {
            let (mut s, mut n) = ([0f32; 3], 0f32);
            for yy in 2 * cy..(2 * cy + 2).min(height) {
                for xx in 2 * cx..(2 * cx + 2).min(width) {
                    let p = &rgb[3 * (yy * width + xx)..][..3];
                    for c in 0..3 {
                        s[c] += p[c] as f32;
                    }
                    n += 1.0;
                }
            }
            let (cb, cr) = chroma(s[0] / n, s[1] / n, s[2] / n);
            u.push(to_u8(cb));
            v.push(to_u8(cr));
        }
    }
    Yuv420 {
        width,
        height,
        y,
        u,
        v,
    }
}

/// Pads a `[height][width][3]` picture to `w2 x h2` (at least as large) by repeating its last
/// column and row: 4:2:0 H.264 cannot code odd sizes, and OpenH264 none under 16.
pub(crate) fn pad_to(rgb: &[u8], width: usize, height: usize, w2: usize, h2: usize) -> Vec<u8> {
    if (w2, h2) == (width, height) {
        return rgb.to_vec();
    }
    let mut out = Vec::with_capacity(w2 * h2 * 3);
    for yy in 0..h2 {
        let row = &rgb[3 * width * yy.min(height - 1)..][..3 * width];
        out.extend_from_slice(row);
        for _ in width..w2 {
            out.extend_from_slice(&row[3 * (width - 1)..]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_colours() {
        // Black, white and the primaries land on the textbook limited-range BT.601 codes.
        let rgb = [
            0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 255, 0, 0, 0, 255, 128, 128, 128,
        ];
        let want = [
            (16, 128, 128),
            (235, 128, 128),
            (81, 90, 240),
            (145, 54, 34),
            (41, 240, 110),
            (126, 128, 128),
        ];
        for (i, &(wy, wu, wv)) in want.iter().enumerate() {
            let yuv = rgb_to_yuv420(&rgb[3 * i..3 * i + 3], 1, 1);
            assert_eq!((yuv.y[0], yuv.u[0], yuv.v[0]), (wy, wu, wv), "colour {i}");
        }
    }

    #[test]
    fn odd_sizes_average_existing_pixels() {
        // 3x1: chroma column 0 averages pixels 0 and 1, column 1 is pixel 2 alone.
        let rgb = [255, 0, 0, 255, 0, 0, 0, 0, 255];
        let yuv = rgb_to_yuv420(&rgb, 3, 1);
        assert_eq!(yuv.y.len(), 3);
        assert_eq!((yuv.u.len(), yuv.v.len()), (2, 2));
        assert_eq!((yuv.u[0], yuv.v[0]), (90, 240));
        assert_eq!((yuv.u[1], yuv.v[1]), (240, 110));
    }

    #[test]
    fn padding_repeats_the_edge() {
        let rgb: Vec<u8> = (0..3 * 3 * 3).map(|i| i as u8).collect(); // 3x3
        let p = pad_to(&rgb, 3, 3, 4, 5);
        assert_eq!(p.len(), 4 * 5 * 3);
        for yy in 0..5 {
            for xx in 0..4 {
                let src = 3 * (yy.min(2) * 3 + xx.min(2));
                assert_eq!(&p[3 * (yy * 4 + xx)..][..3], &rgb[src..src + 3]);
            }
        }
        assert_eq!(pad_to(&rgb[..12], 2, 2, 2, 2), rgb[..12].to_vec());
    }
}
