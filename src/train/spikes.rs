//! Loss spikes: a running window over the loss and the pre-clip gradient norm of the stage's
//! applied steps (as llm.c's outlier detector keeps one), turned into the bounds a step must stay
//! under to be applied, and the recent spikes that decide when a run should stop instead.
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Values judged before a step is: fewer known, nothing is a spike yet.
const MIN_KNOWN: usize = 16;
/// The deviation used is at least this share of the mean: a nearly flat series flags no noise.
const MIN_RELATIVE_DEVIATION: f64 = 0.05;

/// The stage's recent applied steps and spikes (kept in the trainer state, so a resume judges
/// alike).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SpikeWindow {
    losses: VecDeque<f64>,
    grad_norms: VecDeque<f64>,
    /// Global steps of the spikes within the last `spike_limit_steps`.
    pub recent_spikes: Vec<u64>,
}

/// Mean and deviation of a window, and the bound `z` deviations above the mean.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bound {
    pub mean: f64,
    pub deviation: f64,
    pub limit: f64,
}

impl Bound {
    /// How many deviations `x` lies above the mean.
    pub fn z(&self, x: f64) -> f64 {
        (x - self.mean) / self.deviation
    }
}

fn bound(values: &VecDeque<f64>, window: usize, z: f64) -> Option<Bound> {
    if window == 0 || values.len() < MIN_KNOWN.min(window) {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    let deviation = var.sqrt().max(MIN_RELATIVE_DEVIATION * mean.abs());
    Some(Bound { mean, deviation, limit: mean + z * deviation })
}

impl SpikeWindow {
    /// The bounds the next step's loss and gradient norm must stay under (`None`: not judged).
    pub fn bounds(&self, window: usize, z: f64) -> (Option<Bound>, Option<Bound>) {
        (bound(&self.losses, window, z), bound(&self.grad_norms, window, z))
    }

    /// An applied step's values join the window (spikes and non-finite steps never do).
    pub fn push(&mut self, loss: f64, grad_norm: f64, window: usize) {
        for (values, v) in [(&mut self.losses, loss), (&mut self.grad_norms, grad_norm)] {
            values.push_back(v);
            while values.len() > window {
                values.pop_front();
            }
        }
    }

    /// Records a spike at `step`; returns how many lie within the last `steps` steps.
    pub fn record_spike(&mut self, step: u64, steps: u64) -> usize {
        self.recent_spikes.push(step);
        self.recent_spikes.retain(|&s| s + steps > step);
        self.recent_spikes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_far_above_the_window_is_out_of_bounds_and_noise_is_not() {
        let mut w = SpikeWindow::default();
        for i in 0..15 {
            w.push(3.0 + 0.01 * (i % 3) as f64, 1.0 + 0.1 * (i % 2) as f64, 128);
        }
        assert_eq!(w.bounds(128, 6.0), (None, None), "15 values: not judged yet");
        w.push(3.0, 1.0, 128);
        let (loss, grad) = w.bounds(128, 6.0);
        let (loss, grad) = (loss.unwrap(), grad.unwrap());
        // Loss: σ ≈ 0.008 is below 5% of the mean, so the deviation is 0.15.
        assert!((loss.deviation - 0.05 * loss.mean).abs() < 1e-12);
        assert!(loss.limit > 3.5 && loss.limit < 4.0, "{loss:?}");
        // Gradient norm: nine 1.0 and seven 1.1, σ ≈ 0.0496 under 5% of the mean 1.044.
        assert!((grad.deviation - 0.05 * grad.mean).abs() < 1e-12);
        assert!(grad.limit < 1.4 && grad.limit > 1.3, "{grad:?}");
        assert!(grad.z(100.0) > 6.0 && grad.z(1.2) < 6.0);
    }

    #[test]
    fn the_window_keeps_its_length_and_spikes_age_out() {
        let mut w = SpikeWindow::default();
        for i in 0..40 {
            w.push(i as f64, 1.0, 20);
        }
        let (loss, _) = w.bounds(20, 3.0);
        assert_eq!(loss.unwrap().mean, (20..40).sum::<i32>() as f64 / 20.0);
        assert_eq!(w.bounds(0, 3.0), (None, None), "window 0: off");
        assert_eq!(w.record_spike(10, 64), 1);
        assert_eq!(w.record_spike(50, 64), 2);
        assert_eq!(w.record_spike(74, 64), 2, "step 10 is 64 steps back: out of the window");
    }
}
