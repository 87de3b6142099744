//! Live streams: an open-ended generation that hands out finished blocks one at a time, whose
//! prompt can be switched from any thread while it runs (see docs/streams.md).
//!
//! [`Stream::open`] starts a worker thread that runs [`Generator::run_live`] and puts each
//! finished block (and, with a decoder, its RGB frames) into a bounded queue;
//! [`Stream::next_block`] (or the [`Iterator`]) takes them out in order. A full queue blocks
//! the worker, so a slow consumer slows the engine and memory stays flat. A
//! [`StreamControl`] (cloneable, `Send + Sync`) switches the prompt or cancels from any thread,
//! also while another thread waits in [`Stream::next_block`].
//!
//! A prompt switch applies from the next block to *start*, whose index
//! [`StreamControl::switch_prompt`] returns; blocks already in flight keep their prompt (with
//! `Recache::Window`, the cache and the context pass of the block before the switch are
//! re-encoded under the new prompt). The latents are exactly those of [`Generator::run`] with a
//! fixed prompt schedule that switches at the returned blocks.

use crate::decode::{BackgroundDecoder, DecodeDevice, Decoder, DeviceFrames};
use crate::executor::{FinishedBlock, Generator, PromptMailbox};
use crate::model::{Model, CHANNELS};
use crate::noise::NoiseSource;
use crate::prompt::PromptEmbeds;
use crate::text::TextEncoder;
use crate::{Error, GenerateOptions, Result};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest queue accepted (blocks waiting for the consumer).
pub const MAX_QUEUE_BLOCKS: usize = 1024;

/// Slowest pacing accepted (frames per second): a block's interval, frames / fps, must fit a
/// `Duration` and an `Instant` with room to spare.
pub const MIN_TARGET_FPS: f64 = 1e-6;
/// Fastest pacing accepted (frames per second).
pub const MAX_TARGET_FPS: f64 = 1e6;

/// Settings of a [`Stream`] beyond the generation's own options.
#[derive(Clone)]
pub struct StreamOptions {
    /// Finished blocks that may wait for the consumer (at least 1, default 2). When the queue
    /// is full the engine waits: a slow consumer slows it down instead of growing memory.
    pub queue_blocks: usize,
    /// Frames per second the blocks are released at (pixel frames when decoding, latent frames
    /// otherwise); 0 = as fast as the engine goes (default). A block is released no earlier
    /// than the previous one plus the previous block's frames at this rate; a late engine is
    /// never made to catch up in a burst. At most [`MAX_TARGET_FPS`], at least
    /// [`MIN_TARGET_FPS`].
    pub target_fps: f64,
    /// Decodes each block to pixels ([`StreamBlock::rgb`]) on a decode thread of its own,
    /// pipelined with the generation of the next blocks. `None`: latents only.
    pub decoder: Option<Arc<Decoder>>,
    /// Where [`StreamOptions::decoder`] runs. `None` (default): where the DiT runs
    /// ([`DecodeDevice::for_backend`]: with the CUDA backend on its first GPU, on another
    /// stream, only RGB8 coming back to the host); [`DecodeDevice::Cpu`] keeps the GPU's memory
    /// for the DiT.
    pub decoder_device: Option<DecodeDevice>,
    /// Whether [`StreamBlock::latents`] are wanted with the pixels (default `true`). With
    /// `false`, when the decoder runs on the DiT's CUDA device (one device, device latents),
    /// finished blocks go from the DiT to the decoder on the device and never cross to the
    /// host: [`StreamBlock::latents`] is then empty. Without a decoder, or with the decoder
    /// elsewhere, the latents are handed out anyway.
    pub host_latents: bool,
    /// Encodes the text of [`StreamControl::switch_prompt_text`]. `None`: text switches are an
    /// [`Error::InvalidArgument`].
    pub text_encoder: Option<Arc<TextEncoder>>,
    /// Where the text of a switch is encoded on the CPU. `Some(n)` (default `Some(0)`): on a
    /// thread pool of the stream's own, `n` threads (0: one per core), started at the first
    /// text switch, whose threads run at a lower scheduling priority than the DiT's (nice +10
    /// on Linux): an encode takes CPU time from the blocks in flight only where the CPU has
    /// time to spare, so a switch does not slow the blocks already scheduled. `None`: on the
    /// calling thread and rayon's global pool, which a CPU DiT uses too (an encode then
    /// competes with the DiT for every core: the blocks slow down while it runs).
    pub switch_encode_threads: Option<usize>,
}

