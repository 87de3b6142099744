//! Multi-device cascades on the CPU backend: the members of a tick are placed on N devices
//! (worker threads), each holding a replica of the clean KV cache, and exchange K/V over
//! channels.
//!
//! - **Joint** exchange: in every layer each device sends its members' K/V to every peer before
//!   attention, so every member sees exactly what it sees on one device (results do not depend
//!   on the device count).
//! - **Lagged** exchange: one exchange per tick, after it; during a tick a member sees its
//!   peers' K/V from the previous tick (blocks new in this tick are not seen by peers), and
//!   context members' K/V reach the peers' caches at the end of the tick.
//!
//! A device that fails sends a failure message to every peer, so nobody waits forever.

use super::forward::{MemberKv, OwnKv};
use crate::cascade::place;
use crate::config::{AttentionMode, KvExchange};
use crate::kv_cache::KvCache;
use crate::model::{Member, Model};
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};

enum Msg {
    /// K/V of the sender's members for one layer.
    Layer(usize, Vec<MemberKv>),
    /// End-of-tick K/V (lagged mode): per member, per layer.
    Tick(Vec<(usize, LayerKv)>),
    /// The sender failed.
    Failed(usize, String),
}

/// K and V of one member for every layer.
pub type LayerKv = Vec<(Vec<f32>, Vec<f32>)>;

/// A member's index and its predicted flow.
type MemberFlow = (usize, Vec<f32>);

/// Per-device state kept across ticks.
pub struct DeviceState {
    /// The device's replica of the clean KV cache.
    pub cache: KvCache,
    /// Lagged mode: peers' K/V of the previous tick, by block: per layer (K, V).
    prev: HashMap<usize, LayerKv>,
}

impl DeviceState {
    /// A device with its own cache replica.
    pub fn new(cache: KvCache) -> Self {
        DeviceState {
            cache,
            prev: HashMap::new(),
        }
    }
}

