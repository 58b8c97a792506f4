//! Prometheus series of a training run (rank 0 serves them): loss, step, tokens, throughput and
//! the routing balance.

use prometheus::{Gauge, IntCounter, IntGauge, Registry};

/// The metrics of a run.
#[derive(Clone, Debug)]
pub struct TrainMetrics {
    loss: Gauge,
    step: IntGauge,
    tokens: IntCounter,
    /// Tokens per second over all ranks, over the last progress interval.
    pub tokens_per_second: Gauge,
    load_min: Gauge,
    load_max: Gauge,
}

impl TrainMetrics {
    /// Registers the series in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        ff_metrics::register_build_info(registry, "moe_train")?;
        let metrics = TrainMetrics {
            loss: Gauge::new("moe_train_loss", "Training loss of the last step")?,
            step: IntGauge::new("moe_train_step", "Steps done")?,
            tokens: IntCounter::new("moe_train_tokens_total", "Tokens trained on, all ranks")?,
            tokens_per_second: Gauge::new(
                "moe_train_tokens_per_second",
                "Training throughput over all ranks",
            )?,
            load_min: Gauge::new(
                "moe_train_expert_load_min_ratio",
                "Smallest share of routed tokens any expert got in its layer, last step",
            )?,
            load_max: Gauge::new(
                "moe_train_expert_load_max_ratio",
                "Largest share of routed tokens any expert got in its layer, last step",
            )?,
        };
        registry.register(Box::new(metrics.loss.clone()))?;
        registry.register(Box::new(metrics.step.clone()))?;
        registry.register(Box::new(metrics.tokens.clone()))?;
        registry.register(Box::new(metrics.tokens_per_second.clone()))?;
        registry.register(Box::new(metrics.load_min.clone()))?;
        registry.register(Box::new(metrics.load_max.clone()))?;
        Ok(metrics)
    }

    /// Records one step.
    pub fn observe(&self, step: u64, loss: f32, load_min: f32, load_max: f32, tokens: u64) {
        self.loss.set(f64::from(loss));
        self.step.set(step as i64);
        self.tokens.inc_by(tokens);
        self.load_min.set(f64::from(load_min));
        self.load_max.set(f64::from(load_max));
    }
}
