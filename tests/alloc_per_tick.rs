//! The CPU forward's hot path allocates nothing per tick once warmed up, except the flows it
//! returns. A counting global allocator (this test binary only) counts every allocation,
//! reallocation and zeroed allocation made by any thread while one forward runs.
//!
//! The forward runs inside a one-thread rayon pool, which makes the count exact and
//! repeatable: with more threads, each worker makes its kernel scratch (GEMM accumulators,
//! attention tiles) on the first task it happens to run, which in a model this small can be
//! any tick, once per thread; and a thread outside the pool hands every parallel loop to
//! rayon's injector queue, which allocates a block per 63 queued jobs (rayon's, not the
//! forward's).
//!
//! Per tick the forward may allocate `2 + members` blocks: two outer `Vec`s of flows and one
//! flow `Vec` per member it computes (the backend's API hands them out). Everything else (the
//! activations, the packed GEMM panels, attention scratch, RoPE tables, time conditioning,
//! the visible-frame lists, the per-layer K/V segment lists) is reused from tick to tick.

use blockcascade::config::AttentionMode;
use blockcascade::kv_cache::KvCache;
use blockcascade::model::{Member, Model};
use blockcascade::weights::Weights;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations a forward over `members` computed members may make: the returned flows.
fn returned(members: usize) -> usize {
    // forward_partial's (index, flow) list, forward's list of flows, and one flow per member.
    2 + members
}

#[test]
fn forward_allocates_only_its_outputs_after_warm_up() {
    let model = Model::new(Weights::builtin("tiny").expect("built-in tiny model"));
    let c = model.config().clone();
    let (h, w, frames) = (4usize, 6usize, 3usize);
    let prompt = model
        .prompt_context(&vec![0.25f32; 3 * c.text_dim], 3)
        .expect("prompt");
    let lat: Vec<f32> = (0..frames * 16 * h * w)
        .map(|i| ((i * 7919) % 997) as f32 / 997.0 - 0.5)
        .collect();
    // Local attention with a sink: the cache's ring is full after the first ticks, so its
    // storage stops growing (a growing cache allocates by design).
    let mut cache = KvCache::new(c.num_layers, (h / 2) * (w / 2) * c.dim, Some(7), 1).unwrap();
    // Ticks as the executor makes them: a context block (clean, written to the cache) and a
    // block being denoised, moving forward by one block per tick.
    let mut tick = |t: usize| -> (usize, usize) {
        let members = [
            Member {
                first_frame: t * frames,
                latents: &lat,
                timestep: 0.0,
                context: true,
                prompt: &prompt,
            },
            Member {
                first_frame: (t + 1) * frames,
                latents: &lat,
                timestep: 750.0 - 10.0 * t as f64,
                context: false,
                prompt: &prompt,
            },
        ];
        let before = ALLOCS.load(Ordering::SeqCst);
        let out = model
            .forward(&members, &mut cache, AttentionMode::Causal, h, w)
            .expect("forward");
        let n = ALLOCS.load(Ordering::SeqCst) - before;
        cache.commit((t + 1) * frames);
        assert_eq!(out.len(), members.len());
        assert!(out.iter().flatten().all(|v| v.is_finite()));
        drop(out);
        (n, members.len())
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("thread pool");
    pool.install(|| {
        let warm: Vec<usize> = (0..4).map(|t| tick(t).0).collect();
        for t in 4..12 {
            let (n, m) = tick(t);
            assert!(
                n <= returned(m),
                "tick {t}: {n} allocations, at most {} expected (warm-up ticks made {warm:?})",
                returned(m)
            );
        }
    });
}
