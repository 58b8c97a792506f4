//! AdamW over the model's parameters, with its moments as plain tensors so that a checkpoint
//! holds the optimizer exactly (candle-nn's keeps them private).

use candle_core::{Result, Tensor};

use crate::model::Param;

/// AdamW's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The optimizer's state.
#[derive(Debug)]
pub struct AdamW {
    /// Settings.
    pub config: AdamWConfig,
    /// Updates made.
    pub steps: u64,
    /// First moments, one per parameter.
    pub m: Vec<Tensor>,
    /// Second moments, one per parameter.
    pub v: Vec<Tensor>,
}

impl AdamW {
    /// Fresh state for `params`.
    pub fn new(config: AdamWConfig, params: &[Param]) -> Result<AdamW> {
        let zeros = |p: &Param| p.var.as_tensor().zeros_like();
        Ok(AdamW {
            config,
            steps: 0,
            m: params.iter().map(zeros).collect::<Result<_>>()?,
            v: params.iter().map(zeros).collect::<Result<_>>()?,
        })
    }

    /// One update with `grads` (one per parameter, same shapes) at learning rate `lr`.
    pub fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64) -> Result<()> {
        let c = self.config;
        self.steps += 1;
        let t = self.steps as i32;
        let correct1 = 1.0 - c.beta1.powi(t);
        let correct2 = 1.0 - c.beta2.powi(t);
        for (i, (param, grad)) in params.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * c.beta1)? + (grad * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / correct1)? / ((&v / correct2)?.sqrt()? + c.eps)?)?;
            let theta = param.var.as_tensor();
            let next = ((theta * (1.0 - lr * c.weight_decay))? - (update * lr)?)?;
            param.var.set(&next)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}
