//! TAEHV on the device: upstream's 23-layer list walked as `decode/taehv.rs` walks it. Fused
//! over the CPU walk: the input `Clamp` is applied while the latents are turned NHWC, every ReLU
//! after a conv and a MemBlock's `+ skip(x)` and last ReLU are in the conv epilogue, `TGrow`
//! writes its frames from the conv epilogue, a conv after an `Upsample` reads through it, and the
//! last conv writes f32 for `2x - 1` and the RGB8 conversion.
//!
//! Two walks: [`DevTaehv::frame`] takes one latent frame depth first, as the CPU does (every
//! launch one frame: at 480x832, 6240 pixels a launch at the first stage); [`DevTaehv::block`]
//! takes a block of latent frames breadth first, as upstream's parallel mode does: every
//! layer runs once over all the frames it has (a MemBlock's past is its input shifted by one
//! frame, frame 0's the carried memory; a TGrow turns `n` frames into `stride * n`), each conv
//! one launch over all of them (`ConvOut::frames`). Each output value is the same sum in the
//! same order either way, so both give the same bits (tests/decode_cuda_emulated.rs).

use super::{Dev, DevConv, Frame, In};
use crate::backend::cuda::device::DevPtr;
use crate::decode::taehv::{Layer, Taehv};
use crate::kernels::launch;
use crate::kernels::params::{BC_ACT_NONE, BC_ACT_RELU};
use crate::{Error, Result};

/// A device layer: the CPU layer list with the weights uploaded.
enum DevLayer {
    Clamp,
    Conv(DevConv),
    Relu,
    Mem {
        convs: Box<[DevConv; 3]>,
        skip: Option<DevConv>,
        slot: usize,
    },
    Up,
    TGrow {
        conv: DevConv,
        stride: usize,
    },
}

/// TAEHV's weights on the device.
pub(super) struct DevTaehv {
    layers: Vec<DevLayer>,
    z_dim: usize,
    trim: usize,
    mem_dims: Vec<(usize, usize)>,
}

/// A stream: the MemBlock memories (one frame each, bf16), whether each has been written, and
/// how many leading frames are still to be trimmed.
#[derive(Clone)]
pub(super) struct TaehvDevState {
    mem: Vec<Frame>,
    has_mem: Vec<bool>,
    to_trim: usize,
}

impl TaehvDevState {
    /// The device frames the state holds.
    pub(super) fn frames(self) -> Vec<Frame> {
        self.mem
    }

    /// As after a stream's first frames: every memory written, nothing left to trim (what a
    /// measured walk of the steady state starts from; the memories' contents are not touched).
    pub(super) fn make_steady(&mut self) {
        self.has_mem.iter_mut().for_each(|m| *m = true);
        self.to_trim = 0;
    }

    /// Once every MemBlock has a memory and nothing is left to trim, every latent frame takes
    /// the same walk: one key (`None` before).
    pub(super) fn graph_key(&self) -> Option<Vec<u8>> {
        (self.to_trim == 0 && self.has_mem.iter().all(|&m| m)).then(Vec::new)
    }
}

impl DevTaehv {
    /// Conv layer `i` on `x` (upsampled 2x first when an `Up` is `pending`): its output size,
    /// its activation (a `Relu` right after it is fused), whether it is the last layer (the
    /// decoder's output), and its source.
    fn conv_step(&self, i: usize, x: Frame, pending: bool) -> ((usize, usize), u32, bool, In) {
        let relu = matches!(self.layers.get(i + 1), Some(DevLayer::Relu));
        let hw = if pending {
            (2 * x.h, 2 * x.w)
        } else {
            (x.h, x.w)
        };
        let act = if relu { BC_ACT_RELU } else { BC_ACT_NONE };
        let src = In {
            up: pending,
            ..In::at(x, 0)
        };
        (hw, act, i + 1 == self.layers.len(), src)
    }

