//! The GPT model configuration: the one definition of a model's shape, its presets, and its
//! mapping to and from a Hugging Face GPT-2 `config.json`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The MLP activation. GPT-2 uses the tanh approximation of GELU ("gelu_new" in `transformers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, HF names `gelu_new` / `gelu_pytorch_tanh`.
    GeluTanh,
    /// The exact erf form, HF name `gelu`.
    GeluErf,
}

impl Activation {
    /// Parses a Hugging Face `activation_function` string.
    pub fn from_hf(name: &str) -> Result<Self> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            "gelu" => Ok(Self::GeluErf),
            other => bail!(
                "unsupported activation_function {other:?}: Talaria supports \"gelu_new\", \
                 \"gelu_pytorch_tanh\" (tanh approximation) and \"gelu\" (exact)"
            ),
        }
    }

    /// The Hugging Face name written on export.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::GeluTanh => "gelu_new",
            Self::GeluErf => "gelu",
        }
    }
}

/// Shape and hyper-parameters of a GPT-2-architecture decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct GptConfig {
    pub vocab_size: usize,
    /// Maximum context length (learned position embeddings).
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub layer_norm_epsilon: f64,
    pub activation: Activation,
    pub bos_token_id: Option<u32>,
    /// Generation stops at this token unless asked not to.
    pub eos_token_id: Option<u32>,
}

/// A named model size; `talaria pretrain --model NAME` and `talaria bench --preset NAME` take these.
pub struct Preset {
    pub name: &'static str,
    pub about: &'static str,
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
}

/// Every preset, smallest first.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "test",
        about: "tiny model for unit tests",
        vocab_size: 512,
        n_positions: 64,
        n_embd: 32,
        n_layer: 2,
        n_head: 4,
    },
    Preset {
        name: "tiny",
        about: "smoke-test speedrun model",
        vocab_size: 512,
        n_positions: 128,
        n_embd: 64,
        n_layer: 2,
        n_head: 2,
    },
    Preset {
        name: "cpu",
        about: "laptop-CPU speedrun model",
        vocab_size: 512,
        n_positions: 256,
        n_embd: 128,
        n_layer: 4,
        n_head: 4,
    },
    Preset {
        name: "bench",
        about: "benchmark config: the shape talaria bench and bench/pytorch_reference.py compare",
        vocab_size: 8192,
        n_positions: 256,
        n_embd: 384,
        n_layer: 6,
        n_head: 6,
    },
    Preset {
        name: "gpt1",
        about: "GPT-1 shapes (117M)",
        vocab_size: 40478,
        n_positions: 512,
        n_embd: 768,
        n_layer: 12,
        n_head: 12,
    },
    Preset {
        name: "gpt2",
        about: "GPT-2 small (124M)",
        vocab_size: 50257,
        n_positions: 1024,
        n_embd: 768,
        n_layer: 12,
        n_head: 12,
    },
    Preset {
        name: "gpt2-medium",
        about: "GPT-2 medium (350M)",
        vocab_size: 50257,
        n_positions: 1024,
        n_embd: 1024,
        n_layer: 24,
        n_head: 16,
    },
    Preset {
        name: "gpt2-large",
        about: "GPT-2 large (774M)",
        vocab_size: 50257,
        n_positions: 1024,
        n_embd: 1280,
        n_layer: 36,
        n_head: 20,
    },
    Preset {
        name: "gpt2-xl",
        about: "GPT-2 XL (1.5B)",
        vocab_size: 50257,
        n_positions: 1024,
        n_embd: 1600,
        n_layer: 48,
        n_head: 25,
    },
];

