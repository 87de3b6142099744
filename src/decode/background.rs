//! Decoding on a thread of its own, so that pixels are made while the DiT computes the next
//! blocks: the generator hands each finished block's latents to [`BackgroundDecoder::push`] and
//! goes on; a consumer (a video writer, a frames callback) sees each block's pixel frames as
//! soon as they are decoded, in order.
//!
//! At most [`QUEUE_BLOCKS`] blocks wait for the decoder: a slow decoder slows the generator
//! instead of letting memory grow.

use super::device::no_room;
use super::{DecodeDevice, Decoder, DeviceFrames, Video};
use crate::backend::cuda::DeviceLatents;
use crate::{Error, Result};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Blocks of latents that may wait for the decoder before `push` blocks.
pub const QUEUE_BLOCKS: usize = 2;

/// A block waiting for the decode thread: latents on the host (copied), or where the DiT left
/// them on the device.
enum Block {
    Host(Vec<f32>, usize),
    Device(DeviceLatents),
}

/// Test hook: while set, device decode threads hold each block of device latents before
/// decoding it, so that a test can make the decoder slower than the DiT.
static HOLD: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

/// Makes every decode thread hold each block of device latents, undecoded (its memory still
/// lent), until called again with `false`: for tests that check a slow decoder keeps the DiT
/// from reusing that memory. Process-wide.
#[doc(hidden)]
pub fn hold_device_decodes(on: bool) {
    *HOLD.0.lock().unwrap_or_else(|e| e.into_inner()) = on;
    HOLD.1.notify_all();
}

/// Waits while [`hold_device_decodes`] is on.
fn held() {
    let mut on = HOLD.0.lock().unwrap_or_else(|e| e.into_inner());
    while *on {
        on = HOLD.1.wait(on).unwrap_or_else(|e| e.into_inner());
    }
}

/// The error of device latents sent to a decoder that is not on a device.
fn not_on_device() -> Error {
    Error::invalid("device latents need the decoder on the DiT's device (this one runs on the CPU)")
}

/// Which pixels [`BackgroundDecoder::spawn_on`] hands out per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelOutputs {
    /// RGB8 `[T][H][W][3]` only (a video file, a frames callback without f32).
    Rgb8,
    /// RGB8 and f32 `[T][3][H][W]`.
    Rgb8AndF32,
    /// f32 only (e.g. `--video x.safetensors`): on the CPU the RGB8 conversion is skipped and
    /// [`DeviceFrames::rgb`] is empty; a device decoder makes RGB8 anyway (one small kernel of
    /// the frame's last pass).
    F32,
}

impl PixelOutputs {
    /// Whether f32 frames are wanted.
    pub fn f32(self) -> bool {
        self != PixelOutputs::Rgb8
    }

    /// Whether RGB8 frames are wanted.
    pub fn rgb8(self) -> bool {
        self != PixelOutputs::F32
    }
}

/// `want_f32`: RGB8, and f32 too when `true` (what `spawn_on` took before these outputs).
impl From<bool> for PixelOutputs {
    fn from(want_f32: bool) -> Self {
        if want_f32 {
            PixelOutputs::Rgb8AndF32
        } else {
            PixelOutputs::Rgb8
        }
    }
}

/// A decoder running on its own thread, feeding each block's frames to a consumer `S`.
pub struct BackgroundDecoder<S: Send + 'static> {
    tx: Option<SyncSender<Block>>,
    worker: Option<JoinHandle<Result<S>>>,
}

