//! The model: a decoder-only transformer whose feed-forward layers are Mixture-of-Experts, as in
//! DeepSeek-V3 — `experts` routed experts of which each token uses `top_k`, plus an optional
//! shared expert every token uses; routing by sigmoid affinity, with the auxiliary-loss-free
//! balance of DeepSeek-V3: a per-expert bias added to the affinities only to choose experts
//! (not to weigh them), nudged after every step against the observed load.
//!
//! Parameters are plain [`Var`]s in a fixed order (the order gradients are reduced and
//! checkpoints are written in). The routed experts are computed densely (every expert on every
//! token, masked by the routing): at these sizes that is simpler and as fast as gathering.

use candle_core::{D, DType, Device, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// The model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Tokens 0..vocab.
    pub vocab: usize,
    /// Tokens per training window.
    pub context: usize,
    /// Width of the residual stream.
    pub dim: usize,
    /// Attention heads (dividing `dim`).
    pub heads: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Routed experts per MoE layer.
    pub experts: usize,
    /// Experts each token uses.
    pub top_k: usize,
    /// Hidden width of each expert.
    pub expert_hidden: usize,
    /// Whether every MoE layer also has a shared expert.
    pub shared_expert: bool,
}

impl ModelConfig {
    /// Checks the shape; the message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.dim == 0 || self.heads == 0 || !self.dim.is_multiple_of(self.heads) {
            return Err(format!(
                "dim {} must be a multiple of heads {}",
                self.dim, self.heads
            ));
        }
        if self.experts == 0 || self.top_k == 0 || self.top_k > self.experts {
            return Err(format!(
                "top_k {} must be 1 to experts {}",
                self.top_k, self.experts
            ));
        }
        if self.layers == 0 || self.context < 2 || self.expert_hidden == 0 || self.vocab < 2 {
            return Err("layers, expert_hidden, context (≥ 2) and vocab (≥ 2) must be set".into());
        }
        Ok(())
    }
}

/// One named parameter.
#[derive(Debug)]
pub struct Param {
    /// Its name in checkpoints.
    pub name: String,
    /// The variable.
    pub var: Var,
}

/// The model's parameters, in a fixed order, and the routing biases (not trained by gradient).
#[derive(Debug)]
pub struct Model {
    /// Its shape.
    pub config: ModelConfig,
    /// Every trained parameter.
    pub params: Vec<Param>,
    /// Per layer, one routing bias per expert.
    pub biases: Vec<Vec<f32>>,
}

/// What a forward pass yields besides the loss.
#[derive(Debug)]
pub struct Routing {
    /// Per layer, tokens routed to each expert.
    pub loads: Vec<Vec<f32>>,
}

fn param(params: &mut Vec<Param>, name: String, tensor: &Tensor) -> Result<()> {
    params.push(Param {
        name,
        var: Var::from_tensor(tensor)?,
    });
    Ok(())
}

