//! The denoising state on the device ([`Backend::keeps_latents`]): every block being denoised
//! has a device buffer of its latents (a slot), filled from the host once, when the block
//! first enters a window; each tick the window buffer `lat` is gathered from the slots
//! (device-to-device copies), the forward leaves its flows on the device, and `bc_flow_step`
//! steps and renoises every slot in place (`x0 = x - sigma v`, `x = (1 - sn) x0 + sn noise`),
//! the same f32 arithmetic as the host step. Only the renoise goes up and only finished
//! blocks come back; a final block's slot keeps its latents for its context pass, then
//! returns to a pool.
//!
//! With several devices ([`super::MultiCudaBackend`]) each device has its own slots and holds
//! the blocks placed on it: a device loads only its own members into `lat` (the embedding
//! reads no other rows), a block placed on another device than last tick moves there once,
//! slot to slot ([`move_held`], a peer copy ordered with both compute streams), and each
//! device steps its own members.
//!
//! Handed off ([`CudaBackend::hand_off`], for a decoder on the same device): a finished block
//! is not downloaded unless its latents are wanted; [`DeviceLatents`] (the slot's pointer and a
//! mark after the block's last flow step) goes to the decoder instead, and the slot is not
//! written again until every clone of it is dropped (the decoder has read it): a slot whose
//! block was handed off waits for that before it is reused, and the backend waits for all of
//! them before its buffers are freed.
//!
//! [`Backend::keeps_latents`]: crate::backend::Backend::keeps_latents

use super::device::{DevPtr, Mark};
use super::ops::{self, NULL};
use super::tables::Shape;
use super::CudaBackend;
use crate::backend::FlowStep;
use crate::model::{Member, CHANNELS};
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

static DEVICE_FLOW_STEPS: AtomicUsize = AtomicUsize::new(0);
static LATENT_MOVES: AtomicUsize = AtomicUsize::new(0);

/// Flow steps run on a device in this process (one per denoising member and tick with
/// [`super::CudaOptions::device_latents`]): lets tests check that the latents stayed there.
pub fn device_flow_steps() -> usize {
    DEVICE_FLOW_STEPS.load(Ordering::Relaxed)
}

/// Blocks whose device latents moved from one logical device to another in this process (one
/// peer copy of a block's latents each, `move_held`): lets tests count what a placement that
/// moves blocks between devices costs.
pub fn latent_moves() -> usize {
    LATENT_MOVES.load(Ordering::Relaxed)
}

