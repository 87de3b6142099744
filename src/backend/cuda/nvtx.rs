//! NVTX ranges, so a profiler's timeline (Nsight Systems) shows ticks, their members and the
//! layers. libnvToolsExt is loaded at run time; where it is missing (or `BC_NVTX=0`) ranges are
//! no-ops, never a panic. With graphs, the layers of a replayed tick are one launch: only the
//! tick range appears.

use cudarc::nvtx::{result as nvtx, sys};
use std::sync::OnceLock;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("BC_NVTX").map_or(true, |v| v != "0")
            // SAFETY: only tries to dlopen the candidate library names.
            && unsafe { sys::is_culib_present() }
    })
}

/// A pushed range, popped on drop.
pub struct Range(bool);

/// Pushes a range named `name` (nothing when NVTX is unavailable).
pub fn range(name: impl FnOnce() -> String) -> Range {
    if enabled() {
        nvtx::range_push(name());
        Range(true)
    } else {
        Range(false)
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        if self.0 {
            nvtx::range_pop();
        }
    }
}

/// `"tick 5: b0:ctx b1 b2"`-style label of a window (members by first frame).
pub fn tick_label(tick: usize, members: &[crate::model::Member]) -> String {
    let list: Vec<String> = members
        .iter()
        .map(|m| {
            if m.context {
                format!("f{}:ctx", m.first_frame)
            } else {
                format!("f{}@t{:.0}", m.first_frame, m.timestep)
            }
        })
        .collect();
    format!("tick {tick}: {}", list.join(" "))
}