impl GptConfig {
    /// The configuration of a named preset (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self> {
        let Some(p) = PRESETS.iter().find(|p| p.name == name) else {
            let names: Vec<_> = PRESETS.iter().map(|p| p.name).collect();
            bail!("unknown model preset {name:?}; choose one of: {}", names.join(", "));
        };
        let cfg = Self {
            vocab_size: p.vocab_size,
            n_positions: p.n_positions,
            n_embd: p.n_embd,
            n_layer: p.n_layer,
            n_head: p.n_head,
            layer_norm_epsilon: 1e-5,
            activation: Activation::GeluTanh,
            bos_token_id: None,
            eos_token_id: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Checks the shape is buildable; every constructor calls this.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ];
        for (name, v) in positive {
            if v == 0 {
                bail!("model config: {name} must be positive");
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            bail!(
                "model config: n_embd ({}) must be divisible by n_head ({})",
                self.n_embd,
                self.n_head
            );
        }
        if !(self.layer_norm_epsilon > 0.0 && self.layer_norm_epsilon < 1.0) {
            bail!(
                "model config: layer_norm_epsilon must be in (0, 1), got {}",
                self.layer_norm_epsilon
            );
        }
        for (name, id) in [("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id)] {
            if let Some(id) = id
                && id as usize >= self.vocab_size
            {
                bail!(
                    "model config: {name} {id} is outside the vocabulary (size {})",
                    self.vocab_size
                );
            }
        }
        Ok(())
    }

    /// Number of trainable parameters (embeddings tied to the LM head).
    pub fn num_params(&self) -> usize {
        let (c, v, t, l) = (self.n_embd, self.vocab_size, self.n_positions, self.n_layer);
        let block = 2 * 2 * c // two LayerNorms
            + c * 3 * c + 3 * c // qkv
            + c * c + c // attention output
            + c * 4 * c + 4 * c // mlp up
            + 4 * c * c + c; // mlp down
        v * c + t * c + l * block + 2 * c
    }

    /// Reads a Hugging Face GPT-2 `config.json` object. Unknown keys are ignored; keys that would
    /// change the architecture away from GPT-2's are rejected with the key named.
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let obj = v.as_object().context("config.json must be a JSON object")?;
        if let Some(t) = obj.get("model_type").and_then(Value::as_str)
            && t != "gpt2"
        {
            bail!("config.json: model_type is {t:?}; only \"gpt2\" checkpoints are supported");
        }
        let usize_key = |keys: &[&str], default: Option<usize>| -> Result<usize> {
            for k in keys {
                if let Some(x) = obj.get(*k) {
                    return x
                        .as_u64()
                        .map(|n| n as usize)
                        .with_context(|| format!("config.json: {k} must be a non-negative integer, got {x}"));
                }
            }
            default.with_context(|| format!("config.json: missing required key {}", keys[0]))
        };
        let n_embd = usize_key(&["n_embd", "hidden_size"], None)?;
        if let Some(inner) = obj.get("n_inner")
            && !inner.is_null()
            && inner.as_u64() != Some(4 * n_embd as u64)
        {
            bail!(
                "config.json: n_inner {inner} is not supported (Talaria's MLP is 4 x n_embd = {})",
                4 * n_embd
            );
        }
        let flag_must = |key: &str, want: bool| -> Result<()> {
            if let Some(x) = obj.get(key) {
                let b = x
                    .as_bool()
                    .with_context(|| format!("config.json: {key} must be a boolean"))?;
                if b != want {
                    bail!("config.json: {key} = {b} is not supported (GPT-2 uses {want})");
                }
            }
            Ok(())
        };
        flag_must("tie_word_embeddings", true)?;
        flag_must("scale_attn_weights", true)?;
        flag_must("scale_attn_by_inverse_layer_idx", false)?;
        flag_must("add_cross_attention", false)?;
        let activation = match obj.get("activation_function") {
            None => Activation::GeluTanh,
            Some(x) => Activation::from_hf(
                x.as_str()
                    .context("config.json: activation_function must be a string")?,
            )?,
        };
        let eps = match obj.get("layer_norm_epsilon") {
            None => 1e-5,
            Some(x) => x.as_f64().context("config.json: layer_norm_epsilon must be a number")?,
        };
        let token = |key: &str| -> Result<Option<u32>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => {
                    Ok(Some(x.as_u64().and_then(|n| u32::try_from(n).ok()).with_context(
                        || format!("config.json: {key} must be a token id, got {x}"),
                    )?))
                }
            }
        };
        let cfg = Self {
            vocab_size: usize_key(&["vocab_size"], None)?,
            n_positions: usize_key(&["n_positions", "n_ctx", "max_position_embeddings"], None)?,
            n_embd,
            n_layer: usize_key(&["n_layer", "num_hidden_layers"], None)?,
            n_head: usize_key(&["n_head", "num_attention_heads"], None)?,
            layer_norm_epsilon: eps,
            activation,
            bos_token_id: token("bos_token_id")?,
            eos_token_id: token("eos_token_id")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The `config.json` object that `transformers.GPT2LMHeadModel.from_pretrained` reads.
    pub fn to_hf_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("architectures".into(), json!(["GPT2LMHeadModel"]));
        m.insert("model_type".into(), json!("gpt2"));
        m.insert("vocab_size".into(), json!(self.vocab_size));
        m.insert("n_positions".into(), json!(self.n_positions));
        m.insert("n_ctx".into(), json!(self.n_positions));
        m.insert("n_embd".into(), json!(self.n_embd));
        m.insert("n_layer".into(), json!(self.n_layer));
        m.insert("n_head".into(), json!(self.n_head));
        m.insert("n_inner".into(), Value::Null);
        m.insert("activation_function".into(), json!(self.activation.hf_name()));
        m.insert("layer_norm_epsilon".into(), json!(self.layer_norm_epsilon));
        m.insert("resid_pdrop".into(), json!(0.0));
        m.insert("embd_pdrop".into(), json!(0.0));
        m.insert("attn_pdrop".into(), json!(0.0));
        m.insert("initializer_range".into(), json!(0.02));
        m.insert("scale_attn_weights".into(), json!(true));
        m.insert("tie_word_embeddings".into(), json!(true));
        m.insert("use_cache".into(), json!(true));
        m.insert("bos_token_id".into(), json!(self.bos_token_id));
        m.insert("eos_token_id".into(), json!(self.eos_token_id));
        Value::Object(m)
    }

    /// Reads `config.json` from a file, naming the file in errors.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_hf_json(&v).with_context(|| format!("in {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_gpt2_has_124m_params() {
        for p in PRESETS {
            GptConfig::preset(p.name).unwrap();
        }
        let n = GptConfig::preset("gpt2").unwrap().num_params();
        assert!((124_000_000..124_800_000).contains(&n), "{n}");
        let n = GptConfig::preset("bench").unwrap().num_params();
        assert!((13_800_000..14_000_000).contains(&n), "{n}");
    }

    #[test]
    fn rejects_bad_shapes_and_unknown_activation() {
        let mut v = GptConfig::preset("test").unwrap().to_hf_json();
        v["n_head"] = json!(5);
        let e = GptConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains("divisible by n_head"), "{e}");
        let mut v = GptConfig::preset("test").unwrap().to_hf_json();
        v["activation_function"] = json!("swish");
        let e = format!("{:#}", GptConfig::from_hf_json(&v).unwrap_err());
        assert!(e.contains("unsupported activation_function \"swish\""), "{e}");
        assert!(GptConfig::preset("nope").unwrap_err().to_string().contains("gpt2-xl"));
    }

    #[test]
    fn hf_json_round_trip() {
        let mut c = GptConfig::preset("test").unwrap();
        c.eos_token_id = Some(3);
        assert_eq!(GptConfig::from_hf_json(&c.to_hf_json()).unwrap(), c);
    }
}