impl<S: Send + 'static> BackgroundDecoder<S> {
    /// Starts the thread: it decodes `[frames, C, latent_h, latent_w]` blocks in the order they
    /// are pushed (carrying the decoder's causal state) and calls `on_frames(&mut state, video)`
    /// for each. The first error stops it; [`push`](Self::push) or [`finish`](Self::finish)
    /// then returns that error.
    pub fn spawn<F>(
        decoder: Arc<Decoder>,
        latent_h: usize,
        latent_w: usize,
        state: S,
        mut on_frames: F,
    ) -> Result<Self>
    where
        F: FnMut(&mut S, &Video) -> Result<()> + Send + 'static,
    {
        // Check the size now, on the caller's thread, so a bad size fails before any work.
        decoder.check_latent_size(decoder.latent_channels(), latent_h, latent_w)?;
        Self::start(move |rx| {
            let mut state = state;
            let mut stream = decoder.stream(latent_h, latent_w)?;
            for block in rx {
                let Block::Host(latents, frames) = block else {
                    return Err(not_on_device());
                };
                let video = stream.push(&latents, frames)?;
                on_frames(&mut state, &video)?;
            }
            Ok(state)
        })
    }

    /// [`spawn`](Self::spawn) on `device`, handing `on_frames` each block's pixels as RGB8
    /// and/or f32 `[T][3][H][W]` (`outputs`; a `bool` is `want_f32`, RGB8 always). On a CUDA
    /// device the thread opens the device
    /// (its own streams, so decoding overlaps whatever else runs on the GPU; on a GPU it shares
    /// the device's primary context, the DiT's too) and uploads the decoder
    /// ([`DecodeDevice::open_decoder`]): only those pixels come back to the host. On the CPU the
    /// frames come from [`Decoder::stream`] and [`Video::to_rgb8`].
    ///
    /// Returns once the decoder is ready: a device that cannot be opened, or weights or causal
    /// state that do not fit, are this call's error ([`Error::Device`],
    /// [`Error::OutOfMemory`]). Activations are allocated at the first block: not fitting those
    /// is an [`Error::OutOfMemory`] from a later push or from finish.
    pub fn spawn_on<F>(
        decoder: Arc<Decoder>,
        device: DecodeDevice,
        (latent_h, latent_w): (usize, usize),
        outputs: impl Into<PixelOutputs>,
        state: S,
        mut on_frames: F,
    ) -> Result<Self>
    where
        F: FnMut(&mut S, DeviceFrames) -> Result<()> + Send + 'static,
    {
        let outputs = outputs.into();
        let want_f32 = outputs.f32();
        decoder.check_latent_size(decoder.latent_channels(), latent_h, latent_w)?;
        Self::start_ready(move |rx, ready| {
            let mut state = state;
            match device.open_decoder(&decoder)? {
                Some(mut dev) => {
                    // The causal state is reserved here (begin), before ready(); activations are
                    // allocated as the first block needs them, so an OOM there ends the stream.
                    let what = format!(
                        "the {} decoder's activations for {latent_h}x{latent_w} latents do not \
                         fit on {}",
                        decoder.kind(),
                        dev.device_name()
                    );
                    dev.begin(latent_h, latent_w)
                        .map_err(|e| no_room(e, &what))?;
                    ready();
                    for block in rx {
                        let out = match block {
                            Block::Host(latents, frames) => dev.push(&latents, frames, want_f32),
                            Block::Device(d) => {
                                held();
                                // SAFETY: `d` holds its slot (the DiT writes it again only
                                // once `d` is dropped, after this call) on the DiT's device,
                                // which `push_device`'s caller made this decoder's
                                // (`push_device` below); `ready` orders the read after the
                                // block's last flow step.
                                unsafe {
                                    dev.push_device(d.ptr(), d.frames(), Some(d.ready()), want_f32)
                                }
                            }
                        };
                        on_frames(&mut state, out.map_err(|e| no_room(e, &what))?)?;
                    }
                }
                None => {
                    let mut stream = decoder.stream(latent_h, latent_w)?;
                    ready();
                    for block in rx {
                        let Block::Host(latents, frames) = block else {
                            return Err(not_on_device());
                        };
                        let v = stream.push(&latents, frames)?;
                        let out = DeviceFrames {
                            frames: v.frames,
                            height: v.height,
                            width: v.width,
                            rgb: if outputs.rgb8() {
                                v.to_rgb8()
                            } else {
                                Vec::new()
                            },
                            f32: want_f32.then_some(v.data),
                        };
                        on_frames(&mut state, out)?;
                    }
                }
            }
            Ok(state)
        })
    }

    /// Starts the thread running `work` over the queue.
    fn start<W>(work: W) -> Result<Self>
    where
        W: FnOnce(Receiver<Block>) -> Result<S> + Send + 'static,
    {
        let (tx, rx) = sync_channel::<Block>(QUEUE_BLOCKS);
        let worker = std::thread::Builder::new()
            .name("bc-decode".into())
            .spawn(move || work(rx))
            .map_err(|e| Error::Internal(format!("cannot start the decode thread: {e}")))?;
        Ok(BackgroundDecoder {
            tx: Some(tx),
            worker: Some(worker),
        })
    }

    /// [`start`](Self::start), then waits until `work` calls its `ready` (its set-up done): an
    /// error before that is returned here.
    fn start_ready<W>(work: W) -> Result<Self>
    where
        W: FnOnce(Receiver<Block>, &dyn Fn()) -> Result<S> + Send + 'static,
    {
        let (ready_tx, ready_rx) = sync_channel::<()>(1);
        let mut bg = Self::start(move |rx| {
            work(rx, &|| {
                let _ = ready_tx.send(());
            })
        })?;
        if ready_rx.recv().is_err() {
            // The thread ended before it was ready: it failed. Report its error.
            bg.tx = None;
            return match bg.join() {
                Err(e) => Err(e),
                Ok(_) => Err(Error::Internal("the decode thread ended early".into())),
            };
        }
        Ok(bg)
    }

    /// Queues one block of latent frames (copied). Waits while [`QUEUE_BLOCKS`] blocks are
    /// already queued. If the decoder has stopped on an error, returns that error.
    pub fn push(&mut self, latents: &[f32], frames: usize) -> Result<()> {
        self.send(Block::Host(latents.to_vec(), frames))
    }

    /// Queues one block of latents that stay on the DiT's device (a finished block handed off,
    /// [`crate::executor::FinishedBlock::device`]): the thread decodes them in place, after the
    /// block's last flow step, and drops `latents` (letting the DiT reuse the memory) once the
    /// decode no longer reads them. Waits as [`push`](Self::push) does. The decoder must run
    /// on the DiT's device ([`BackgroundDecoder::spawn_on`] with the
    /// [`DecodeDevice::cuda_beside`] of the DiT's devices); a decoder on the CPU stops with an
    /// [`Error::InvalidArgument`].
    pub fn push_device(&mut self, latents: DeviceLatents) -> Result<()> {
        self.send(Block::Device(latents))
    }

    /// Queues a finished block: where it is on the device when it was handed off there
    /// ([`push_device`](Self::push_device)), else its host latents ([`push`](Self::push)).
    pub fn push_block(&mut self, b: &crate::executor::FinishedBlock) -> Result<()> {
        match b.device {
            Some(d) => self.push_device(d.clone()),
            None => self.push(b.latents, b.frames),
        }
    }

    fn send(&mut self, block: Block) -> Result<()> {
        let sent = match &self.tx {
            Some(tx) => tx.send(block).is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The thread ended early: it failed. Report its error.
        self.tx = None;
        match self.join() {
            Err(e) => Err(e),
            Ok(_) => Err(Error::Internal("the decode thread ended early".into())),
        }
    }

    /// Waits for every queued block to be decoded and consumed, and returns the consumer's
    /// state (e.g. the video writer, to be finished).
    pub fn finish(mut self) -> Result<S> {
        self.tx = None;
        self.join()
    }

    fn join(&mut self) -> Result<S> {
        let worker = self
            .worker
            .take()
            .ok_or_else(|| Error::Internal("the decode thread was already joined".into()))?;
        worker
            .join()
            .map_err(|_| Error::Internal("the decode thread panicked".into()))?
    }
}