impl Model {
    /// A model with small random weights drawn from `seed` (ranks still take rank 0's by
    /// broadcast, as DDP does).
    pub fn new(config: ModelConfig, seed: u64, device: &Device) -> Result<Model> {
        let c = config;
        let mut params = Vec::new();
        let scale = 0.02f64;
        let rng = std::cell::RefCell::new(
            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed),
        );
        let randn = |shape: &[usize], std: f64| {
            let count: usize = shape.iter().product();
            let values: Vec<f32> = (0..count)
                .map(|_| normal(&mut *rng.borrow_mut()) * std as f32)
                .collect();
            Tensor::from_vec(values, shape, device)
        };
        param(
            &mut params,
            "embed".into(),
            &randn(&[c.vocab, c.dim], scale)?,
        )?;
        param(
            &mut params,
            "position".into(),
            &randn(&[c.context, c.dim], scale)?,
        )?;
        let residual = scale / (2.0 * c.layers as f64).sqrt();
        for l in 0..c.layers {
            let ones = Tensor::ones(c.dim, DType::F32, device)?;
            param(&mut params, format!("l{l}.attn_norm"), &ones)?;
            param(
                &mut params,
                format!("l{l}.qkv"),
                &randn(&[c.dim, 3 * c.dim], scale)?,
            )?;
            param(
                &mut params,
                format!("l{l}.out"),
                &randn(&[c.dim, c.dim], residual)?,
            )?;
            param(&mut params, format!("l{l}.moe_norm"), &ones)?;
            param(
                &mut params,
                format!("l{l}.router"),
                &randn(&[c.dim, c.experts], scale)?,
            )?;
            param(
                &mut params,
                format!("l{l}.experts_in"),
                &randn(&[c.experts, c.dim, c.expert_hidden], scale)?,
            )?;
            param(
                &mut params,
                format!("l{l}.experts_out"),
                &randn(&[c.experts, c.expert_hidden, c.dim], residual)?,
            )?;
            if c.shared_expert {
                param(
                    &mut params,
                    format!("l{l}.shared_in"),
                    &randn(&[c.dim, c.expert_hidden], scale)?,
                )?;
                param(
                    &mut params,
                    format!("l{l}.shared_out"),
                    &randn(&[c.expert_hidden, c.dim], residual)?,
                )?;
            }
        }
        param(
            &mut params,
            "final_norm".into(),
            &Tensor::ones(c.dim, DType::F32, device)?,
        )?;
        Ok(Model {
            config,
            params,
            biases: vec![vec![0.0; c.experts]; c.layers],
        })
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.params
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.var.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg(format!("no parameter {name}")))
    }

    /// Mean cross-entropy of predicting each next token of `tokens` (batch × (context + 1)),
    /// and the routing of the pass.
    pub fn loss(&self, tokens: &Tensor) -> Result<(Tensor, Routing)> {
        let c = self.config;
        let (batch, width) = tokens.dims2()?;
        let t = width - 1;
        let inputs = tokens.narrow(1, 0, t)?;
        let targets = tokens.narrow(1, 1, t)?;
        let device = tokens.device();
        let embed = self.get("embed")?;
        let mut x = embed
            .index_select(&inputs.flatten_all()?, 0)?
            .reshape((batch, t, c.dim))?
            .broadcast_add(&self.get("position")?.narrow(0, 0, t)?)?;
        let mask = causal_mask(t, device)?;
        let mut loads = Vec::with_capacity(c.layers);
        for l in 0..c.layers {
            let h = rms_norm(&x, self.get(&format!("l{l}.attn_norm"))?)?;
            x = (x + self.attention(l, &h, &mask)?)?;
            let h = rms_norm(&x, self.get(&format!("l{l}.moe_norm"))?)?;
            let (out, load) = self.moe(l, &h.reshape((batch * t, c.dim))?)?;
            x = (x + out.reshape((batch, t, c.dim))?)?;
            loads.push(load);
        }
        let x = rms_norm(&x, self.get("final_norm")?)?;
        let logits = x.reshape((batch * t, c.dim))?.matmul(&embed.t()?)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &targets.flatten_all()?)?;
        Ok((loss, Routing { loads }))
    }

    fn attention(&self, l: usize, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let c = self.config;
        let (b, t, _) = x.dims3()?;
        let head = c.dim / c.heads;
        let qkv = x
            .reshape((b * t, c.dim))?
            .matmul(self.get(&format!("l{l}.qkv"))?)?
            .reshape((b, t, 3, c.heads, head))?;
        let part = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let scores = (q.matmul(&k.t()?)? / (head as f64).sqrt())?.broadcast_add(mask)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * t, c.dim))?
            .matmul(self.get(&format!("l{l}.out"))?)?;
        out.reshape((b, t, c.dim))
    }

    /// The MoE layer on `x` (tokens × dim); its output and each expert's load.
    fn moe(&self, l: usize, x: &Tensor) -> Result<(Tensor, Vec<f32>)> {
        let c = self.config;
        let (n, _) = x.dims2()?;
        let device = x.device();
        let affinity = candle_nn::ops::sigmoid(&x.matmul(self.get(&format!("l{l}.router"))?)?)?;
        // Choose by affinity + bias; weigh by affinity alone (DeepSeek-V3).
        let bias = Tensor::from_slice(&self.biases[l], c.experts, device)?;
        let choice = affinity.detach().broadcast_add(&bias)?;
        let (sorted, _) = choice.sort_last_dim(false)?;
        let threshold = sorted.narrow(1, c.top_k - 1, 1)?;
        let chosen = choice.broadcast_ge(&threshold)?.to_dtype(DType::F32)?;
        let gates = (&affinity * &chosen)?;
        let gates = gates.broadcast_div(&(gates.sum_keepdim(1)? + 1e-9)?)?;
        let load = chosen.sum(0)?.to_vec1::<f32>()?;
        // Every expert on every token: (experts, n, hidden) -> (experts, n, dim).
        let inputs = x
            .unsqueeze(0)?
            .broadcast_as((c.experts, n, c.dim))?
            .contiguous()?;
        let hidden = inputs
            .matmul(self.get(&format!("l{l}.experts_in"))?)?
            .silu()?;
        let outputs = hidden.matmul(self.get(&format!("l{l}.experts_out"))?)?;
        let weights = gates.t()?.unsqueeze(2)?;
        let mut out = outputs.broadcast_mul(&weights)?.sum(0)?;
        if c.shared_expert {
            let shared = x
                .matmul(self.get(&format!("l{l}.shared_in"))?)?
                .silu()?
                .matmul(self.get(&format!("l{l}.shared_out"))?)?;
            out = (out + shared)?;
        }
        Ok((out, load))
    }

    /// Nudges every layer's biases against its experts' load (`loads`: tokens per expert over
    /// all ranks): an expert above the mean gets less likely to be chosen, one below more.
    pub fn balance(&mut self, loads: &[Vec<f32>], rate: f32) {
        for (biases, load) in self.biases.iter_mut().zip(loads) {
            let mean = load.iter().sum::<f32>() / load.len().max(1) as f32;
            for (bias, l) in biases.iter_mut().zip(load) {
                if *l > mean {
                    *bias -= rate;
                } else if *l < mean {
                    *bias += rate;
                }
            }
        }
    }
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut impl rand::Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