impl std::fmt::Debug for StreamOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamOptions")
            .field("queue_blocks", &self.queue_blocks)
            .field("target_fps", &self.target_fps)
            .field("decoder", &self.decoder.as_ref().map(|d| d.kind()))
            .field("decoder_device", &self.decoder_device)
            .field("host_latents", &self.host_latents)
            .field("text_encoder", &self.text_encoder)
            .field("switch_encode_threads", &self.switch_encode_threads)
            .finish()
    }
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            queue_blocks: 2,
            target_fps: 0.0,
            decoder: None,
            decoder_device: None,
            host_latents: true,
            text_encoder: None,
            switch_encode_threads: Some(0),
        }
    }
}

/// One finished block of a stream, owned by the consumer.
#[derive(Clone, Debug)]
pub struct StreamBlock {
    /// Block index, 0, 1, 2, ... in order.
    pub index: u64,
    /// Absolute index of its first latent frame.
    pub first_frame: u64,
    /// Latent frames in the block.
    pub frames: usize,
    /// Latent channels (16).
    pub channels: usize,
    /// Latent height.
    pub height: usize,
    /// Latent width.
    pub width: usize,
    /// Latents `[frames, channels, height, width]`.
    pub latents: Vec<f32>,
    /// With a decoder: the block's frames as 8-bit RGB `[pixel_frames, pixel_height,
    /// pixel_width, 3]`.
    pub rgb: Option<Vec<u8>>,
    /// Pixel frames in `rgb` (0 without a decoder; the stream's first block has fewer, as the
    /// decoders' first latent frame gives fewer frames).
    pub pixel_frames: usize,
    /// Pixel height (0 without a decoder).
    pub pixel_height: usize,
    /// Pixel width (0 without a decoder).
    pub pixel_width: usize,
    /// Time from [`Stream::open`] until the block was queued for the consumer (decoded and
    /// paced).
    pub since_start: Duration,
    /// Bytes held by the KV cache when the block was finished.
    pub cache_bytes: usize,
    /// With the decoder on the DiT's devices, why this block's latents still crossed the host
    /// to it (a DiT device without peer access to the decoder's); `None` when they did not
    /// have to ([`crate::FinishedBlock::handoff_note`]).
    pub handoff_note: Option<String>,
}

/// What the worker, the decode thread, the consumer and the controls share.
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled whenever the queue, the error or the flags change.
    changed: Condvar,
    /// Prompt switches and cancellation, read by the run at every tick.
    mailbox: PromptMailbox,
    /// Blocks the engine has finished (queued, in the decoder, handed out, or waiting).
    finished: AtomicU64,
    opened: Instant,
    /// The last ticket given to a switch call (1, 2, ...): calls are ordered by when they were
    /// made, not by when their encode finished.
    tickets: AtomicU64,
    /// [`StreamOptions::switch_encode_threads`].
    encode_threads: Option<usize>,
    /// The pool that encodes switch texts, started by the first text switch (or why it could
    /// not start).
    encode_pool: OnceLock<std::result::Result<rayon::ThreadPool, String>>,
}

struct Queue {
    blocks: VecDeque<StreamBlock>,
    capacity: usize,
    /// The engine's error, until [`Stream::next_block`] reports it.
    error: Option<Error>,
    /// The worker has stopped.
    ended: bool,
    cancelled: bool,
    /// Ticket of the newest switch posted to the mailbox (0: none yet).
    posted_ticket: u64,
    /// The block that switch applies from.
    posted_block: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cancel(&self) {
        self.mailbox.cancel();
        self.lock().cancelled = true;
        self.changed.notify_all();
    }