    pub(super) fn new(dev: &mut Dev, t: &Taehv) -> Result<DevTaehv> {
        let mut layers = Vec::with_capacity(t.layers.len());
        for l in &t.layers {
            layers.push(match l {
                Layer::Clamp => DevLayer::Clamp,
                Layer::Relu => DevLayer::Relu,
                Layer::Up => DevLayer::Up,
                Layer::Conv(c) => DevLayer::Conv(dev.conv_weights(c)?),
                Layer::TGrow { conv, stride } => DevLayer::TGrow {
                    conv: dev.conv_weights(conv)?,
                    stride: *stride,
                },
                Layer::Mem { convs, skip, slot } => DevLayer::Mem {
                    convs: Box::new([
                        dev.conv_weights(&convs[0])?,
                        dev.conv_weights(&convs[1])?,
                        dev.conv_weights(&convs[2])?,
                    ]),
                    skip: skip.as_ref().map(|s| dev.conv_weights(s)).transpose()?,
                    slot: *slot,
                },
            });
        }
        if !matches!(layers.first(), Some(DevLayer::Clamp)) {
            return Err(Error::Internal(
                "TAEHV layer list must start with Clamp".into(),
            ));
        }
        Ok(DevTaehv {
            layers,
            z_dim: t.z_dim,
            trim: t.trim,
            mem_dims: t.mem_dims.clone(),
        })
    }