/// Moves the held latents of every member's block (`blocks[i]`) that another device holds to
/// the device it is placed on this tick (`placement[device]`: member indices), one peer copy
/// slot to slot per block. The copy runs after the work queued on both devices (the source's
/// last step of the block, the destination's last read of the slot it reuses), the
/// destination's later work after it, and the source's next use of the freed slot is queued
/// behind it on the source's stream ([`super::device::Gpu::copy_to_peer`]).
pub(super) fn move_held(
    devs: &mut [CudaBackend],
    members: &[Member],
    blocks: &[usize],
    placement: &[Vec<usize>],
) -> Result<()> {
    if blocks.len() != members.len() {
        return Err(Error::Internal("one block per member expected".into()));
    }
    for dst in 0..devs.len() {
        for &i in &placement[dst] {
            let block = blocks[i];
            if devs[dst].res.slots.contains_key(&block) {
                continue;
            }
            let Some((src, from)) = devs
                .iter()
                .enumerate()
                .find_map(|(d, dev)| dev.res.slots.get(&block).map(|&s| (d, s)))
            else {
                continue; // new: uploaded from the host by `load_latents`
            };
            let values = members[i].latents.len();
            let to = devs[dst].take_slot(values)?;
            let copied = devs[src]
                .gpu
                .copy_to_peer(&devs[dst].gpu, &[(to, from, values * 4)]);
            if let Err(e) = copied {
                devs[dst].res.pool.push(to); // the slot stays free, not lost
                return Err(e);
            }
            devs[dst].res.slots.insert(block, to);
            devs[src].release_held(block);
            LATENT_MOVES.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// A finished block's latents left where they are on the device, for a decoder there
/// ([`crate::decode::BackgroundDecoder::push_device`]): `[frames][16][h][w]` f32 at
/// [`DeviceLatents::ptr`], complete once [`DeviceLatents::ready`] is reached. The slot holding
/// them is not written again until this value and all its clones are dropped: drop it once the
/// decode no longer reads them.
#[derive(Clone)]
pub struct DeviceLatents(Arc<Handed>);

struct Handed {
    ptr: DevPtr,
    frames: usize,
    ready: Arc<SharedMark>,
    lease: Arc<Lease>,
}

/// A mark shared by the blocks that became final in one step.
pub(super) struct SharedMark(pub(super) Mark);

// SAFETY: a mark is only waited on (stream waits, from any thread of the process: the driver's
// events are not tied to a thread) and destroyed once, by the last owner.
unsafe impl Send for SharedMark {}
// SAFETY: as above; shared access only waits on it.
unsafe impl Sync for SharedMark {}

impl Drop for Handed {
    fn drop(&mut self) {
        self.lease.end();
    }
}

impl DeviceLatents {
    /// The device address of the latents (in the DiT's context).
    pub fn ptr(&self) -> DevPtr {
        self.0.ptr
    }

    /// Latent frames at [`DeviceLatents::ptr`].
    pub fn frames(&self) -> usize {
        self.0.frames
    }

    /// The mark on the DiT's compute stream after which the latents are complete: a reader on
    /// another stream waits for it first ([`super::device::Gpu::compute_wait`]).
    pub fn ready(&self) -> &Mark {
        &self.0.ready.0
    }
}

impl std::fmt::Debug for DeviceLatents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLatents")
            .field("ptr", &self.0.ptr)
            .field("frames", &self.0.frames)
            .finish()
    }
}

/// Whether the readers of a handed-off slot are done.
#[derive(Default)]
struct Lease {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Lease {
    fn end(&self) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }

    fn is_done(&self) -> bool {
        *self.done.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait(&self) {
        let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*d {
            d = self.cv.wait(d).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Waits for the reader of a handed-off slot ([`handoff_waits`]).
static LEASE_WAITS: AtomicUsize = AtomicUsize::new(0);

/// How many times a backend waited for a decoder to finish reading a handed-off block before
/// reusing its slot (in this process): lets tests check that a slow decoder holds the slot.
pub fn handoff_waits() -> usize {
    LEASE_WAITS.load(Ordering::Relaxed)
}

/// The latent slots: which block holds which, and the free ones.
pub(super) struct Resident {
    /// Block -> its latents on the device (`block_frames` frames).
    slots: HashMap<usize, DevPtr>,
    /// Free slots (of the run's `lat_slots` buffer, one per window member).
    pool: Vec<DevPtr>,
    /// The members of the last resident forward: (block, first frame, frames).
    last: Option<Vec<(usize, usize, usize)>>,
    /// Hand finished blocks off on the device (`Some(download)`: also download them).
    handoff: Option<bool>,
    /// Finished blocks are relayed to the decoder's device rather than lent in place (with
    /// several devices, this one not the decoder's): `step_held` leaves them in `relayed`.
    pub(super) relay: bool,
    /// Finished blocks left for a relay by the last `step_held`: (block, slot, frames).
    pub(super) relayed: Vec<(usize, DevPtr, usize)>,
    /// Buffers on this device (the decoder's) that blocks finished on other devices are
    /// copied into, least recently taken first ([`super::relay`]).
    pub(super) relay_bufs: std::collections::VecDeque<DevPtr>,
    /// Finished blocks handed off and not yet taken by the executor.
    handed: HashMap<usize, DeviceLatents>,
    /// Slots handed off whose readers may not be done.
    lent: HashMap<DevPtr, Arc<Lease>>,
}

impl Resident {
    /// `count` free slots of `bytes` each in the buffer at `base`.
    pub(super) fn new(base: DevPtr, count: usize, bytes: usize) -> Self {
        Resident {
            slots: Default::default(),
            pool: (0..count)
                .rev()
                .map(|i| base + (i * bytes) as u64)
                .collect(),
            last: None,
            handoff: None,
            relay: false,
            relayed: Vec::new(),
            relay_bufs: Default::default(),
            handed: HashMap::new(),
            lent: HashMap::new(),
        }
    }

    /// Lends `ptr` (the `frames` latent frames of `block`, complete at `ready`) to a decoder
    /// on this device: [`CudaBackend::take_handed`] gives it out, and `ptr` is not written
    /// again before every clone is dropped (see [`Resident::wait_for`]).
    pub(super) fn lend(
        &mut self,
        block: usize,
        ptr: DevPtr,
        frames: usize,
        ready: &Arc<SharedMark>,
    ) {
        let lease = Arc::new(Lease::default());
        self.lent.insert(ptr, lease.clone());
        let handed = DeviceLatents(Arc::new(Handed {
            ptr,
            frames,
            ready: ready.clone(),
            lease,
        }));
        self.handed.insert(block, handed);
    }

    /// Forgets the leases that ended; whether `ptr` is still lent.
    pub(super) fn is_lent(&mut self, ptr: DevPtr) -> bool {
        self.lent.retain(|_, l| !l.is_done());
        self.lent.contains_key(&ptr)
    }

    /// Waits until the readers of `ptr`, if it is lent, are done (counted by
    /// [`handoff_waits`]): before `ptr` is written again.
    pub(super) fn wait_for(&mut self, ptr: DevPtr) {
        if let Some(l) = self.lent.remove(&ptr) {
            if !l.is_done() {
                LEASE_WAITS.fetch_add(1, Ordering::Relaxed);
                l.wait();
            }
        }
    }

    /// Waits until no reader of a handed-off slot is left (before the slots are freed).
    pub(super) fn wait_lent(&mut self) {
        self.handed.clear();
        self.relayed.clear();
        for (_, l) in self.lent.drain() {
            if !l.is_done() {
                LEASE_WAITS.fetch_add(1, Ordering::Relaxed);
                l.wait();
            }
        }
    }
}

impl CudaBackend<'_> {
    fn flen(&self) -> usize {
        CHANNELS * self.opts.height * self.opts.width
    }

    /// The window's latents into `lat` (member by member, at their first frames): with `held`
    /// (member i's block `held[i]`) those of this device's members (`own`) from the block's
    /// slot, taking a slot and uploading the member's latents into it when the block has none
    /// yet; without, every member's uploaded from the host.
    pub(super) fn load_latents(
        &mut self,
        members: &[Member],
        held: Option<&[usize]>,
        own: &[bool],
    ) -> Result<()> {
        let flen = self.flen();
        let mut frame = 0usize;
        for (i, m) in members.iter().enumerate() {
            let dst = self.b.lat + (frame * flen * 4) as u64;
            frame += m.latents.len() / flen;
            let Some(block) = held.map(|h| h[i]) else {
                self.gpu.upload_staged(dst, m.latents)?;
                continue;
            };
            if !own.get(i).copied().unwrap_or(false) {
                continue; // another device's member: its rows are not computed here
            }
            let slot = match self.res.slots.get(&block) {
                Some(&s) => s,
                None => {
                    let s = self.take_slot(m.latents.len())?;
                    if let Err(e) = self.gpu.upload_staged(s, m.latents) {
                        self.res.pool.push(s); // the slot stays free, not lost
                        return Err(e);
                    }
                    self.res.slots.insert(block, s);
                    s
                }
            };
            self.gpu.copy(dst, slot, m.latents.len() * 4)?;
        }
        Ok(())
    }

    /// A free latent slot of one block (`values` f32 at most).
    fn take_slot(&mut self, values: usize) -> Result<DevPtr> {
        let cap = self.opts.block_frames * self.flen();
        if values > cap {
            return Err(Error::Internal(format!(
                "a member of {values} latent values is larger than a block ({cap})"
            )));
        }
        // A slot no decoder reads if there is one, else the next one, once its reader is done.
        let pool = &mut self.res.pool;
        let lent = &mut self.res.lent;
        lent.retain(|_, l| !l.is_done());
        let at = pool
            .iter()
            .rposition(|s| !lent.contains_key(s))
            .or_else(|| pool.len().checked_sub(1))
            .ok_or_else(|| {
                Error::Internal(
                    "more blocks in flight than latent slots (one per window member)".into(),
                )
            })?;
        let slot = pool.remove(at);
        self.res.wait_for(slot);
        Ok(slot)
    }

    /// A buffer on this device (the decoder's) for a finished block of another device
    /// ([`super::relay`]): a free one, a new one while fewer than `RELAY_BUFFERS` exist, else
    /// the least recently taken once its reader is done (the DiT waits for a slow decoder
    /// here, as [`Self::take_slot`] does for a slot lent in place).
    pub(super) fn take_relay(&mut self) -> Result<DevPtr> {
        let bufs: Vec<DevPtr> = self.res.relay_bufs.iter().copied().collect();
        let free = bufs.iter().position(|&b| !self.res.is_lent(b));
        let at = match free {
            Some(at) => at,
            None if bufs.len() < super::relay::RELAY_BUFFERS => {
                let bytes = self.opts.block_frames * self.flen() * 4;
                let b = self.alloc_run(bytes)?;
                self.res.relay_bufs.push_back(b);
                bufs.len()
            }
            None => 0,
        };
        let b = self
            .res
            .relay_bufs
            .remove(at)
            .ok_or_else(|| Error::Internal("no relay buffer".into()))?;
        self.res.wait_for(b);
        self.res.relay_bufs.push_back(b);
        Ok(b)
    }

    /// From now on, finished blocks are handed off on the device ([`Self::take_handed`]) and
    /// downloaded only when `download` (their latents are wanted on the host too).
    pub(super) fn hand_off(&mut self, download: bool) {
        self.res.handoff = Some(download);
    }

    /// The device latents of `block`, finished and handed off by the last [`Self::step_held`].
    pub(super) fn take_handed(&mut self, block: usize) -> Option<DeviceLatents> {
        self.res.handed.remove(&block)
    }

    /// One forward over `members` from their held latents (`blocks[i]`), flows left in `flow`.
    pub(super) fn forward_held(&mut self, members: &[Member], blocks: &[usize]) -> Result<()> {
        if blocks.len() != members.len() {
            return Err(Error::Internal("one block per member expected".into()));
        }
        let shape = self.forward_window(members, Some(blocks))?;
        let all: Vec<usize> = (0..members.len()).collect();
        self.set_last(blocks, &shape, &all);
        Ok(())
    }

    /// Records the members (`own`: indices into `blocks` and `shape`) that the next
    /// [`Self::step_held`] steps, in that order.
    pub(super) fn set_last(&mut self, blocks: &[usize], shape: &Shape, own: &[usize]) {
        self.res.last = Some(
            own.iter()
                .map(|&i| (blocks[i], shape.fr0[i], shape.frames[i]))
                .collect(),
        );
    }

    /// `bc_flow_step` on the slot of every member of the last [`Self::forward_held`] that has
    /// a step; downloads the blocks that became final.
    pub(super) fn step_held(
        &mut self,
        steps: &[Option<FlowStep>],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let last = self
            .res
            .last
            .take()
            .ok_or_else(|| Error::Internal("a flow step without a forward".into()))?;
        if steps.len() != last.len() {
            return Err(Error::Internal("one flow step per member expected".into()));
        }
        let flen = self.flen();
        let noise = self.b.step_noise;
        let (sig, sn) = (
            self.b.step_sigma,
            self.b.step_sigma + (self.max_frames * 4) as u64,
        );
        let nf: usize = last.iter().map(|l| l.1 + l.2).max().unwrap_or(0);
        let (mut sigma, mut next) = (vec![0f32; nf], vec![-1f32; nf]);
        for (s, &(_, f0, n)) in steps.iter().zip(&last) {
            let Some(s) = s else { continue };
            sigma[f0..f0 + n].fill(s.sigma);
            if let Some((sn_val, renoise)) = s.next {
                if renoise.len() != n * flen {
                    return Err(Error::Internal("renoise of the wrong size".into()));
                }
                next[f0..f0 + n].fill(sn_val);
                self.gpu
                    .upload_staged(noise + (f0 * flen * 4) as u64, renoise)?;
            }
        }
        self.gpu.upload_staged(sig, &sigma)?;
        self.gpu.upload_staged(sn, &next)?;
        let mut out = vec![None; steps.len()];
        let mut finals = Vec::new();
        for (i, (s, &(block, f0, n))) in steps.iter().zip(&last).enumerate() {
            let Some(s) = s else { continue };
            let slot =
                *self.res.slots.get(&block).ok_or_else(|| {
                    Error::Internal(format!("block {block} has no device latents"))
                })?;
            let (fo, bo) = ((f0 * flen * 4) as u64, (f0 * 4) as u64);
            let renoise = s.next.is_some();
            ops::flow_step(
                &self.gpu,
                slot,
                self.b.flow + fo,
                if renoise { noise + fo } else { NULL },
                NULL,
                sig + bo,
                if renoise { sn + bo } else { NULL },
                n,
                flen,
            )?;
            DEVICE_FLOW_STEPS.fetch_add(1, Ordering::Relaxed);
            if !renoise {
                finals.push((i, slot, n));
            }
        }
        let download = match self.res.handoff {
            Some(download) if !finals.is_empty() && self.res.relay => {
                // Copied to the decoder's device by the caller (`super::relay`).
                for &(i, slot, n) in &finals {
                    self.res.relayed.push((last[i].0, slot, n));
                    out[i] = Some(Vec::new());
                }
                download
            }
            Some(download) if !finals.is_empty() => {
                let ready = Arc::new(SharedMark(self.gpu.mark_compute()?));
                for &(i, slot, n) in &finals {
                    self.res.lend(last[i].0, slot, n, &ready);
                    out[i] = Some(Vec::new());
                }
                download
            }
            _ => true,
        };
        for &(i, slot, n) in finals.iter().filter(|_| download) {
            let mut x = vec![0f32; n * flen];
            self.gpu.download(&mut x, slot)?;
            out[i] = Some(x);
        }
        // The uploads went through pinned memory: no host sync unless a block came back.
        self.gpu.end_staged()?;
        Ok(out)
    }

    /// Returns `block`'s slot to the pool.
    pub(super) fn release_held(&mut self, block: usize) {
        if let Some(s) = self.res.slots.remove(&block) {
            self.res.pool.push(s);
        }
    }
}
