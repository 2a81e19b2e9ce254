//! The fused CPU kernels against the composed candle ops they replace: forward values and every
//! gradient agree to a relative 1e-5 in f32 on random shapes, including sizes that are not
//! multiples of the SIMD width; and the whole model gives the same loss and gradients on the
//! fused f32 path as on the composed f64 path.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng, rngs::StdRng};
use talaria::model::ops::{self, composed};
use talaria::model::{Activation, Gpt, GptConfig, Segment, init_weights};

mod common;
use common::max_abs_diff;

const TOL: f32 = 1e-5;

fn randn(rng: &mut StdRng, shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| scale * (rng.random::<f32>() * 2.0 - 1.0)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// max |a - b| / max |b|: the error relative to the reference's scale.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let s = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    max_abs_diff(a, b) / s.max(1e-30)
}

/// Runs `f` on fresh variables made from `inputs` and returns the output and the gradient of
/// `sum(out * probe)` with respect to each input (a random probe makes every gradient matter).
fn value_and_grads(
    inputs: &[Tensor],
    probe_seed: u64,
    f: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts).unwrap();
    let probe = randn(&mut StdRng::seed_from_u64(probe_seed), out.dims(), 1.0);
    let grads = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = ts
        .iter()
        .map(|t| grads.get(t).expect("input received no gradient").clone())
        .collect();
    (out, gs)
}

/// Checks a fused op against its composed reference on the same inputs.
fn check(
    what: &str,
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) {
    let (yf, gf) = value_and_grads(inputs, 99, fused);
    let (yr, gr) = value_and_grads(inputs, 99, reference);
    let e = rel_err(&yf, &yr);
    assert!(e < TOL, "{what}: forward relative error {e}");
    for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
        let e = rel_err(a, b);
        assert!(e < TOL, "{what}: gradient of input {i} relative error {e}");
    }
}

#[test]
fn fused_layer_norm_matches_composed() {
    let mut rng = StdRng::seed_from_u64(1);
    for dims in [vec![7, 13], vec![2, 3, 384], vec![1, 1], vec![5, 33]] {
        let c = *dims.last().unwrap();
        let x = (randn(&mut rng, &dims, 3.0) + 0.5).unwrap();
        let w = randn(&mut rng, &[c], 1.0);
        let b = randn(&mut rng, &[c], 1.0);
        check(
            &format!("layer_norm {dims:?}"),
            &[x, w, b],
            |t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-5),
            |t| composed::layer_norm(&t[0], &t[1], &t[2], 1e-5),
        );
    }
}

#[test]
fn fused_gelu_matches_composed() {
    let mut rng = StdRng::seed_from_u64(2);
    for dims in [vec![5, 37], vec![3, 1536], vec![1]] {
        let x = randn(&mut rng, &dims, 6.0);
        check(
            &format!("gelu {dims:?}"),
            &[x],
            |t| ops::activation(&t[0], Activation::GeluTanh),
            |t| composed::activation(&t[0], Activation::GeluTanh),
        );
    }
}

#[test]
fn fused_linear_matches_composed() {
    let mut rng = StdRng::seed_from_u64(3);
    // Up to 4 rows take the vector-matrix route (decoding), more go through gemm.
    for (x_dims, n) in [
        (vec![3, 5, 13], 19),
        (vec![1, 1, 1], 1),
        (vec![2, 9, 64], 96),
        (vec![1, 3, 37], 300),
    ] {
        let k = *x_dims.last().unwrap();
        let x = randn(&mut rng, &x_dims, 1.0);
        let w = randn(&mut rng, &[k, n], 0.5);
        let b = randn(&mut rng, &[n], 1.0);
        check(
            &format!("linear {x_dims:?} x [{k}, {n}]"),
            &[x, w, b],
            |t| ops::linear(&t[0], &t[1], &t[2]),
            |t| composed::linear(&t[0], &t[1], &t[2]),
        );
    }
}

#[test]
fn fused_self_attention_matches_composed() {
    let mut rng = StdRng::seed_from_u64(4);
    // (batch, time, heads, head width)
    for (b, t, h, dh) in [(2, 11, 3, 5), (1, 1, 2, 4), (3, 17, 1, 9), (2, 64, 6, 64)] {
        let qkv = randn(&mut rng, &[b, t, 3 * h * dh], 2.0);
        check(
            &format!("self-attention b{b} t{t} h{h} dh{dh}"),
            &[qkv],
            |x| ops::causal_self_attention(&x[0], h, None),
            |x| composed::causal_self_attention(&x[0], h, None),
        );
    }
}

