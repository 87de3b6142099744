//! The Block Cascading tick planner (see docs/cascade.md).
//!
//! Block `b` starts at tick `b * lag`; at tick `tau` it is at step `s = tau - b*lag`. For
//! `s < S` it is a denoising member at timestep `t_s`; at `s = S` it is the context member
//! (clean latents at t = 0) whose K/V are committed to the cache after the tick. The last
//! block needs no context pass. `lag = S` is the sequential schedule.

use crate::{Error, Result};

/// What a member does in its tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Denoising step `s` (0-based).
    Denoise(usize),
    /// Context pass: clean latents at t = 0, K/V committed afterwards.
    Context,
}

/// One member of a planned tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedMember {
    /// Block index.
    pub block: usize,
    /// Its role.
    pub role: Role,
}

/// A cascade plan for a number of blocks.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Blocks to generate.
    pub blocks: usize,
    /// Denoising steps per block (S).
    pub steps: usize,
    /// Lag k in 1..=S.
    pub lag: usize,
}

impl Plan {
    /// Checks `1 <= lag <= steps`.
    pub fn new(blocks: usize, steps: usize, lag: usize) -> Result<Self> {
        if steps == 0 {
            return Err(Error::invalid("a plan needs at least one denoising step"));
        }
        if lag == 0 || lag > steps {
            return Err(Error::invalid(format!(
                "lag must be in 1..={steps} (the number of steps), got {lag}"
            )));
        }
        // ticks() and the tick arithmetic must not overflow.
        blocks
            .checked_mul(lag)
            .and_then(|t| t.checked_add(2 * steps))
            .ok_or_else(|| Error::invalid(format!("{blocks} blocks is too many to plan")))?;
        Ok(Plan { blocks, steps, lag })
    }

    /// Ticks in the plan: `(blocks - 1) * lag + S` (0 for no blocks).
    pub fn ticks(&self) -> usize {
        if self.blocks == 0 {
            0
        } else {
            (self.blocks - 1) * self.lag + self.steps
        }
    }

    /// Parallelism `ceil(S / lag)`: denoising members in a steady-state tick.
    pub fn parallelism(&self) -> usize {
        self.steps.div_ceil(self.lag)
    }

    /// Members of tick `tau`, ordered by block (so by first frame).
    pub fn members(&self, tau: usize) -> Vec<PlannedMember> {
        let first = tau.saturating_sub(self.steps) / self.lag;
        let last = (tau / self.lag).min(self.blocks.saturating_sub(1));
        let mut v = Vec::new();
        for block in first..=last {
            if block >= self.blocks || block * self.lag > tau {
                continue;
            }
            let s = tau - block * self.lag;
            if s < self.steps {
                v.push(PlannedMember {
                    block,
                    role: Role::Denoise(s),
                });
            } else if s == self.steps && block + 1 < self.blocks {
                v.push(PlannedMember {
                    block,
                    role: Role::Context,
                });
            }
        }
        v
    }

    /// A human-readable table of the ticks.
    pub fn table(&self, timesteps: &[f64]) -> String {
        let mut s = format!(
            "plan: {} blocks, {} steps, lag {} -> {} ticks, parallelism {}\n",
            self.blocks,
            self.steps,
            self.lag,
            self.ticks(),
            self.parallelism()
        );
        s.push_str("tick  members (block:step@timestep, C = context pass)      commits\n");
        for tau in 0..self.ticks() {
            let ms = self.members(tau);
            let desc: Vec<String> = ms
                .iter()
                .map(|m| match m.role {
                    Role::Denoise(st) => format!(
                        "b{}:s{}@{:.1}",
                        m.block,
                        st,
                        timesteps.get(st).copied().unwrap_or(f64::NAN)
                    ),
                    Role::Context => format!("b{}:C@0", m.block),
                })
                .collect();
            let commits: Vec<String> = ms
                .iter()
                .filter(|m| m.role == Role::Context)
                .map(|m| format!("b{}", m.block))
                .collect();
            s.push_str(&format!(
                "{tau:>4}  {:<52} {}\n",
                desc.join(" "),
                if commits.is_empty() {
                    "-".into()
                } else {
                    commits.join(" ")
                }
            ));
        }
        s
    }
}

/// Assigns members (given their token counts) to `devices`, balancing tokens: each member goes,
/// in order, to the least-loaded device (lowest index on ties). Returns per device the member
/// indices in increasing order.
pub fn place(tokens: &[usize], devices: usize) -> Vec<Vec<usize>> {
    let mut load = vec![0usize; devices.max(1)];
    let mut out = vec![Vec::new(); devices.max(1)];
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tokens[i]));
    for i in order {
        let d = (0..load.len()).min_by_key(|&d| (load[d], d)).unwrap_or(0);
        load[d] += tokens[i];
        out[d].push(i);
    }
    for v in &mut out {
        v.sort_unstable();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_plan_merges_context_into_next_first_step() {
        let p = Plan::new(3, 4, 4).unwrap();
        assert_eq!(p.ticks(), 12);
        assert_eq!(
            p.members(4),
            vec![
                PlannedMember {
                    block: 0,
                    role: Role::Context
                },
                PlannedMember {
                    block: 1,
                    role: Role::Denoise(0)
                }
            ]
        );
        // The last block has no context pass.
        assert_eq!(
            p.members(11),
            vec![PlannedMember {
                block: 2,
                role: Role::Denoise(3)
            }]
        );
    }

    #[test]
    fn lag_one_runs_every_step_of_a_window_at_once() {
        let p = Plan::new(3, 4, 1).unwrap();
        assert_eq!(p.ticks(), 6);
        assert_eq!(p.parallelism(), 4);
        let m = p.members(4);
        assert_eq!(
            m[0],
            PlannedMember {
                block: 0,
                role: Role::Context
            }
        );
        assert_eq!(
            m[1],
            PlannedMember {
                block: 1,
                role: Role::Denoise(3)
            }
        );
        assert_eq!(
            m[2],
            PlannedMember {
                block: 2,
                role: Role::Denoise(2)
            }
        );
        // Every block runs every step exactly once.
        for b in 0..3 {
            for st in 0..4 {
                let n = (0..p.ticks())
                    .filter(|&t| {
                        p.members(t).contains(&PlannedMember {
                            block: b,
                            role: Role::Denoise(st),
                        })
                    })
                    .count();
                assert_eq!(n, 1);
            }
        }
    }

    #[test]
    fn bad_lags_are_rejected() {
        assert!(Plan::new(3, 4, 0).is_err());
        assert!(Plan::new(3, 4, 5).is_err());
    }

    #[test]
    fn placement_balances_tokens() {
        assert_eq!(
            place(&[10, 10, 10, 10, 10], 2),
            vec![vec![0, 2, 4], vec![1, 3]]
        );
        assert_eq!(place(&[10, 30, 10], 2), vec![vec![1], vec![0, 2]]);
        assert_eq!(place(&[5], 3), vec![vec![0], vec![], vec![]]);
    }
}
