//! TEMPORARY stand-in for `crate::stream` (same names), until the live Stream API lands: runs
//! the generator in chunks of blocks on a worker thread. Prompt switches are not applied.
#![allow(missing_docs, dead_code)]

use crate::decode::Decoder;
use crate::TextEncoder;
use crate::{Engine, Error, GenerateOptions, Generator, NoiseSource, PromptEmbeds, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Default)]
pub struct StreamOptions {
    pub queue_blocks: usize,
    pub target_fps: f64,
    pub decoder: Option<Arc<Decoder>>,
    pub text_encoder: Option<Arc<TextEncoder>>,
}

pub struct StreamBlock {
    pub index: u64,
    pub rgb: Option<Vec<u8>>,
    pub pixel_frames: usize,
    pub pixel_height: usize,
    pub pixel_width: usize,
    pub since_start: Duration,
}

#[derive(Clone)]
pub struct StreamControl {
    cancel: Arc<AtomicBool>,
    next: Arc<AtomicU64>,
}

impl StreamControl {
    pub fn switch_prompt_text(&self, _t: &str) -> Result<u64> {
        Ok(self.next.load(Ordering::SeqCst) + 1)
    }
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
}

pub struct Stream {
    rx: Receiver<Result<StreamBlock>>,
    control: StreamControl,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Stream {
    pub fn open(
        engine: Arc<Engine>,
        opts: GenerateOptions,
        noise: NoiseSource,
        prompt: PromptEmbeds,
        sopts: StreamOptions,
    ) -> Result<Stream> {
        let (tx, rx) = sync_channel(sopts.queue_blocks.max(1));
        let control = StreamControl {
            cancel: Arc::new(AtomicBool::new(false)),
            next: Arc::new(AtomicU64::new(0)),
        };
        let c = control.clone();
        let dec = sopts
            .decoder
            .clone()
            .ok_or_else(|| Error::invalid("decoder"))?;
        let worker = std::thread::spawn(move || {
            let start = Instant::now();
            let mut index = 0u64;
            let mut ds = match dec.stream(opts.height, opts.width) {
                Ok(d) => d,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let gen = match Generator::new(engine.model(), opts.clone(), noise, &prompt) {
                Ok(g) => g,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !c.cancel.load(Ordering::SeqCst) {
                let r = gen.run(4, |b| {
                    let v = match ds.push(b.latents, b.frames) {
                        Ok(v) => v,
                        Err(_) => return false,
                    };
                    c.next.store(index, Ordering::SeqCst);
                    let blk = StreamBlock {
                        index,
                        rgb: Some(v.to_rgb8()),
                        pixel_frames: v.frames,
                        pixel_height: v.height,
                        pixel_width: v.width,
                        since_start: start.elapsed(),
                    };
                    index += 1;
                    if sopts.target_fps > 0.0 {
                        std::thread::sleep(Duration::from_secs_f64(
                            v.frames as f64 / sopts.target_fps,
                        ));
                    }
                    tx.send(Ok(blk)).is_ok() && !c.cancel.load(Ordering::SeqCst)
                });
                if r.is_err() {
                    return;
                }
            }
        });
        Ok(Stream {
            rx,
            control,
            worker: Some(worker),
        })
    }

    pub fn next_block(&mut self, timeout: Option<Duration>) -> Result<Option<StreamBlock>> {
        if self.control.cancel.load(Ordering::SeqCst) {
            return Err(Error::Cancelled);
        }
        match self
            .rx
            .recv_timeout(timeout.unwrap_or(Duration::from_secs(3600)))
        {
            Ok(Ok(b)) => Ok(Some(b)),
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Cancelled),
        }
    }

    pub fn control(&self) -> StreamControl {
        self.control.clone()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.control.cancel();
        // Unblock a worker waiting on a full queue.
        while self.rx.try_recv().is_ok() {}
        let (_, rx) = sync_channel(1);
        let old = std::mem::replace(&mut self.rx, rx);
        drop(old);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
