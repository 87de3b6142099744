//! Finished blocks handed to a decoder on one of several devices
//! ([`MultiCudaBackend`], [`crate::backend::Backend::hand_off_finals`]), without crossing to
//! the host: a block that becomes final on the decoder's device is lent in place, as on one
//! device; a block final on another device is copied device to device (the peer copy of
//! [`super::device::Gpu::copy_to_peer`], ordered with both compute streams) into a buffer on
//! the decoder's device, which is then lent the same way, with a mark on that device's compute
//! stream after the copy. The relay buffers are few ([`RELAY_BUFFERS`]): when all are still
//! read, the DiT waits for the oldest one's reader ([`super::handoff_waits`]), so a slow
//! decoder slows the DiT instead of reading a rewritten buffer.
//!
//! A device without peer access to the decoder's (`cuDeviceCanAccessPeer`) hands its finished
//! blocks to the host as before ([`MultiCudaBackend::handoff_note`] says so).

use super::resident::SharedMark;
use super::MultiCudaBackend;
use crate::{Error, Result};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Relay buffers on the decoder's device: the decode thread's queue and the block it decodes
/// ([`crate::decode::QUEUE_BLOCKS`] + 1); one more finished block waits for the oldest.
pub(super) const RELAY_BUFFERS: usize = crate::decode::QUEUE_BLOCKS + 1;

static RELAYS: AtomicUsize = AtomicUsize::new(0);

/// Test hook: hand-offs treat every pair of devices as without peer access.
static DENY_PEER: AtomicBool = AtomicBool::new(false);

/// Makes later hand-offs treat every pair of logical devices as without peer access (what
/// `cuDeviceCanAccessPeer` = 0 gives on a GPU pair), so that the host path they fall back to
/// can be tested on emulated devices. Process-wide.
#[doc(hidden)]
pub fn deny_peer_handoff(on: bool) {
    DENY_PEER.store(on, Ordering::Relaxed);
}

/// Finished blocks copied device to device to the decoder's device in this process (one peer
/// copy of the block's latents each): lets tests check which path a hand-off took.
pub fn handoff_relays() -> usize {
    RELAYS.load(Ordering::Relaxed)
}

impl MultiCudaBackend<'_> {
    /// Hands finished blocks off to a decoder on GPU `ordinal` from now on (`download`: their
    /// latents come to the host too). `false` when no logical device is on that GPU or the
    /// latents are not kept on the devices.
    pub(super) fn hand_off_to(&mut self, download: bool, ordinal: usize) -> bool {
        let kept = self.devs.iter().all(|d| d.copts.device_latents);
        let Some(dec) = self.ordinals.iter().position(|&o| o == ordinal) else {
            return false;
        };
        if !kept {
            return false;
        }
        self.decoder = Some(dec);
        let mut host = Vec::new();
        let denied = DENY_PEER.load(Ordering::Relaxed);
        for (s, dev) in self.devs.iter_mut().enumerate() {
            if s == dec || (self.peer[s][dec] && !denied) {
                dev.hand_off(download);
                dev.res.relay = s != dec;
            } else {
                host.push(s);
            }
        }
        self.handoff_note = (!host.is_empty()).then(|| {
            format!(
                "blocks finished on device(s) {host:?} cross the host to the decoder on GPU \
                 {ordinal}: no peer access between them"
            )
        });
        true
    }

    /// Copies the blocks that the last flow step finished on other devices than the
    /// decoder's into relay buffers there, and lends them to the decoder.
    pub(super) fn relay_finals(&mut self) -> Result<()> {
        let Some(dec) = self.decoder else {
            return Ok(());
        };
        for s in 0..self.devs.len() {
            let finished = std::mem::take(&mut self.devs[s].res.relayed);
            for (block, slot, frames) in finished {
                if s == dec {
                    return Err(Error::Internal("a block relayed to its own device".into()));
                }
                let flen = crate::model::CHANNELS * self.opts.height * self.opts.width;
                let buf = self.devs[dec].take_relay()?;
                let (src, dst) = (&self.devs[s], &self.devs[dec]);
                src.gpu
                    .copy_to_peer(&dst.gpu, &[(buf, slot, frames * flen * 4)])?;
                dst.gpu.bind()?;
                let ready = Arc::new(SharedMark(dst.gpu.mark_compute()?));
                self.devs[dec].res.lend(block, buf, frames, &ready);
                RELAYS.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Why some finished blocks still cross the host on their way to the decoder (a device
    /// without peer access to the decoder's), when they do.
    pub fn handoff_note(&self) -> Option<&str> {
        self.handoff_note.as_deref()
    }
}
