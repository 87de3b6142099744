//! The lagged exchange of [`MultiCudaBackend`]: one exchange per tick, after it.

use super::graphs::{GraphKey, Part};
use super::tables::{LagView, Shape};
use super::{nvtx, CudaBackend, MultiCudaBackend};
use crate::model::{Member, CHANNELS};
use crate::{Error, Result};

impl MultiCudaBackend<'_> {
    /// One tick with lagged exchange (see [`MultiCudaBackend`]).
    /// `placement[device]`: its members; `held`: as in [`CudaBackend::prepare`]. The flows
    /// stay on the devices ([`MultiCudaBackend::finish_tick`] downloads or keeps them).
    pub(super) fn forward_lagged(
        &mut self,
        members: &[Member],
        blocks: &[usize],
        placement: &[Vec<usize>],
        held: Option<&[usize]>,
    ) -> Result<Vec<Shape>> {
        if blocks.len() != members.len() {
            return Err(Error::Internal(
                "one block index per member expected".into(),
            ));
        }
        let nd = self.devs.len();
        let c = self.devs[0].model.config();
        let (d, layers) = (c.dim, c.num_layers);
        let (h, w) = (self.opts.height, self.opts.width);
        let (tpf, flen) = ((h / 2) * (w / 2), CHANNELS * h * w);
        let row = (d * 2) as u64;
        let Some(lag) = self.lag.as_mut() else {
            return Err(Error::Internal("lagged state missing".into()));
        };
        // The previous tick's K/V of each member's block (same rows on every device).
        let mut prev_row = Vec::with_capacity(members.len());
        for (i, m) in members.iter().enumerate() {
            let rows = m.latents.len() / flen * tpf;
            prev_row.push(match lag.prev.get(&blocks[i]) {
                Some(&(r0, n)) if n == rows => Some(r0),
                Some(_) => {
                    return Err(Error::Device(format!(
                        "lagged K/V of block {} has the wrong size",
                        blocks[i]
                    )))
                }
                None => None,
            });
        }
        let (cur, prv) = (lag.cur, 1 - lag.cur);
        let (mut shapes, mut keys) = (Vec::with_capacity(nd), Vec::with_capacity(nd));
        for (di, (dev, own)) in self.devs.iter_mut().zip(placement).enumerate() {
            dev.gpu.bind()?;
            let view = LagView {
                prev_row: &prev_row,
                prev_kv: &lag.gens[di][prv],
            };
            let (s, k) = dev.prepare(members, Some(own), Some(&view), held)?;
            shapes.push(s);
            keys.push(k);
        }
        // No exchange inside the tick: each device's tick is one graph (one per generation
        // written, since the snapshot copies target that generation's buffers).
        for (di, (((dev, s), k), own)) in self
            .devs
            .iter_mut()
            .zip(&shapes)
            .zip(&keys)
            .zip(placement)
            .enumerate()
        {
            dev.gpu.bind()?;
            let gen = &lag.gens[di][cur];
            let key = GraphKey {
                shape: k.clone(),
                part: Part::Lagged(cur),
            };
            dev.launch(key, &|b: &mut CudaBackend| {
                b.enqueue_embed(s)?;
                for (li, &(gk, gv)) in gen.iter().enumerate().take(layers) {
                    let _r = nvtx::range(|| format!("layer {li}"));
                    b.enqueue_pre(s, li)?;
                    // Snapshot this device's window members' K/V of this layer.
                    for &i in own.iter().filter(|&&i| !members[i].context) {
                        let off = s.row0[i] as u64 * row;
                        let bytes = s.frames[i] * tpf * row as usize;
                        let (bk, bv) = b.kv_bufs(li);
                        b.gpu.copy(gk + off, bk + off, bytes)?;
                        b.gpu.copy(gv + off, bv + off, bytes)?;
                    }
                    b.enqueue_post(s, li)?;
                }
                b.enqueue_head(s)
            })?;
        }
        // End of tick: window members' K/V to every peer's current generation, context
        // members' K/V to every peer's cache (same rows and cache slots on every device).
        for (src, own) in placement.iter().enumerate() {
            let s = &shapes[src];
            for dst in (0..nd).filter(|&p| p != src) {
                let (sd, dd) = (&self.devs[src], &self.devs[dst]);
                let mut regions = Vec::new();
                for &i in own {
                    if members[i].context {
                        let bytes = tpf * row as usize;
                        for fi in 0..s.frames[i] {
                            let slot = sd.slot_of(members[i].first_frame + fi)?;
                            let off = (slot * tpf) as u64 * row;
                            for (sl, dl) in sd.layers.iter().zip(&dd.layers) {
                                regions.push((dl.cache_k + off, sl.cache_k + off, bytes));
                                regions.push((dl.cache_v + off, sl.cache_v + off, bytes));
                            }
                        }
                    } else {
                        let off = s.row0[i] as u64 * row;
                        let bytes = s.frames[i] * tpf * row as usize;
                        for (sg, dg) in lag.gens[src][cur].iter().zip(&lag.gens[dst][cur]) {
                            regions.push((dg.0 + off, sg.0 + off, bytes));
                            regions.push((dg.1 + off, sg.1 + off, bytes));
                        }
                    }
                }
                if !regions.is_empty() {
                    sd.gpu.copy_to_peer(&dd.gpu, &regions)?;
                }
            }
        }
        // The next tick reads this tick's window members.
        lag.prev = (0..members.len())
            .filter(|&i| !members[i].context)
            .map(|i| (blocks[i], (shapes[0].row0[i], shapes[0].frames[i] * tpf)))
            .collect();
        lag.cur = prv;
        Ok(shapes)
    }
}