fn rms_norm(x: &Tensor, gain: &Tensor) -> Result<Tensor> {
    let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?;
    x.broadcast_div(&rms)?.broadcast_mul(gain)
}

fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (t, t), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig {
            vocab: 16,
            context: 8,
            dim: 16,
            heads: 2,
            layers: 2,
            experts: 4,
            top_k: 2,
            expert_hidden: 8,
            shared_expert: true,
        }
    }

    #[test]
    fn a_forward_pass_routes_top_k_of_the_experts_and_the_loss_starts_near_uniform() {
        let model = Model::new(tiny(), 1, &Device::Cpu).unwrap();
        let tokens = Tensor::from_vec(
            (0..2 * 9).map(|i| (i % 16) as u32).collect::<Vec<u32>>(),
            (2, 9),
            &Device::Cpu,
        )
        .unwrap();
        let (loss, routing) = model.loss(&tokens).unwrap();
        let loss = loss.to_scalar::<f32>().unwrap();
        assert!((loss - (16f32).ln()).abs() < 0.5, "loss {loss}");
        for load in &routing.loads {
            // 16 tokens, two experts each.
            assert_eq!(load.iter().sum::<f32>(), 32.0, "{load:?}");
        }
        let grads = model.loss(&tokens).unwrap().0.backward().unwrap();
        for p in &model.params {
            assert!(
                grads.get(p.var.as_tensor()).is_some(),
                "no gradient for {}",
                p.name
            );
        }
    }

    #[test]
    fn balancing_moves_biases_against_the_load() {
        let mut model = Model::new(tiny(), 1, &Device::Cpu).unwrap();
        model.balance(&[vec![10.0, 2.0, 2.0, 2.0], vec![4.0; 4]], 0.1);
        assert!(model.biases[0][0] < 0.0 && model.biases[0][1] > 0.0);
        assert!(model.biases[1].iter().all(|b| *b == 0.0));
        assert!(tiny().validate().is_ok());
        let bad = ModelConfig { top_k: 5, ..tiny() };
        assert!(bad.validate().unwrap_err().contains("top_k"));
    }
}
