//! The trainable parameters of a model: candle `Var`s in the fixed order of
//! [`parameter_shapes`], from which the model is built and to which gradients are matched.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::model::{Gpt, GptConfig, parameter_shapes};

pub struct ParamSet {
    config: GptConfig,
    vars: Vec<(String, Var)>,
}

impl ParamSet {
    /// Copies `weights` into fresh variables (the originals are left untouched).
    pub fn from_weights(config: &GptConfig, weights: &HashMap<String, Tensor>) -> Result<Self> {
        // Validates names and shapes before anything is allocated.
        Gpt::from_weights(config, weights)?;
        let vars = parameter_shapes(config)
            .into_iter()
            .map(|(name, _)| {
                let t = weights[&name].copy()?;
                Ok((name, Var::from_tensor(&t)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            vars,
        })
    }

    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The model over these variables: optimizer updates are visible to it at once.
    pub fn model(&self) -> Result<Gpt> {
        Gpt::from_weights(&self.config, &self.weights())
    }

    /// The variables' tensors by name (sharing storage).
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