#[test]
fn fused_cached_attention_matches_composed() {
    let mut rng = StdRng::seed_from_u64(5);
    // New queries after `past` cached keys, as in prefill after a prompt and in decoding.
    for (b, h, t, past, dh) in [(1, 3, 4, 3, 7), (2, 2, 1, 9, 5), (1, 1, 5, 0, 3)] {
        let q = randn(&mut rng, &[b, h, t, dh], 2.0);
        let k = randn(&mut rng, &[b, h, past + t, dh], 2.0);
        let v = randn(&mut rng, &[b, h, past + t, dh], 2.0);
        check(
            &format!("cached attention t{t} past{past}"),
            &[q, k, v],
            |x| ops::causal_attention(&x[0], &x[1], &x[2], past),
            |x| {
                let mask = (t > 1)
                    .then(|| ops::causal_mask(t, past, DType::F32, &Device::Cpu))
                    .transpose()?;
                composed::attention(&x[0], &x[1], &x[2], mask.as_ref())
            },
        );
    }
}

/// Decoding (no gradient): a few queries over strided views into a preallocated cache, and the
/// LM head's dot products.
#[test]
fn fused_decode_attention_and_head_match_composed() {
    let mut rng = StdRng::seed_from_u64(7);
    for (b, h, t, past, dh, cap) in [(1, 6, 1, 40, 64, 64), (2, 3, 3, 5, 7, 12), (1, 2, 1, 0, 5, 8)] {
        let q = randn(&mut rng, &[b, h, t, dh], 2.0);
        let k_buf = randn(&mut rng, &[b, h, cap, dh], 2.0);
        let v_buf = randn(&mut rng, &[b, h, cap, dh], 2.0);
        let k = k_buf.narrow(2, 0, past + t).unwrap();
        let v = v_buf.narrow(2, 0, past + t).unwrap();
        let got = ops::causal_attention(&q, &k, &v, past).unwrap();
        let mask = (t > 1).then(|| ops::causal_mask(t, past, DType::F32, &Device::Cpu).unwrap());
        let want = composed::attention(&q, &k, &v, mask.as_ref()).unwrap();
        let e = rel_err(&got, &want);
        assert!(e < TOL, "decode attention t{t} past{past}: relative error {e}");
    }
    for (r, v, c) in [(1, 8192, 384), (3, 300, 37)] {
        let x = randn(&mut rng, &[r, c], 1.0);
        let e = randn(&mut rng, &[v, c], 1.0);
        let got = ops::matmul_transposed(&x, &e).unwrap();
        let want = x.matmul(&e.t().unwrap()).unwrap();
        let err = rel_err(&got, &want);
        assert!(err < TOL, "head [{r}, {c}] x [{v}, {c}]^T: relative error {err}");
    }
}

#[test]
fn fused_cross_entropy_matches_composed() {
    let mut rng = StdRng::seed_from_u64(6);
    for (n, v) in [(9, 37), (4, 8192), (1, 3)] {
        let logits = randn(&mut rng, &[n, v], 8.0);
        let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
        let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        let weights = Tensor::from_vec((0..n).map(|i| (i % 3) as f32).collect::<Vec<_>>(), n, &Device::Cpu).unwrap();
        for w in [None, Some(&weights)] {
            check(
                &format!("cross-entropy [{n}, {v}] weighted {}", w.is_some()),
                std::slice::from_ref(&logits),
                |x| ops::cross_entropy(&x[0], &targets, w),
                |x| composed::cross_entropy(&x[0], &targets, w),
            );
        }
    }
}

#[test]
fn fused_head_cross_entropy_matches_composed() {
    let mut rng = StdRng::seed_from_u64(8);
    // More than one chunk of 512 rows, and a row count that is not a multiple of it.
    for (n, c, v) in [(9, 13, 37), (1100, 24, 300), (1, 3, 2)] {
        let hidden = randn(&mut rng, &[n, c], 2.0);
        let emb = randn(&mut rng, &[v, c], 1.0);
        let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
        let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        let weights = Tensor::from_vec((0..n).map(|i| (i % 3) as f32).collect::<Vec<_>>(), n, &Device::Cpu).unwrap();
        for w in [None, Some(&weights)] {
            check(
                &format!("head cross-entropy [{n}, {c}] x [{v}, {c}]^T weighted {}", w.is_some()),
                &[hidden.clone(), emb.clone()],
                |x| ops::head_cross_entropy(&x[0], &x[1], &targets, w),
                |x| composed::cross_entropy(&x[0].matmul(&x[1].t()?)?, &targets, w),
            );
        }
    }
}