impl<S: Send + 'static> Drop for BackgroundDecoder<S> {
    fn drop(&mut self) {
        // Close the queue so the thread ends, and wait for it: no decode outlives its owner.
        self.tx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::device::Gpu;
    use crate::decode::{CudaDecoder, DecoderKind};

    fn latents(frames: usize, h: usize, w: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..frames * 16 * h * w).map(|_| rng.normal()).collect()
    }

    #[test]
    fn background_equals_direct_stream() {
        let dec = Arc::new(Decoder::tiny_taehv(3));
        let (h, w) = (2, 3);
        let lat = latents(6, h, w, 9);
        let whole = dec.decode(&lat, 6, h, w).unwrap();
        let mut bg = BackgroundDecoder::spawn(dec.clone(), h, w, Vec::new(), |acc, v| {
            acc.extend_from_slice(&v.data);
            Ok(())
        })
        .unwrap();
        let block = 3 * 16 * h * w;
        bg.push(&lat[..block], 3).unwrap();
        bg.push(&lat[block..], 3).unwrap();
        let got = bg.finish().unwrap();
        assert_eq!(got.len(), whole.data.len());
        assert_eq!(got, whole.data);
    }

    #[test]
    fn background_device_equals_direct_device_decode() {
        let dec = Arc::new(Decoder::tiny_taehv(3));
        let (h, w) = (2, 2);
        let lat = latents(4, h, w, 5);
        let mut direct = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
        direct.begin(h, w).unwrap();
        let want = direct.push(&lat, 4, true).unwrap();
        let emulated = DecodeDevice::Cuda {
            ordinal: 0,
            emulate: true,
        };
        let mut bg = BackgroundDecoder::spawn_on(
            dec,
            emulated,
            (h, w),
            true,
            (Vec::new(), Vec::new()),
            |acc, out| {
                acc.0.extend_from_slice(&out.rgb);
                acc.1
                    .extend_from_slice(out.f32.as_deref().unwrap_or_default());
                Ok(())
            },
        )
        .unwrap();
        let block = 2 * 16 * h * w;
        bg.push(&lat[..block], 2).unwrap();
        bg.push(&lat[block..], 2).unwrap();
        let (rgb, f) = bg.finish().unwrap();
        assert_eq!(rgb, want.rgb);
        assert_eq!(Some(f), want.f32);
    }

    /// A decode thread on the emulated device over `dec`, collecting the (RGB8, f32) frames of
    /// the blocks pushed to it.
    fn device_thread(dec: &Arc<Decoder>, (h, w): (usize, usize)) -> BackgroundDecoder<Frames> {
        let emulated = DecodeDevice::Cuda {
            ordinal: 0,
            emulate: true,
        };
        BackgroundDecoder::spawn_on(
            dec.clone(),
            emulated,
            (h, w),
            true,
            Frames::default(),
            |acc, out| {
                acc.0.extend_from_slice(&out.rgb);
                acc.1
                    .extend_from_slice(out.f32.as_deref().unwrap_or_default());
                Ok(())
            },
        )
        .unwrap()
    }

    type Frames = (Vec<u8>, Vec<f32>);

    /// `lat` (`frames` latent frames) through a decoder of its own (weights uploaded for it).
    fn alone(dec: &Decoder, lat: &[f32], frames: usize, (h, w): (usize, usize)) -> Frames {
        let mut d = CudaDecoder::new(dec, Gpu::open_emulated().unwrap()).unwrap();
        d.begin(h, w).unwrap();
        let out = d.push(lat, frames, true).unwrap();
        (out.rgb, out.f32.unwrap_or_default())
    }

    #[test]
    fn streams_on_one_device_share_one_upload_and_keep_their_own_state() {
        for (dec, (h, w)) in [
            (Decoder::tiny_taehv(3), (2, 3)),
            (Decoder::synthetic(DecoderKind::WanVae, 1, 4), (1, 2)),
        ] {
            let dec = Arc::new(dec);
            let a = latents(2, h, w, 11);
            let b = latents(2, h, w, 12);
            let want_a = alone(&dec, &a, 2, (h, w));
            let want_b = alone(&dec, &b, 2, (h, w));
            assert_ne!(want_a.0, want_b.0, "the two streams must differ");
            assert_eq!(dec.device_uploads(), 0);
            // Two decode threads at once, their blocks interleaved: any state shared between
            // them would mix their frames.
            let mut ta = device_thread(&dec, (h, w));
            let mut tb = device_thread(&dec, (h, w));
            let block = 16 * h * w;
            for i in 0..2 {
                ta.push(&a[i * block..(i + 1) * block], 1).unwrap();
                tb.push(&b[i * block..(i + 1) * block], 1).unwrap();
            }
            assert_eq!(ta.finish().unwrap(), want_a, "{}", dec.kind());
            assert_eq!(tb.finish().unwrap(), want_b, "{}", dec.kind());
            assert_eq!(
                dec.device_uploads(),
                1,
                "{}: one upload per device",
                dec.kind()
            );
            // A later stream (the next generation) reuses the upload too.
            let mut tc = device_thread(&dec, (h, w));
            tc.push(&a, 2).unwrap();
            assert_eq!(tc.finish().unwrap(), want_a);
            assert_eq!(dec.device_uploads(), 1);
        }
    }

    #[test]
    fn device_weights_are_kept_per_device_until_released() {
        let dec = Decoder::tiny_taehv(5);
        let dev = |ordinal| DecodeDevice::Cuda {
            ordinal,
            emulate: true,
        };
        assert!(dec.weights_on(DecodeDevice::Cpu).unwrap().is_none());
        let w0 = dec.weights_on(dev(0)).unwrap().unwrap();
        let again = dec.weights_on(dev(0)).unwrap().unwrap();
        assert!(Arc::ptr_eq(&w0, &again));
        assert_eq!(w0.device(), Some(dev(0)));
        assert!(w0.bytes() > 0);
        let w1 = dec.weights_on(dev(1)).unwrap().unwrap();
        assert!(!Arc::ptr_eq(&w0, &w1), "another device gets its own copy");
        assert_eq!(dec.device_uploads(), 2);
        // A decoder over the shared weights uploads nothing and reads those weights.
        let d = dev(0).open_decoder(&dec).unwrap().unwrap();
        assert!(Arc::ptr_eq(d.weights(), &w0));
        assert_eq!(dec.device_uploads(), 2);
        // Private weights (CudaDecoder::new) are not shareable.
        let own = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
        assert_eq!(own.weights().device(), None);
        let e = CudaDecoder::on(own.weights().clone())
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(e, Error::Internal(_)), "{e:?}");
        // Released: the next stream uploads again; holders keep theirs alive meanwhile.
        dec.release_devices();
        let w2 = dec.weights_on(dev(0)).unwrap().unwrap();
        assert!(!Arc::ptr_eq(&w0, &w2));
        assert_eq!(dec.device_uploads(), 3);
        drop((d, w0));
    }

    #[test]
    fn cpu_spawn_on_gives_the_streams_frames_as_rgb8_and_f32() {
        let dec = Arc::new(Decoder::tiny_taehv(3));
        let (h, w) = (2, 3);
        let lat = latents(5, h, w, 4);
        let whole = dec.decode(&lat, 5, h, w).unwrap();
        for want_f32 in [false, true] {
            let mut bg = BackgroundDecoder::spawn_on(
                dec.clone(),
                DecodeDevice::Cpu,
                (h, w),
                want_f32,
                (Vec::new(), Vec::new(), 0),
                |acc, out| {
                    acc.0.extend_from_slice(&out.rgb);
                    if let Some(f) = &out.f32 {
                        acc.1.extend_from_slice(f);
                    }
                    acc.2 += out.frames;
                    Ok(())
                },
            )
            .unwrap();
            let block = 16 * h * w;
            bg.push(&lat[..2 * block], 2).unwrap();
            bg.push(&lat[2 * block..], 3).unwrap();
            let (rgb, f, frames) = bg.finish().unwrap();
            assert_eq!(frames, whole.frames);
            assert_eq!(rgb, whole.to_rgb8());
            assert_eq!(f, if want_f32 { whole.data.clone() } else { vec![] });
        }
        // f32 only: the same f32 frames, no RGB8 made.
        let mut bg = BackgroundDecoder::spawn_on(
            dec.clone(),
            DecodeDevice::Cpu,
            (h, w),
            PixelOutputs::F32,
            (Vec::new(), Vec::new(), 0),
            |acc, out| {
                acc.0.extend_from_slice(&out.rgb);
                acc.1
                    .extend_from_slice(out.f32.as_deref().unwrap_or_default());
                acc.2 += out.frames;
                Ok(())
            },
        )
        .unwrap();
        bg.push(&lat, 5).unwrap();
        let (rgb, f, frames) = bg.finish().unwrap();
        assert_eq!(frames, whole.frames);
        assert!(rgb.is_empty(), "RGB8 made when only f32 was wanted");
        assert!(f == whole.data, "the f32 frames differ without RGB8");
    }

    #[test]
    fn a_device_that_cannot_open_fails_the_spawn_itself() {
        let dec = Arc::new(Decoder::tiny_taehv(3));
        let gone = DecodeDevice::Cuda {
            ordinal: 4000,
            emulate: false,
        };
        let r = BackgroundDecoder::spawn_on(dec, gone, (2, 2), false, (), |_, _| Ok(()));
        match r {
            Err(Error::Device(m)) => assert!(
                m.contains("CUDA device 4000") && m.contains("decoder_device = \"cpu\""),
                "{m}"
            ),
            Err(e) => panic!("expected a device error, got {e:?}"),
            Ok(_) => panic!("a decoder on CUDA device 4000 started"),
        }
    }

    #[test]
    fn consumer_error_is_reported() {
        let dec = Arc::new(Decoder::tiny_taehv(3));
        let (h, w) = (2, 2);
        let lat = latents(3, h, w, 1);
        let mut bg = BackgroundDecoder::spawn(dec, h, w, (), |_, _| {
            Err(Error::invalid("consumer refused"))
        })
        .unwrap();
        // The first push is queued; the error surfaces on a later push or at finish.
        let mut err = None;
        for _ in 0..8 {
            if let Err(e) = bg.push(&lat, 3) {
                err = Some(e);
                break;
            }
        }
        let e = match err {
            Some(e) => e,
            None => bg.finish().map(|_| ()).expect_err("finish must fail"),
        };
        assert!(e.to_string().contains("consumer refused"), "{e}");
    }
}
