//! TAEHV on the device: upstream's 23-layer list walked as `decode/taehv.rs` walks it. Fused
//! over the CPU walk: the input `Clamp` is applied while the latents are turned NHWC, every ReLU
//! after a conv and a MemBlock's `+ skip(x)` and last ReLU are in the conv epilogue, `TGrow`
//! writes its frames from the conv epilogue, a conv after an `Upsample` reads through it, and the
//! last conv writes f32 for `2x - 1` and the RGB8 conversion.

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

    /// Once every MemBlock has a memory and nothing is left to trim, every latent frame takes
    /// the same walk: one key (`None` before).
    pub(super) fn graph_key(&self) -> Option<Vec<u8>> {
        (self.to_trim == 0 && self.has_mem.iter().all(|&m| m)).then(Vec::new)
    }
}

impl DevTaehv {
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
            mem.push(dev.get(c, h * s, w * s, 2)?);
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
                    let relu = matches!(self.layers.get(i + 1), Some(DevLayer::Relu));
                    let last = i + 1 == self.layers.len();
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