/// Runs one tick over `devices` (one state per device). `blocks[i]` is member i's block index
/// (the key of lagged K/V). `fail` injects a failure on a device (testing hook). Returns the flow
/// of every member, in member order.
#[allow(clippy::too_many_arguments)]
pub fn forward_tick(
    model: &Model,
    members: &[Member],
    blocks: &[usize],
    devices: &mut [DeviceState],
    exchange: KvExchange,
    mode: AttentionMode,
    h: usize,
    w: usize,
    fail: Option<usize>,
) -> Result<Vec<Vec<f32>>> {
    // The prompts' K/V are computed here, once, before the workers start (they only read
    // them).
    for m in members {
        m.prompt.kv(model)?;
    }
    let n = devices.len();
    let tokens: Vec<usize> = members.iter().map(|m| m.latents.len()).collect();
    let placement = place(&tokens, n);
    let mut txs: Vec<Sender<Msg>> = Vec::with_capacity(n);
    let mut rxs: Vec<Option<Receiver<Msg>>> = Vec::with_capacity(n);
    for _ in 0..n {
        let (t, r) = channel();
        txs.push(t);
        rxs.push(Some(r));
    }
    let layers = model.config().num_layers;
    let results: Vec<Result<Vec<MemberFlow>>> = std::thread::scope(|s| {
        let mut handles = Vec::with_capacity(n);
        for (d, state) in devices.iter_mut().enumerate() {
            let rx = rxs[d].take();
            let peers: Vec<(usize, Sender<Msg>)> = (0..n)
                .filter(|&p| p != d)
                .map(|p| (p, txs[p].clone()))
                .collect();
            let mine = placement[d].clone();
            handles.push(s.spawn(move || {
                let Some(rx) = rx else {
                    return Err(Error::Internal("device receiver missing".into()));
                };
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    device_tick(
                        model, members, blocks, &mine, state, &rx, &peers, d, exchange, mode, h, w,
                        layers, fail,
                    )
                }));
                let res =
                    run.unwrap_or_else(|_| Err(Error::Device(format!("device {d} panicked"))));
                if let Err(e) = &res {
                    for (_, tx) in &peers {
                        let _ = tx.send(Msg::Failed(d, e.to_string()));
                    }
                }
                res
            }));
        }
        handles
            .into_iter()
            .enumerate()
            .map(|(d, h)| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Device(format!("device {d} thread died"))))
            })
            .collect()
    });
    drop(txs);
    let mut out: Vec<Option<Vec<f32>>> = vec![None; members.len()];
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(v) => v.into_iter().for_each(|(i, f)| out[i] = Some(f)),
            Err(e) => errors.push(e),
        }
    }
    // Report the root cause: a device's own error rather than a peer's "device X failed".
    let root = errors
        .iter()
        .position(|e| !matches!(e, Error::Device(m) if m.starts_with("peer")));
    if !errors.is_empty() {
        return Err(errors.swap_remove(root.unwrap_or(0)));
    }
    out.into_iter()
        .enumerate()
        .map(|(i, f)| f.ok_or_else(|| Error::Internal(format!("member {i} was not computed"))))
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn device_tick(
    model: &Model,
    members: &[Member],
    blocks: &[usize],
    mine: &[usize],
    state: &mut DeviceState,
    rx: &Receiver<Msg>,
    peers: &[(usize, Sender<Msg>)],
    me: usize,
    exchange: KvExchange,
    mode: AttentionMode,
    h: usize,
    w: usize,
    layers: usize,
    fail: Option<usize>,
) -> Result<Vec<(usize, Vec<f32>)>> {
    let mut pending: Vec<(usize, Vec<MemberKv>)> = Vec::new();
    let recv = |rx: &Receiver<Msg>| -> Result<Msg> {
        match rx.recv() {
            Ok(Msg::Failed(p, e)) => Err(Error::Device(format!("peer device {p} failed: {e}"))),
            Ok(m) => Ok(m),
            Err(_) => Err(Error::Device("peer devices disconnected".into())),
        }
    };
    // Lagged mode records this device's K/V per member and layer for the end-of-tick exchange.
    let mut recorded: HashMap<usize, LayerKv> = HashMap::new();
    let prev = std::mem::take(&mut state.prev);
    let mut xch = |layer: usize, own: &[OwnKv]| -> Result<Vec<MemberKv>> {
        if fail == Some(me) && layer == layers / 2 {
            return Err(Error::Device(format!(
                "device {me}: injected failure in layer {layer}"
            )));
        }
        match exchange {
            KvExchange::Joint => {
                let msg: Vec<MemberKv> = own
                    .iter()
                    .map(|&(i, k, v)| MemberKv {
                        member: i,
                        k: k.to_vec(),
                        v: v.to_vec(),
                    })
                    .collect();
                for (_, tx) in peers {
                    tx.send(Msg::Layer(layer, msg.clone()))
                        .map_err(|_| Error::Device("peer device is gone".into()))?;
                }
                let mut got: Vec<MemberKv> = Vec::new();
                let mut count = 0;
                pending.retain_mut(|(l, kv)| {
                    if *l == layer {
                        got.append(kv);
                        count += 1;
                        false
                    } else {
                        true
                    }
                });
                while count < peers.len() {
                    match recv(rx)? {
                        Msg::Layer(l, kv) if l == layer => {
                            got.extend(kv);
                            count += 1;
                        }
                        Msg::Layer(l, kv) => pending.push((l, kv)),
                        _ => {
                            return Err(Error::Internal(
                                "unexpected message in joint exchange".into(),
                            ))
                        }
                    }
                }
                Ok(got)
            }
            KvExchange::Lagged => {
                for &(i, k, v) in own {
                    recorded
                        .entry(i)
                        .or_default()
                        .push((k.to_vec(), v.to_vec()));
                }
                Ok(members
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !mine.contains(i))
                    .filter_map(|(i, _)| {
                        prev.get(&blocks[i])
                            .and_then(|l| l.get(layer))
                            .map(|(k, v)| MemberKv {
                                member: i,
                                k: k.clone(),
                                v: v.clone(),
                            })
                    })
                    .collect())
            }
        }
    };
    let flows = model.forward_partial(members, mine, &mut state.cache, mode, h, w, &mut xch)?;
    if exchange == KvExchange::Lagged {
        let mine_kv: Vec<(usize, LayerKv)> = recorded.into_iter().collect();
        // Keep our own members' K/V too: a block may move to another device next tick.
        for (i, l) in &mine_kv {
            if !members[*i].context {
                state.prev.insert(blocks[*i], l.clone());
            }
        }
        for (_, tx) in peers {
            let msg = mine_kv.iter().map(|(i, l)| (*i, l.clone())).collect();
            tx.send(Msg::Tick(msg))
                .map_err(|_| Error::Device("peer device is gone".into()))?;
        }
        let flen = |i: usize| members[i].latents.len() / crate::model::CHANNELS / h / w;
        for _ in 0..peers.len() {
            match recv(rx)? {
                Msg::Tick(list) => {
                    for (i, per_layer) in list {
                        if members[i].context {
                            let f = flen(i);
                            for (li, (k, v)) in per_layer.iter().enumerate() {
                                let fl = k.len() / f;
                                for fi in 0..f {
                                    let r = fi * fl..(fi + 1) * fl;
                                    state.cache.write(
                                        li,
                                        members[i].first_frame + fi,
                                        &k[r.clone()],
                                        &v[r],
                                    );
                                }
                            }
                        } else {
                            state.prev.insert(blocks[i], per_layer);
                        }
                    }
                }
                _ => {
                    return Err(Error::Internal(
                        "unexpected message in lagged exchange".into(),
                    ))
                }
            }
        }
    }
    Ok(flows)
}