/// The whole model: loss and every parameter's gradient on the fused f32 path agree with the
/// composed f64 path on the same weights (f32 rounding over a whole model stays under 1e-4).
#[test]
fn model_loss_and_gradients_agree_between_fused_f32_and_composed_f64() {
    let cfg = GptConfig {
        n_positions: 24,
        vocab_size: 61,
        ..GptConfig::preset("test").unwrap()
    };
    let w64 = init_weights(&cfg, 5, DType::F64, &Device::Cpu).unwrap();
    let run = |dtype: DType| {
        let vars: HashMap<String, Var> = w64
            .iter()
            .map(|(k, t)| (k.clone(), Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()))
            .collect();
        let ts: HashMap<String, Tensor> = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        let model = Gpt::from_weights(&cfg, &ts).unwrap();
        let ids: Vec<u32> = (0..3 * 21).map(|i| (i * 37 % 61) as u32).collect();
        let all = Tensor::from_vec(ids, (3, 21), &Device::Cpu).unwrap();
        let (x, y) = (all.narrow(1, 0, 20).unwrap(), all.narrow(1, 1, 20).unwrap());
        let loss = model.lm_loss(&x, &y, None).unwrap();
        let grads = loss.backward().unwrap();
        let g: HashMap<String, Tensor> = vars
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    grads.get(v.as_tensor()).unwrap().to_dtype(DType::F32).unwrap(),
                )
            })
            .collect();
        (loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(), g)
    };
    let (l32, g32) = run(DType::F32);
    let (l64, g64) = run(DType::F64);
    assert!((l32 - l64).abs() / l64 < 1e-5, "loss {l32} vs {l64}");
    for (name, g) in &g64 {
        let e = rel_err(&g32[name], g);
        assert!(e < 1e-4, "{name}: relative error {e}");
    }
}

/// The loss, every gradient and a decoding step of a small model, computed inside a rayon pool of
/// `threads` threads.
fn run_in_pool(threads: usize, cfg: &GptConfig, weights: &HashMap<String, Tensor>, ids: &Tensor) -> Vec<Vec<f32>> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| run_model(cfg, weights, ids))
}

