//! The CPU backend: the exact f32 reference. [`CpuBackend`] runs [`Model::forward`] on one
//! device, or [`multi_device::forward_tick`] over several worker threads each holding a
//! replica of the cache.
//!
//! Its ops ([`ops`], [`gemm`], [`attention`]) are the semantics every other backend (the CUDA
//! kernels, their CPU emulation) is checked against. Hot paths use rayon over rows and
//! `matrixmultiply` GEMMs.

pub mod attention;
pub mod forward;
pub mod gemm;
pub mod gemm_bf16;
pub mod multi_device;
pub mod ops;
pub mod simd;

use super::Backend;
use crate::config::GenerateOptions;
use crate::kv_cache::KvCache;
use crate::model::{Member, Model};
use crate::Result;
use multi_device::{forward_tick, DeviceState};

/// CPU devices with their cache replicas.
pub struct CpuBackend<'m> {
    model: &'m Model,
    opts: GenerateOptions,
    devices: Vec<DeviceState>,
}

impl<'m> CpuBackend<'m> {
    /// A backend for generations with `opts` (latent size, attention, devices).
    pub fn new(model: &'m Model, opts: &GenerateOptions) -> Result<Self> {
        let cfg = model.config();
        let tpf = (opts.height / 2) * (opts.width / 2);
        let cache = KvCache::new(cfg.num_layers, tpf * cfg.dim, opts.local_attn, opts.sink)?;
        // Devices beyond the largest window would idle; each holds a cache replica.
        let devices = (0..opts.useful_cpu_devices())
            .map(|_| DeviceState::new(cache.clone()))
            .collect();
        Ok(CpuBackend {
            model,
            opts: opts.clone(),
            devices,
        })
    }
}

impl Drop for CpuBackend<'_> {
    /// The forward reuses its activation buffers from tick to tick (per thread); they go
    /// with the backend.
    fn drop(&mut self) {
        forward::release_thread_scratch();
    }
}

impl Backend for CpuBackend<'_> {
    fn forward(
        &mut self,
        members: &[Member],
        blocks: &[usize],
        tick: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let o = &self.opts;
        if self.devices.len() == 1 {
            return self.model.forward(
                members,
                &mut self.devices[0].cache,
                o.attention,
                o.height,
                o.width,
            );
        }
        let fail = o.fail_device_at.filter(|&(_, t)| t == tick).map(|(d, _)| d);
        forward_tick(
            self.model,
            members,
            blocks,
            &mut self.devices,
            o.kv_exchange,
            o.attention,
            o.height,
            o.width,
            fail,
        )
    }

    fn commit(&mut self, end: usize) {
        self.devices.iter_mut().for_each(|d| d.cache.commit(end));
    }

    fn resident(&self, f: usize) -> bool {
        self.devices[0].cache.resident(f)
    }

    fn recache(&mut self, members: &[Member]) -> Result<()> {
        let o = &self.opts;
        let old = &self.devices[0].cache;
        let mut fresh = old.empty_like();
        self.model
            .forward(members, &mut fresh, o.attention, o.height, o.width)?;
        fresh.set_committed(old.committed());
        for d in &mut self.devices {
            d.cache = fresh.clone();
        }
        Ok(())
    }

    fn cache_bytes(&self) -> usize {
        self.devices[0].cache.bytes()
    }
}