    /// Waits for room in the queue and queues `block`; `false` when the stream was cancelled.
    fn push(&self, mut block: StreamBlock) -> bool {
        let mut q = self.lock();
        loop {
            if q.cancelled {
                return false;
            }
            if q.blocks.len() < q.capacity {
                block.since_start = self.opened.elapsed();
                q.blocks.push_back(block);
                drop(q);
                self.changed.notify_all();
                return true;
            }
            q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Sleeps until `at` unless the stream is cancelled first (`false` then).
    fn sleep_until(&self, at: Instant) -> bool {
        let mut q = self.lock();
        loop {
            if q.cancelled {
                return false;
            }
            let now = Instant::now();
            if now >= at {
                return true;
            }
            q = self
                .changed
                .wait_timeout(q, at - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Releases blocks to the queue at the target frame rate.
struct Sink {
    shared: Arc<Shared>,
    fps: f64,
    /// When the next block may be released.
    next_release: Option<Instant>,
}

impl Sink {
    /// Paces and queues `block`, whose playable frames are `frames`; `false` when cancelled.
    fn deliver(&mut self, block: StreamBlock, frames: usize) -> bool {
        if self.fps > 0.0 {
            let now = Instant::now();
            let at = self.next_release.map_or(now, |t| t.max(now));
            if !self.shared.sleep_until(at) {
                return false;
            }
            self.next_release = Some(at + Duration::from_secs_f64(frames as f64 / self.fps));
        }
        self.shared.push(block)
    }
}

/// Handle to switch a stream's prompt or cancel it from any thread (cheap to clone).
#[derive(Clone)]
pub struct StreamControl {
    shared: Arc<Shared>,
    model: Arc<Model>,
    text: Option<Arc<TextEncoder>>,
}

impl std::fmt::Debug for StreamControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamControl")
            .field("next_start", &self.shared.mailbox.next_start())
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl StreamControl {
    /// Switches to prompt embeddings `p` (`[rows, text_dim]`, checked here) from the next
    /// block to start on, and returns that block's index: the first block generated under
    /// `p`. Blocks already in flight keep their prompt (see the module docs). A second switch
    /// before that block starts replaces this one. [`Error::Cancelled`] once the stream is
    /// cancelled or has stopped.
    pub fn switch_prompt(&self, p: &PromptEmbeds) -> Result<u64> {
        let ticket = self.ticket();
        self.post(ticket, Instant::now(), p).map(|r| r.applies_from)
    }

    /// [`StreamControl::switch_prompt`] with a text prompt, encoded by the stream's text
    /// encoder ([`StreamOptions::text_encoder`]; without one, an [`Error::InvalidArgument`])
    /// where [`StreamOptions::switch_encode_threads`] says, while the calling thread waits.
    /// The stream goes on generating during the encode. The latest call wins: a call
    /// overtaken by a later one (whose encode finished first) returns the block the later
    /// one applies from, and its own prompt applies to no block
    /// ([`StreamControl::switch_prompt_text_report`] tells).
    pub fn switch_prompt_text(&self, text: &str) -> Result<u64> {
        self.switch_prompt_text_report(text).map(|r| r.applies_from)
    }

    /// [`StreamControl::switch_prompt_text`], with what the switch did and when: for latency
    /// measurements and for callers that must know whether a later call overtook this one.
    pub fn switch_prompt_text_report(&self, text: &str) -> Result<SwitchReport> {
        let enc = self.text.clone().ok_or_else(|| {
            Error::invalid("this stream has no text encoder (StreamOptions::text_encoder)")
        })?;
        let model = self.model.clone();
        let cached = enc.is_cached(text, model.config().text_len);
        let text = text.to_string();
        let encode = move || enc.prompt_embeds(&text, model.config());
        let mut r = match self.shared.encode_threads {
            None => self.switch_prompt_with(encode),
            Some(threads) => {
                let pool = self.shared.encode_pool.get_or_init(|| encode_pool(threads));
                match pool {
                    Ok(pool) => self.switch_prompt_with(|| pool.install(encode)),
                    Err(e) => Err(Error::Internal(e.clone())),
                }
            }
        }?;
        r.cached = cached;
        Ok(r)
    }

    /// A switch whose prompt embeddings `encode` makes (on the calling thread), for an encoder
    /// of the caller's: the call is ordered (latest call wins) from when it was made, before
    /// `encode` runs; the stream goes on generating while it runs. A stream already stopped
    /// returns [`Error::Cancelled`] without running `encode`; one cancelled during `encode`
    /// returns it after. `encode`'s error is returned as it is, and nothing is switched.
    pub fn switch_prompt_with(
        &self,
        encode: impl FnOnce() -> Result<PromptEmbeds>,
    ) -> Result<SwitchReport> {
        let called = Instant::now();
        let ticket = self.ticket();
        if self.is_cancelled() || self.shared.lock().ended {
            return Err(Error::Cancelled);
        }
        let p = encode()?;
        self.post(ticket, called, &p)
    }

    /// Takes the next ticket: switch calls are ordered by this.
    fn ticket(&self) -> u64 {
        self.shared.tickets.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Posts the switch with `ticket` to the worker, unless a later call's switch was posted
    /// first (then it reports being overtaken).
    fn post(&self, ticket: u64, called: Instant, p: &PromptEmbeds) -> Result<SwitchReport> {
        p.check(self.model.config())?;
        let ctx = self.model.prompt_context(&p.data, p.rows)?;
        let mut q = self.shared.lock();
        if q.cancelled || q.ended {
            return Err(Error::Cancelled);
        }
        let superseded = ticket < q.posted_ticket;
        // Before the mailbox sees it: the worker starts the switch's block after this instant.
        let posted = Instant::now();
        if !superseded {
            // Under the queue lock, so that a switch never lands after the worker has stopped
            // and calls post in ticket order.
            q.posted_block = self.shared.mailbox.switch(ctx) as u64;
            q.posted_ticket = ticket;
        }
        Ok(SwitchReport {
            applies_from: q.posted_block,
            superseded,
            cached: false,
            called,
            posted,
        })
    }

    /// Stops the stream: the worker ends at its next tick or as soon as it waits (for room in
    /// the queue, or for pacing), and [`Stream::next_block`] returns [`Error::Cancelled`],
    /// also on another thread already waiting in it. Idempotent.
    pub fn cancel(&self) {
        self.shared.cancel();
    }

    /// Whether [`StreamControl::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.shared.lock().cancelled
    }

    /// The next block to start: the block a switch made now would apply from.
    pub fn next_start(&self) -> u64 {
        self.shared.mailbox.next_start() as u64
    }

    /// When block `block` started (its first denoising step), if it is one of the last 64
    /// blocks to start: with [`SwitchReport`] it splits a switch's latency.
    pub fn block_started(&self, block: u64) -> Option<Instant> {
        self.shared.mailbox.started_at(usize::try_from(block).ok()?)
    }
}

/// What a prompt switch did, and when ([`StreamControl::switch_prompt_text_report`],
/// [`StreamControl::switch_prompt_with`]).
#[derive(Clone, Copy, Debug)]
pub struct SwitchReport {
    /// The first block generated under the switch's prompt; for a `superseded` switch, the
    /// block the later switch that overtook it applies from.
    pub applies_from: u64,
    /// A later call was posted first (its encode finished first): this call's prompt applies
    /// to no block (the latest call wins).
    pub superseded: bool,
    /// The text was in the encoder's cache: nothing was encoded.
    pub cached: bool,
    /// When the call was made.
    pub called: Instant,
    /// When the prompt was encoded and handed to the worker (`posted - called`: the encode).
    pub posted: Instant,
}

/// A pool for switch encodes: `threads` threads (0: one per core) below the DiT's priority.
fn encode_pool(threads: usize) -> std::result::Result<rayon::ThreadPool, String> {
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("bc-switch-encode-{i}"))
        .start_handler(|_| lower_priority())
        .build()
        .map_err(|e| format!("cannot start the switch encoder's threads: {e}"))
}

/// Niceness of the switch encoder's threads (the DiT's stay at the process's).
pub const SWITCH_ENCODE_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority by [`SWITCH_ENCODE_NICE`] (Linux: per
/// thread; elsewhere nothing is changed).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain system calls on the calling thread; a failure leaves the priority as
        // it was, which is only slower, never wrong.
        unsafe {
            let tid = libc::gettid();
            let now = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
            libc::setpriority(
                libc::PRIO_PROCESS,
                tid as libc::id_t,
                now.saturating_add(SWITCH_ENCODE_NICE),
            );
        }
    }
}

/// An open-ended live generation on a worker thread (see the module docs). Dropping it
/// cancels and joins the worker.
pub struct Stream {
    shared: Arc<Shared>,
    control: StreamControl,
    worker: Option<JoinHandle<()>>,
    /// Blocks handed to the consumer.
    taken: u64,
    /// Blocks the engine may finish beyond those taken (queue + in flight).
    ahead_limit: usize,
    /// An error or the cancellation has been reported: the stream has ended.
    ended: bool,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("taken", &self.taken)
            .field("finished", &self.blocks_finished())
            .field("ended", &self.ended)
            .finish()
    }
}

impl Stream {
    /// Starts a live generation of `model` (an `Arc<Model>`, an [`crate::Engine`] or a
    /// reference to one) with `opts`, `noise` and the initial `prompt`, on a worker thread.
    ///
    /// Checked here: the options (the stream needs local attention, `local_attn`, so that its
    /// KV cache stays bounded), the prompt, the stream options, the decoder's latent size and
    /// the text encoder's width. The decoder is started here too, on its device: a device that
    /// cannot be opened, or that the decoder's weights and causal state do not fit, is this
    /// call's error ([`Error::Device`], [`Error::OutOfMemory`]); its activations are allocated
    /// at the first block, and not fitting those ends the stream with an
    /// [`Error::OutOfMemory`] from [`Stream::next_block`]. A backend that fails to start (e.g.
    /// no GPU) is reported by the first [`Stream::next_block`].
    pub fn open(
        model: impl Into<Arc<Model>>,
        opts: GenerateOptions,
        noise: NoiseSource,
        prompt: PromptEmbeds,
        sopts: StreamOptions,
    ) -> Result<Stream> {
        let model: Arc<Model> = model.into();
        if sopts.queue_blocks == 0 || sopts.queue_blocks > MAX_QUEUE_BLOCKS {
            return Err(Error::invalid(format!(
                "queue_blocks must be in 1..={MAX_QUEUE_BLOCKS}, got {}",
                sopts.queue_blocks
            )));
        }
        let fps = sopts.target_fps;
        if !(fps == 0.0 || (MIN_TARGET_FPS..=MAX_TARGET_FPS).contains(&fps)) {
            return Err(Error::invalid(format!(
                "target_fps must be 0 (unpaced) or a frame rate in \
                 {MIN_TARGET_FPS:e}..={MAX_TARGET_FPS:e}, got {fps}"
            )));
        }
        if let Some(d) = &sopts.decoder {
            d.check_latent_size(CHANNELS, opts.height, opts.width)?;
        }
        if let Some(t) = &sopts.text_encoder {
            t.check_model(model.config())?;
        }
        // Validates the options, the prompt and the live run on this thread; the worker makes
        // its own generator (it borrows the model the worker owns).
        Generator::new(&model, opts.clone(), noise.clone(), &prompt)?.check_live()?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                blocks: VecDeque::new(),
                capacity: sopts.queue_blocks,
                error: None,
                ended: false,
                cancelled: false,
                posted_ticket: 0,
                posted_block: 0,
            }),
            changed: Condvar::new(),
            mailbox: PromptMailbox::new(),
            finished: AtomicU64::new(0),
            opened: Instant::now(),
            tickets: AtomicU64::new(0),
            encode_threads: sopts.switch_encode_threads,
            encode_pool: OnceLock::new(),
        });
        // Without a decoder one finished block waits for room; with one, also the decoder's
        // queue and the block being decoded.
        let ahead_limit = sopts.queue_blocks
            + 1
            + if sopts.decoder.is_some() {
                crate::decode::QUEUE_BLOCKS + 1
            } else {
                0
            };
        let sink = Sink {
            shared: shared.clone(),
            fps: sopts.target_fps,
            next_release: None,
        };
        let output = match sopts.decoder {
            None => Output::Latents(sink),
            Some(decoder) => {
                let device = sopts
                    .decoder_device
                    .unwrap_or_else(|| DecodeDevice::for_backend(opts.backend, &opts.device_ids));
                let mut px = Pixels::start(decoder, device, &opts, sink)?;
                // Finished blocks stay on the device when the decoder is the DiT's neighbour.
                px.handoff = device
                    .beside_dit(&opts)
                    .then_some((device, sopts.host_latents));
                Output::Pixels(px)
            }
        };
        let job = Worker {
            shared: shared.clone(),
            model: model.clone(),
            opts,
            noise,
            prompt,
            output,
        };
        let worker = std::thread::Builder::new()
            .name("bc-stream".into())
            .spawn(move || job.run())
            .map_err(|e| Error::Internal(format!("cannot start the stream thread: {e}")))?;
        Ok(Stream {
            control: StreamControl {
                shared: shared.clone(),
                model,
                text: sopts.text_encoder,
            },
            shared,
            worker: Some(worker),
            taken: 0,
            ahead_limit,
            ended: false,
        })
    }

    /// The next finished block, in order. Waits up to `timeout` (`None`: as long as it
    /// takes). `Ok(None)`: the timeout expired (the stream goes on). [`Error::Cancelled`]
    /// after [`StreamControl::cancel`] (blocks still queued are dropped). Another error: the
    /// engine failed; it is reported once, after the blocks finished before it, and the
    /// stream has then ended (later calls give [`Error::InvalidArgument`]).
    pub fn next_block(&mut self, timeout: Option<Duration>) -> Result<Option<StreamBlock>> {
        let deadline = timeout.map(|t| Instant::now().checked_add(t));
        let mut q = self.shared.lock();
        loop {
            if q.cancelled {
                self.ended = true;
                return Err(Error::Cancelled);
            }
            if let Some(b) = q.blocks.pop_front() {
                drop(q);
                self.shared.changed.notify_all();
                self.taken += 1;
                return Ok(Some(b));
            }
            if let Some(e) = q.error.take() {
                self.ended = true;
                return Err(e);
            }
            if q.ended {
                self.ended = true;
                return Err(Error::invalid(
                    "the stream has ended (its error was reported by an earlier call)",
                ));
            }
            let cv = &self.shared.changed;
            q = match deadline {
                // A timeout too large to represent: wait without one.
                None | Some(None) => cv.wait(q).unwrap_or_else(|e| e.into_inner()),
                Some(Some(at)) => {
                    let now = Instant::now();
                    if now >= at {
                        return Ok(None);
                    }
                    cv.wait_timeout(q, at - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// The handle that switches the prompt or cancels, from any thread.
    pub fn control(&self) -> StreamControl {
        self.control.clone()
    }

    /// Cancels the stream (as [`StreamControl::cancel`]).
    pub fn cancel(&self) {
        self.control.cancel();
    }

    /// Blocks the engine has finished so far (handed out, queued or on their way).
    pub fn blocks_finished(&self) -> u64 {
        self.shared.finished.load(Ordering::Acquire)
    }

    /// Blocks handed out by [`Stream::next_block`] so far.
    pub fn blocks_taken(&self) -> u64 {
        self.taken
    }

    /// The most blocks the engine finishes beyond those taken: the queue, plus the block
    /// waiting for room, plus (with a decoder) the decoder's queue and the block being
    /// decoded. [`Stream::blocks_finished`] never exceeds [`Stream::blocks_taken`] plus this.
    pub fn ahead_limit(&self) -> usize {
        self.ahead_limit
    }
}

impl Iterator for Stream {
    type Item = Result<StreamBlock>;

    /// The next block (waiting as long as it takes); the engine's error once; `None` after
    /// the stream has ended or was cancelled.
    fn next(&mut self) -> Option<Self::Item> {
        if self.ended {
            return None;
        }
        match self.next_block(None) {
            Ok(Some(b)) => Some(Ok(b)),
            Ok(None) | Err(Error::Cancelled) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.shared.cancel();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Blocks on their way to pixels: the decode thread, and the blocks waiting for their frames,
/// in order (the decode thread completes the oldest).
struct Pixels {
    decoder: BackgroundDecoder<Sink>,
    pending: Arc<Mutex<VecDeque<StreamBlock>>>,
    /// The decoder is on (one of) the DiT's device(s): hand finished blocks off there
    /// (`Some((device, host_latents))`, [`Generator::hand_off_to_decoder`]).
    handoff: Option<(DecodeDevice, bool)>,
}

impl Pixels {
    /// Starts the decode thread on `device` (RGB8 only comes back from a GPU).
    fn start(
        decoder: Arc<Decoder>,
        device: DecodeDevice,
        o: &GenerateOptions,
        sink: Sink,
    ) -> Result<Pixels> {
        let pending: Arc<Mutex<VecDeque<StreamBlock>>> = Arc::default();
        let waiting = pending.clone();
        let decoder = BackgroundDecoder::spawn_on(
            decoder,
            device,
            (o.height, o.width),
            false,
            sink,
            move |sink: &mut Sink, v: DeviceFrames| {
                let next = waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop_front();
                let mut block = next.ok_or_else(|| {
                    Error::Internal("decoded pixels without a waiting block".into())
                })?;
                let frames = v.frames;
                block.rgb = Some(v.rgb);
                block.pixel_frames = frames;
                block.pixel_height = v.height;
                block.pixel_width = v.width;
                if sink.deliver(block, frames) {
                    Ok(())
                } else {
                    Err(Error::Cancelled)
                }
            },
        )?;
        Ok(Pixels {
            decoder,
            pending,
            handoff: None,
        })
    }
}

/// Where the worker's blocks go: straight to the queue, or through the decoder.
enum Output {
    Latents(Sink),
    Pixels(Pixels),
}

/// What the worker thread owns.
struct Worker {
    shared: Arc<Shared>,
    model: Arc<Model>,
    opts: GenerateOptions,
    noise: NoiseSource,
    prompt: PromptEmbeds,
    output: Output,
}

impl Worker {
    /// Runs the stream until it is cancelled or fails, then records how it ended.
    fn run(self) {
        let shared = self.shared.clone();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.generate()))
            .unwrap_or_else(|_| Err(Error::Internal("the stream thread panicked".into())));
        let mut q = shared.lock();
        q.ended = true;
        match result {
            Err(Error::Cancelled) if q.cancelled => {}
            Err(e) => q.error = Some(e),
            Ok(()) => {}
        }
        drop(q);
        shared.changed.notify_all();
    }

    fn generate(self) -> Result<()> {
        let o = &self.opts;
        let mut gen = Generator::new(&self.model, o.clone(), self.noise.clone(), &self.prompt)?;
        let mut px = match self.output {
            Output::Latents(mut sink) => {
                gen.run_live(&self.shared.mailbox, |b| {
                    count(&self.shared);
                    sink.deliver(block(o, b), b.frames)
                })?;
                return Ok(());
            }
            Output::Pixels(px) => px,
        };
        if let Some((device, host_latents)) = px.handoff {
            gen.hand_off_to_decoder(device, host_latents);
        }
        let mut decode_err = None;
        let run = gen.run_live(&self.shared.mailbox, |b| {
            count(&self.shared);
            px.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back(block(o, b));
            match px.decoder.push_block(b) {
                Ok(()) => true,
                Err(e) => {
                    decode_err = Some(e);
                    false
                }
            }
        });
        match (decode_err, run) {
            (Some(e), _) => Err(e),
            (None, Err(e)) => Err(e),
            (None, Ok(_)) => px.decoder.finish().map(|_| ()),
        }
    }
}

/// Counts a block the engine has finished.
fn count(shared: &Shared) {
    shared.finished.fetch_add(1, Ordering::AcqRel);
}

/// A finished block as the consumer gets it (pixels still to come).
fn block(o: &GenerateOptions, b: &FinishedBlock) -> StreamBlock {
    StreamBlock {
        index: b.index as u64,
        first_frame: b.first_frame as u64,
        frames: b.frames,
        channels: CHANNELS,
        height: o.height,
        width: o.width,
        latents: b.latents.to_vec(),
        rgb: None,
        pixel_frames: 0,
        pixel_height: 0,
        pixel_width: 0,
        since_start: Duration::ZERO,
        cache_bytes: b.cache_bytes,
        handoff_note: b.handoff_note.map(str::to_string),
    }
}