/// What [`run_in_pool`] computes, on the calling thread.
fn run_model(cfg: &GptConfig, weights: &HashMap<String, Tensor>, ids: &Tensor) -> Vec<Vec<f32>> {
    let vars: HashMap<String, Var> = weights
        .iter()
        .map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    let model = Gpt::from_weights(
        cfg,
        &vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect(),
    )
    .unwrap();
    let (x, y) = (ids.narrow(1, 0, 63).unwrap(), ids.narrow(1, 1, 63).unwrap());
    let loss = model.lm_loss(&x, &y, None).unwrap();
    let grads = loss.backward().unwrap();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut out = vec![vec![loss.to_scalar::<f32>().unwrap()]];
    for n in names {
        let g = grads.get(vars[n].as_tensor()).unwrap();
        out.push(g.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    // A prefill of two ragged prompts and a decoding step of both, through the inference kernels
    // (untracked weights).
    let infer = model.detached();
    let mut cache = infer.new_slots(2, cfg.n_positions).unwrap();
    let row = |b: usize, from: usize, n: usize| -> Vec<u32> {
        ids.narrow(0, b, 1)
            .unwrap()
            .narrow(1, from, n)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let seg = |slot, past, len| Segment { slot, past, len };
    let prefill = [row(0, 0, 8), row(1, 0, 5)].concat();
    infer
        .forward_packed(&prefill, &[seg(0, 0, 8), seg(1, 0, 5)], &mut cache)
        .unwrap();
    let step = [row(0, 8, 1), row(1, 5, 1)].concat();
    let hidden = infer
        .forward_packed(&step, &[seg(0, 8, 1), seg(1, 5, 1)], &mut cache)
        .unwrap();
    let logits = infer.lm_head_rows(&hidden).unwrap();
    out.push(logits.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    out
}

#[test]
fn results_do_not_depend_on_the_number_of_threads() {
    // Training must be reproducible on a busy machine too: every reduction adds its parts in a fixed
    // order, whatever the thread count and however rayon splits the work.
    let mut cfg = GptConfig::preset("test").unwrap();
    cfg.n_embd = 96;
    cfg.vocab_size = 300;
    let weights = init_weights(&cfg, 4, DType::F32, &Device::Cpu).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let data: Vec<u32> = (0..8 * 64).map(|_| rng.random_range(0..300u32)).collect();
    let ids = Tensor::from_vec(data, (8, 64), &Device::Cpu).unwrap();
    let one = run_in_pool(1, &cfg, &weights, &ids);
    let same_as_one = |many: &[Vec<f32>], how: &str| {
        for (i, (a, b)) in one.iter().zip(many).enumerate() {
            let same = a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "output {i} differs between 1 thread and {how}");
        }
    };
    for threads in [2, 3, 4] {
        same_as_one(
            &run_in_pool(threads, &cfg, &weights, &ids),
            &format!("{threads} threads"),
        );
    }
    // The binary runs its work on the global pool (`fused::on_pool`); a library caller on its own
    // thread hands each kernel to that pool instead. Both must compute the same bits.
    same_as_one(&run_model(&cfg, &weights, &ids), "a caller outside the pool");
    same_as_one(
        &talaria::model::fused::on_pool(|| run_model(&cfg, &weights, &ids)),
        "fused::on_pool",
    );
}

/// The log-probabilities of `answers` to `prompts` and their gradient with respect to every weight,
/// computed with each prompt+answer in its own row, or with each prompt once and its answers after it.
fn answer_logprob_grads(
    cfg: &GptConfig,
    weights: &HashMap<String, Tensor>,
    groups: &[(Vec<u32>, Vec<Vec<u32>>)],
    grouped: bool,
) -> (Vec<f32>, HashMap<String, Tensor>) {
    use talaria::train::answers::{answer_logprobs, batch, grouped_batch};
    let vars: HashMap<String, Var> = weights
        .iter()
        .map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    let model = Gpt::from_weights(
        cfg,
        &vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect(),
    )
    .unwrap();
    let b = if grouped {
        let g: Vec<(&[u32], Vec<&[u32]>)> = groups
            .iter()
            .map(|(p, ans)| (p.as_slice(), ans.iter().map(Vec::as_slice).collect()))
            .collect();
        grouped_batch(&g, 0, &Device::Cpu).unwrap()
    } else {
        let seqs: Vec<(Vec<u32>, usize)> = groups
            .iter()
            .flat_map(|(p, ans)| ans.iter().map(move |a| ([p.clone(), a.clone()].concat(), p.len())))
            .collect();
        let refs: Vec<(&[u32], usize)> = seqs.iter().map(|(s, p)| (s.as_slice(), *p)).collect();
        batch(&refs, 0, &Device::Cpu).unwrap()
    };
    let lp = answer_logprobs(&model, &b, 0.7).unwrap();
    let mask = b.mask.to_dtype(lp.dtype()).unwrap();
    let masked = (lp * mask).unwrap();
    let grads = masked.sum_all().unwrap().backward().unwrap();
    let g = vars
        .iter()
        .map(|(k, v)| (k.clone(), grads.get(v.as_tensor()).unwrap().clone()))
        .collect();
    let flat = masked.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
    (flat.to_vec1().unwrap(), g)
}

#[test]
fn answers_sharing_their_prompt_in_one_row_get_the_same_logprobs_and_gradients() {
    let cfg = GptConfig::preset("test").unwrap();
    let mut rng = StdRng::seed_from_u64(21);
    let mut toks = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect() };
    // Prompts of different lengths; answers of different lengths, one of them a single token.
    let groups: Vec<(Vec<u32>, Vec<Vec<u32>>)> = vec![
        (toks(9), vec![toks(5), toks(1), toks(7)]),
        (toks(4), vec![toks(6)]),
        (toks(13), vec![toks(3), toks(8)]),
    ];
    for dtype in [DType::F32, DType::F64] {
        let weights: HashMap<String, Tensor> = init_weights(&cfg, 8, DType::F32, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.to_dtype(dtype).unwrap()))
            .collect();
        let (lp_rows, g_rows) = answer_logprob_grads(&cfg, &weights, &groups, false);
        let (lp_grouped, g_grouped) = answer_logprob_grads(&cfg, &weights, &groups, true);
        assert_eq!(lp_rows.len(), lp_grouped.len());
        for (a, b) in lp_rows.iter().zip(&lp_grouped) {
            assert!((a - b).abs() < 1e-5, "{dtype:?}: log-probability {a} vs {b}");
        }
        for (name, g) in &g_rows {
            let (g, h) = (
                g.to_dtype(DType::F32).unwrap(),
                g_grouped[name].to_dtype(DType::F32).unwrap(),
            );
            let e = rel_err(&h, &g);
            assert!(e < 1e-4, "{dtype:?} {name}: relative gradient error {e}");
            assert!(
                g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0,
                "{name} gets a gradient"
            );
        }
    }
}
