//! Which keys a window member's self-attention sees, shared by every backend (the rules are
//! in docs/design.md).
//!
//! A member whose frames are `[f0, e)` sees: committed cache frames `f < f0` admitted by the
//! local/sink rule; all of its own frames; the frames of earlier members (current-tick K/V)
//! admitted by the same rule; and, in bidirectional mode, every frame of later denoising
//! members when it is itself denoising. The context member is always causal.

use crate::config::AttentionMode;
use crate::kv_cache::KvCache;
use crate::model::{Member, CHANNELS};
use crate::{Error, Result};
use std::ops::Range;

/// A member's place in the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberGeom {
    /// Absolute first frame.
    pub first_frame: usize,
    /// Frames.
    pub frames: usize,
    /// Context member (clean, committed after the tick).
    pub context: bool,
}

/// The geometry of a window of `h`×`w` latents: every member is a whole number of frames, and
/// members are ordered by first frame without overlapping.
pub fn geometry(members: &[Member], h: usize, w: usize) -> Result<Vec<MemberGeom>> {
    let mut geom = Vec::with_capacity(members.len());
    geometry_into(members, h, w, &mut geom)?;
    Ok(geom)
}

/// [`geometry`] into a reused list (cleared first), so a tick need not allocate.
pub fn geometry_into(
    members: &[Member],
    h: usize,
    w: usize,
    geom: &mut Vec<MemberGeom>,
) -> Result<()> {
    geom.clear();
    let flen = CHANNELS * h * w;
    for (i, m) in members.iter().enumerate() {
        if flen == 0 || m.latents.is_empty() || m.latents.len() % flen != 0 {
            return Err(Error::invalid(format!(
                "member {i}: {} latent values is not a whole number of [16, {h}, {w}] frames",
                m.latents.len()
            )));
        }
        if let Some(p) = geom.last() {
            if m.first_frame < p.first_frame + p.frames {
                return Err(Error::Internal(
                    "window members overlap or are out of order".into(),
                ));
            }
        }
        geom.push(MemberGeom {
            first_frame: m.first_frame,
            frames: m.latents.len() / flen,
            context: m.context,
        });
    }
    Ok(())
}

/// The keys member `i` sees.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Visible {
    /// Committed cache frames, increasing.
    pub cache_frames: Vec<usize>,
    /// `(member j, frame offsets within j)`: runs of window frames, in member order.
    pub members: Vec<(usize, Range<usize>)>,
}

/// The keys member `i` of `window` sees, given the committed `cache` (geometry only is used).
pub fn visible(window: &[MemberGeom], i: usize, cache: &KvCache, mode: AttentionMode) -> Visible {
    let mut v = Visible::default();
    visible_into(window, i, cache, mode, &mut v);
    v
}

/// [`visible`] into reused lists (cleared first), so a tick need not allocate.
pub fn visible_into(
    window: &[MemberGeom],
    i: usize,
    cache: &KvCache,
    mode: AttentionMode,
    out: &mut Visible,
) {
    let m = window[i];
    let e_end = m.first_frame + m.frames;
    let members = &mut out.members;
    members.clear();
    for (j, o) in window.iter().enumerate() {
        if j == i {
            members.push((j, 0..o.frames));
        } else if o.first_frame < m.first_frame {
            // Runs of the earlier member's frames the rule admits (sink frames, recent frames).
            let mut fi = 0;
            while fi < o.frames {
                if !cache.in_window(o.first_frame + fi, e_end) {
                    fi += 1;
                    continue;
                }
                let start = fi;
                while fi < o.frames && cache.in_window(o.first_frame + fi, e_end) {
                    fi += 1;
                }
                members.push((j, start..fi));
            }
        } else if mode == AttentionMode::Bidirectional && !o.context && !m.context {
            members.push((j, 0..o.frames));
        }
    }
    cache.visible_into(m.first_frame, e_end, &mut out.cache_frames);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(first_frame: usize, context: bool) -> MemberGeom {
        MemberGeom {
            first_frame,
            frames: 3,
            context,
        }
    }

    #[test]
    fn causal_bidirectional_and_context_rules() {
        let mut c = KvCache::new(1, 1, None, 0).unwrap();
        c.commit(3);
        let w = [g(3, true), g(6, false), g(9, false)];
        let v = visible(&w, 1, &c, AttentionMode::Bidirectional);
        assert_eq!(v.cache_frames, vec![0, 1, 2]);
        assert_eq!(v.members, vec![(0, 0..3), (1, 0..3), (2, 0..3)]);
        let v = visible(&w, 1, &c, AttentionMode::Causal);
        assert_eq!(v.members, vec![(0, 0..3), (1, 0..3)]);
        // The context member never sees later members.
        let v = visible(&w, 0, &c, AttentionMode::Bidirectional);
        assert_eq!(v.members, vec![(0, 0..3)]);
    }

    #[test]
    fn local_window_with_sink_splits_earlier_members() {
        // local 5, sink 1: a block ending at 12 sees frames >= 8 and frame 0.
        let c = KvCache::new(1, 1, Some(5), 1).unwrap();
        let w = [
            MemberGeom {
                first_frame: 0,
                frames: 9,
                context: false,
            },
            g(9, false),
        ];
        let v = visible(&w, 1, &c, AttentionMode::Causal);
        assert_eq!(v.members, vec![(0, 0..1), (0, 8..9), (1, 0..3)]);
    }
}
