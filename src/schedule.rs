//! Flow-matching timesteps and sigmas with shift (the Self-Forcing scheduler).
//!
//! `sigma(i) = s*u / (1 + (s-1)*u)` with `u = 1 - i/1000`, `i = 0..999`, and
//! `timestep(i) = 1000 * sigma(i)`. A denoising step `k` on the 0..1000 scale uses index
//! `1000 - k`, so `[1000, 750, 500, 250]` with shift 5 gives `[1000, 937.5, 833.33, 625]`.
//! Values are rounded to f32 as the PyTorch scheduler stores them.

use crate::{Error, Result};

/// Timesteps and sigmas of the denoising steps.
#[derive(Clone, Debug, PartialEq)]
pub struct StepSchedule {
    /// Timestep per step (0..1000 scale).
    pub timesteps: Vec<f64>,
    /// Noise level per step.
    pub sigmas: Vec<f32>,
}

impl StepSchedule {
    /// Warps the denoising steps (integers in 1..=1000) with `shift`.
    pub fn new(steps: &[f64], shift: f64) -> Result<Self> {
        if !(shift.is_finite() && shift > 0.0) {
            return Err(Error::invalid(format!(
                "shift must be positive, got {shift}"
            )));
        }
        if let Some(k) = steps
            .iter()
            .find(|k| !(k.fract() == 0.0 && (1.0..=1000.0).contains(*k)))
        {
            return Err(Error::invalid(format!(
                "denoising steps must be integers in 1..=1000, got {k}"
            )));
        }
        if let Some(w) = steps.windows(2).find(|w| w[1] >= w[0]) {
            return Err(Error::invalid(format!(
                "denoising steps must be strictly decreasing (each step denoises further), got {} then {}",
                w[0], w[1]
            )));
        }
        let mut timesteps = Vec::with_capacity(steps.len());
        let mut sigmas = Vec::with_capacity(steps.len());
        for &k in steps {
            let i = 1000.0 - k;
            let u = 1.0 - i / 1000.0;
            let sigma = (shift * u / (1.0 + (shift - 1.0) * u)) as f32;
            sigmas.push(sigma);
            timesteps.push((1000.0 * sigma as f64) as f32 as f64);
        }
        Ok(StepSchedule { timesteps, sigmas })
    }

    /// Number of steps S.
    pub fn len(&self) -> usize {
        self.sigmas.len()
    }

    /// True when there are no steps.
    pub fn is_empty(&self) -> bool {
        self.sigmas.is_empty()
    }
}

/// Parses `"1000,750,500,250"`.
pub fn parse_steps(s: &str) -> Result<Vec<f64>> {
    let v: Result<Vec<f64>> = s
        .split(',')
        .map(|p| {
            p.trim().parse::<f64>().map_err(|_| {
                Error::invalid(format!("malformed --steps `{s}`: `{p}` is not a number"))
            })
        })
        .collect();
    let v = v?;
    StepSchedule::new(&v, 5.0)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_steps_warp_as_documented() {
        let s = StepSchedule::new(&[1000.0, 750.0, 500.0, 250.0], 5.0).unwrap();
        let want = [1000.0, 937.5, 833.333_312_988_281_2, 625.0];
        for (a, b) in s.timesteps.iter().zip(want) {
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
        assert!((s.sigmas[1] - 0.9375).abs() < 1e-7);
    }

    #[test]
    fn malformed_steps_are_rejected() {
        assert!(parse_steps("1000,abc").is_err());
        assert!(parse_steps("1000,0").is_err());
        assert!(parse_steps("1000.5").is_err());
        assert_eq!(parse_steps("1000, 500").unwrap(), vec![1000.0, 500.0]);
    }
}
