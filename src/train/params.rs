//! The trainable parameters of a model: candle `Var`s in the fixed order of
//! [`parameter_shapes`], from which the model is built and to which gradients are matched,
//! followed by any head a stage adds (a reward or value head, `score.weight`).

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::model::{Gpt, GptConfig, parameter_shapes};

pub struct ParamSet {
    config: GptConfig,
    vars: Vec<(String, Var)>,
    /// How many of `vars` belong to the GPT itself (the rest are heads).
    n_gpt: usize,
}

impl ParamSet {
    /// Copies `weights` into fresh variables (the originals are left untouched). Tensors named in
    /// `heads` are trained too but are not part of the GPT.
    pub fn with_heads(config: &GptConfig, weights: &HashMap<String, Tensor>, heads: &[&str]) -> Result<Self> {
        let gpt_only: HashMap<String, Tensor> = weights
            .iter()
            .filter(|(k, _)| !heads.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Validates names and shapes before anything is allocated.
        Gpt::from_weights(config, &gpt_only)?;
        let mut names: Vec<String> = parameter_shapes(config).into_iter().map(|(n, _)| n).collect();
        let n_gpt = names.len();
        names.extend(heads.iter().map(|h| h.to_string()));
        let vars = names
            .into_iter()
            .map(|name| {
                let t = weights
                    .get(&name)
                    .with_context(|| format!("missing tensor {name:?}"))?
                    .copy()?;
                Ok((name, Var::from_tensor(&t)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            vars,
            n_gpt,
        })
    }

    /// The GPT's parameters only.
    pub fn from_weights(config: &GptConfig, weights: &HashMap<String, Tensor>) -> Result<Self> {
        Self::with_heads(config, weights, &[])
    }

    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// A parameter's tensor by name (sharing storage with the variable).
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_tensor())
    }

    /// The names of the heads, in order.
    pub fn head_names(&self) -> Vec<&str> {
        self.vars[self.n_gpt..].iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The model over these variables: optimizer updates are visible to it at once.
    pub fn model(&self) -> Result<Gpt> {
        let gpt: HashMap<String, Tensor> = self.vars[..self.n_gpt]
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        Gpt::from_weights(&self.config, &gpt)
    }

    /// All variables' tensors (GPT and heads) by name (sharing storage).
    pub fn weights(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// The gradient of every parameter, in order. A parameter without a gradient is an error:
    /// it means an op on the training path has no backward and the gradient was silently lost.
    pub fn grads(&self, store: &GradStore) -> Result<Vec<Tensor>> {
        self.vars
            .iter()
            .map(|(name, v)| {
                store
                    .get(v.as_tensor())
                    .cloned()
                    .with_context(|| format!("parameter {name} received no gradient"))
            })
            .collect()
    }

    /// Total number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }
}