    /// Pixel frames a latent frame gives: the product of the `TGrow` strides.
    pub(super) fn frames_per_latent(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                DevLayer::TGrow { stride, .. } => *stride,
                _ => 1,
            })
            .product()
    }

    pub(super) fn state(&self, dev: &mut Dev, h: usize, w: usize) -> Result<TaehvDevState> {
        let mut mem = Vec::new();
        for &(c, s) in &self.mem_dims {
            let m = dev.get(c, h * s, w * s, 2)?;
            // The past of a stream's first frame is zero (upstream's padding): the block walk
            // reads it as a frame, the frame walk leaves it out (`has_mem`).
            dev.memset(m.ptr, m.frame_bytes())?;
            mem.push(m);
        }
        Ok(TaehvDevState {
            has_mem: vec![false; mem.len()],
            mem,
            to_trim: self.trim,
        })
    }

    /// The input `Clamp` of latent frame `z` (f32 `[16][h*w]` on the device) into NHWC `x`.
    pub(super) fn input(&self, dev: &mut Dev, z: DevPtr, x: Frame) -> Result<()> {
        let null = std::ptr::null();
        let l = launch::dec_latent_in(
            z as *const f32,
            x.ptr as *mut _,
            self.z_dim,
            x.h * x.w,
            1,
            null,
            null,
            dev.nonfinite as *mut u32,
        );
        dev.run(l)
    }

    /// Decodes one latent frame from its clamped NHWC input `x` (not a pool buffer).
    pub(super) fn frame(&self, dev: &mut Dev, st: &mut TaehvDevState, x: Frame) -> Result<()> {
        self.walk(dev, st, 1, x, false)
    }

    /// Whether layer `i`'s output is a MemBlock's input (past the ReLU fused into a conv): the
    /// block walk gives it one spare leading frame, where the MemBlock puts its memory, so
    /// that the past of all its frames is one source (the input one frame back).
    fn feeds_mem(&self, i: usize) -> bool {
        self.layers[i + 1..]
            .iter()
            .find(|l| !matches!(l, DevLayer::Relu))
            .is_some_and(|l| matches!(l, DevLayer::Mem { .. }))
    }

    /// Decodes the `x.n` latent frames of a block from their clamped NHWC inputs `x` (one after
    /// the other, not a pool buffer) breadth first: each layer once over all its frames, one
    /// launch per conv (see the module docs), except that after a `TGrow` whose frames would
    /// make more than `dev.block_rows` GEMM rows a launch, they go on in groups, depth first
    /// (as [`DevTaehv::frame`] after every `TGrow`): the finer stages have pixels enough per
    /// frame, and the groups bound the activations. Memories and the trim carry from group to
    /// group and block to block as in [`DevTaehv::frame`].
    pub(super) fn block(&self, dev: &mut Dev, st: &mut TaehvDevState, x: Frame) -> Result<()> {
        self.block_from(dev, st, 1, x, false)
    }

    /// [`DevTaehv::block`] from layer `from` on (`pending`: a nearest 2x upsample not yet
    /// applied to `x`).
    fn block_from(
        &self,
        dev: &mut Dev,
        st: &mut TaehvDevState,
        from: usize,
        mut x: Frame,
        mut pending: bool,
    ) -> Result<()> {
        for i in from..self.layers.len() {
            let layer = &self.layers[i];
            let lead = usize::from(self.feeds_mem(i));
            if pending && matches!(layer, DevLayer::Mem { .. } | DevLayer::Up | DevLayer::Clamp) {
                let to_mem = usize::from(matches!(layer, DevLayer::Mem { .. }));
                x = dev.upsample_n(x, to_mem)?;
                pending = false;
            }
            match layer {
                DevLayer::Clamp | DevLayer::Relu => {}
                DevLayer::Up => pending = true,
                DevLayer::Conv(cv) => {
                    let (hw, act, last, src) = self.conv_step(i, x, pending);
                    let y = dev.conv_n(cv, &[src], hw, None, act, last, (x.n, lead))?;
                    dev.put(x);
                    x = y;
                    pending = false;
                }
                DevLayer::TGrow { conv, stride } => {
                    // Input frame f's channel chunk s is output frame stride f + s.
                    let c = x.c;
                    let y = dev.get_n(c, x.h, x.w, 2, stride * x.n, lead)?;
                    let out = (y.ptr, false, c, 1);
                    let hw = (x.h, x.w);
                    dev.conv_frames(conv, &[In::at(x, 0)], hw, None, BC_ACT_NONE, out, x.n)?;
                    dev.put(x);
                    // The rest in even groups of frames of at most `block_rows` rows at the
                    // next conv's size (through the pending upsample), in order.
                    let rows = y.h * y.w * if pending { 4 } else { 1 };
                    let g = super::group_frames(y.n, rows, dev.block_rows);
                    for part in y.groups(g) {
                        self.block_from(dev, st, i + 1, part, pending)?;
                    }
                    dev.put(y);
                    return Ok(());
                }
                DevLayer::Mem { convs, skip, slot } => {
                    let (hw, n, fb) = ((x.h, x.w), x.n, x.frame_bytes());
                    let mem = st.mem[*slot];
                    if x.ptr < x.base + fb as u64 || mem.frame_bytes() < fb {
                        return Err(Error::Internal(
                            "a TAEHV MemBlock's input has no room for its past".into(),
                        ));
                    }
                    // The past of frames 0..n: the memory, then frames 0..n-1 of the input.
                    let past = Frame {
                        ptr: x.ptr - fb as u64,
                        owned: false,
                        ..x
                    };
                    dev.copy(past.ptr, mem.ptr, fb)?;
                    let srcs = [
                        In::at(x, 0),
                        In {
                            c0: x.c,
                            ..In::at(past, 0)
                        },
                    ];
                    let relu = BC_ACT_RELU;
                    let a = dev.conv_n(&convs[0], &srcs, hw, None, relu, false, (n, 0))?;
                    let b =
                        dev.conv_n(&convs[1], &[In::at(a, 0)], hw, None, relu, false, (n, 0))?;
                    dev.put(a);
                    let sk = match skip {
                        Some(s) => Some(dev.conv_n(
                            s,
                            &[In::at(x, 0)],
                            hw,
                            None,
                            BC_ACT_NONE,
                            false,
                            (n, 0),
                        )?),
                        None => None,
                    };
                    let res = Some(sk.unwrap_or(x));
                    let y =
                        dev.conv_n(&convs[2], &[In::at(b, 0)], hw, res, relu, false, (n, lead))?;
                    dev.put(b);
                    if let Some(s) = sk {
                        dev.put(s);
                    }
                    // The next block's memory: this one's last input frame (stream-ordered after
                    // conv 0 read the copy of the old one).
                    dev.copy(mem.ptr, x.ptr + ((n - 1) * fb) as u64, fb)?;
                    st.has_mem[*slot] = true;
                    dev.put(x);
                    x = y;
                }
            }
        }
        if pending {
            x = dev.upsample_n(x, 0)?;
        }
        // The pixel frames, less the stream's first `trim`.
        let skip = st.to_trim.min(x.n);
        st.to_trim -= skip;
        dev.emit_n(x, skip, (2.0, -1.0), false)
    }

    /// Runs frame `x` through layers `from..`, depth first after each TGrow (as the CPU).
    fn walk(
        &self,
        dev: &mut Dev,
        st: &mut TaehvDevState,
        from: usize,
        mut x: Frame,
        mut pending: bool,
    ) -> Result<()> {
        for i in from..self.layers.len() {
            let layer = &self.layers[i];
            if pending && matches!(layer, DevLayer::Mem { .. } | DevLayer::Up | DevLayer::Clamp) {
                x = dev.upsample(x)?;
                pending = false;
            }
            match layer {
                // Applied by `bc_dec_latent_in` (always layer 0).
                DevLayer::Clamp => {}
                // Fused into the conv before it (`Conv, Relu` is the only place it occurs).
                DevLayer::Relu => {}
                DevLayer::Up => pending = true,
                DevLayer::Conv(cv) => {
                    let (hw, act, last, src) = self.conv_step(i, x, pending);
                    let y = dev.conv(cv, &[src], hw, None, act, last)?;
                    dev.put(x);
                    x = y;
                    pending = false;
                }
                DevLayer::TGrow { conv, stride } => {
                    let (c, hw) = (x.c, (x.h, x.w));
                    let y = dev.get(conv.shape.cout, x.h, x.w, 2)?;
                    dev.conv_into(
                        conv,
                        &[In::at(x, 0)],
                        hw,
                        None,
                        BC_ACT_NONE,
                        (y.ptr, false, c, 1),
                    )?;
                    dev.put(x);
                    for f in 0..*stride {
                        let part = Frame::view(y.ptr + (2 * f * c * x.h * x.w) as u64, c, x.h, x.w);
                        self.walk(dev, st, i + 1, part, pending)?;
                    }
                    dev.put(y);
                    return Ok(());
                }
                DevLayer::Mem { convs, skip, slot } => {
                    let hw = (x.h, x.w);
                    let mut srcs = vec![In::at(x, 0)];
                    if st.has_mem[*slot] {
                        let m = Frame {
                            c: x.c,
                            ..st.mem[*slot]
                        };
                        srcs.push(In {
                            c0: x.c,
                            ..In::at(m, 0)
                        });
                    }
                    let a = dev.conv(&convs[0], &srcs, hw, None, BC_ACT_RELU, false)?;
                    let b = dev.conv(&convs[1], &[In::at(a, 0)], hw, None, BC_ACT_RELU, false)?;
                    dev.put(a);
                    let sk = match skip {
                        Some(s) => {
                            Some(dev.conv(s, &[In::at(x, 0)], hw, None, BC_ACT_NONE, false)?)
                        }
                        None => None,
                    };
                    let y = dev.conv(
                        &convs[2],
                        &[In::at(b, 0)],
                        hw,
                        Some(sk.unwrap_or(x)),
                        BC_ACT_RELU,
                        false,
                    )?;
                    dev.put(b);
                    if let Some(s) = sk {
                        dev.put(s);
                    }
                    // The memory is the block's input (stream-ordered after conv 0 read the old one).
                    dev.copy(st.mem[*slot].ptr, x.ptr, 2 * x.c * x.h * x.w)?;
                    st.has_mem[*slot] = true;
                    dev.put(x);
                    x = y;
                }
            }
        }
        if pending {
            x = dev.upsample(x)?;
        }
        if st.to_trim > 0 {
            st.to_trim -= 1;
            dev.put(x);
            return Ok(());
        }
        dev.emit(x, (2.0, -1.0), false)
    }
}
