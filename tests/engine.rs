//! The batched engine: ragged batches decode exactly as each prompt alone, the KV slots match full
//! recomputation, seeded samples do not depend on the rest of the batch, cancellation frees slots,
//! finish reasons name the stop that fired, and the inference kernels match the composed ops.

use candle_core::{D, DType, Device, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};
use talaria::engine::{
    Completion, Engine, EngineConfig, Event, FinishReason, Request, Sampling, SamplingParams, generate_batch,
};
use talaria::model::ops::composed;
use talaria::model::{Gpt, GptConfig, Segment, infer, init_weights};
use talaria::tokenizer::Tokenizer;

mod common;
use common::max_abs_diff;

fn model(seed: u64) -> Gpt {
    let cfg = GptConfig::preset("test").unwrap();
    Gpt::from_weights(&cfg, &init_weights(&cfg, seed, DType::F32, &Device::Cpu).unwrap()).unwrap()
}

fn prompt(seed: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|j| ((seed * 131 + j * 37 + 7) % vocab) as u32).collect()
}

fn alone(m: &Gpt, req: Request) -> Vec<Completion> {
    generate_batch(m, None, vec![req], EngineConfig::default(), |_| {})
        .unwrap()
        .remove(0)
}

fn sampled(seed: u64) -> Sampling {
    Sampling {
        params: SamplingParams {
            temperature: 1.0,
            top_k: Some(40),
            top_p: Some(0.95),
        },
        seed,
    }
}

/// Logits `[V]` of the last position of `seq` by one full forward pass without a cache.
fn full_logits(m: &Gpt, seq: &[u32]) -> Vec<f32> {
    let x = Tensor::new(seq, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let l = m.forward(&x).unwrap();
    l.narrow(1, seq.len() - 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn ragged_batches_decode_each_prompt_exactly_as_alone() {
    let m = model(3);
    let v = m.config().vocab_size;
    // Prompts of different lengths and budgets; every other one stops on the token it would
    // produce third when free (so it finishes early, on a stop token); a small batch, so later
    // requests join while others run.
    let requests: Vec<Request> = (0..9)
        .map(|i| {
            let (p, max_new) = (prompt(i, 1 + 3 * i, v), 4 + 5 * (i % 3));
            let stop = if i % 2 == 1 {
                vec![alone(&m, Request::greedy(p.clone(), 3, vec![]))[0].tokens[2]]
            } else {
                vec![]
            };
            Request::greedy(p, max_new, stop)
        })
        .collect();
    let cfg = EngineConfig {
        max_batch: 3,
        token_budget: 8,
        capacity: None,
    };
    let batched = generate_batch(&m, None, requests.clone(), cfg, |_| {}).unwrap();
    let mut reasons = vec![];
    for (r, got) in requests.into_iter().zip(batched) {
        let want = alone(&m, r);
        assert_eq!(got, want);
        reasons.push(got[0].finish.clone());
    }
    let stopped = reasons
        .iter()
        .filter(|f| matches!(f, FinishReason::StopToken(_)))
        .count();
    let at_length = reasons.iter().filter(|f| **f == FinishReason::Length).count();
    assert!(
        stopped >= 2 && at_length >= 2,
        "the batch needs sequences that stop early and ones that run to their budget: {reasons:?}"
    );
}

#[test]
fn a_batchs_logits_match_full_recomputation_bit_for_bit_across_batch_shapes() {
    let m = model(5);
    let v = m.config().vocab_size;
    let seqs: Vec<Vec<u32>> = (0..5).map(|i| prompt(i, 6 + 4 * i, v)).collect();
    // Prefill every sequence but its last token in chunks, then decode the last tokens together.
    let mut cache = m.new_slots(5, 64).unwrap();
    for (slot, s) in seqs.iter().enumerate() {
        let body = &s[..s.len() - 1];
        for (at, chunk) in body.chunks(5).enumerate().map(|(i, c)| (i * 5, c)) {
            let seg = Segment {
                slot,
                past: at,
                len: chunk.len(),
            };
            m.forward_packed(chunk, &[seg], &mut cache).unwrap();
        }
    }
    let last: Vec<u32> = seqs.iter().map(|s| *s.last().unwrap()).collect();
    let segs: Vec<Segment> = seqs
        .iter()
        .enumerate()
        .map(|(slot, s)| Segment {
            slot,
            past: s.len() - 1,
            len: 1,
        })
        .collect();
    // On a pool of two threads, so that the step runs as two halves of its rows (one per thread)
    // whatever this machine's core count.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let hidden = pool.install(|| m.forward_packed(&last, &segs, &mut cache)).unwrap();
    let batched = m.lm_head_rows(&hidden).unwrap().to_vec2::<f32>().unwrap();
    for (i, s) in seqs.iter().enumerate() {
        // The cache agrees with recomputation from scratch (up to the other kernels' rounding)...
        let full = full_logits(&m, s);
        let worst = full
            .iter()
            .zip(&batched[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "sequence {i}: max |cached - full| = {worst}");
        // ...and equals, bit for bit, the same sequence prefilled whole and decoded alone.
        let mut one = m.new_slots(1, 64).unwrap();
        let body = &s[..s.len() - 1];
        m.forward_packed(
            body,
            &[Segment {
                slot: 0,
                past: 0,
                len: body.len(),
            }],
            &mut one,
        )
        .unwrap();
        let h = m
            .forward_packed(
                &[last[i]],
                &[Segment {
                    slot: 0,
                    past: body.len(),
                    len: 1,
                }],
                &mut one,
            )
            .unwrap();
        let solo = m.lm_head_rows(&h).unwrap().to_vec2::<f32>().unwrap().remove(0);
        assert!(
            solo.iter().zip(&batched[i]).all(|(a, b)| a.to_bits() == b.to_bits()),
            "sequence {i}: batched logits differ from decoding alone"
        );
    }
}

#[test]
fn seeded_samples_are_reproducible_and_independent_of_the_batch() {
    let m = model(7);
    let v = m.config().vocab_size;
    let p = prompt(1, 9, v);
    let req = Request::greedy(p.clone(), 12, vec![]).with_samples((0..4).map(sampled).collect());
    let once = alone(&m, req.clone());
    assert_eq!(once, alone(&m, req.clone()), "the same seeds give the same samples");
    let distinct: std::collections::HashSet<&Vec<u32>> = once.iter().map(|c| &c.tokens).collect();
    assert!(distinct.len() > 1, "different seeds give different samples");
    // The same request among others, admitted in another order, in a smaller batch.
    let mut others: Vec<Request> = (2..6)
        .map(|i| Request::greedy(prompt(i, 3 + i, v), 10, vec![]).with_samples(vec![sampled(100 + i as u64)]))
        .collect();
    others.insert(2, req);
    let cfg = EngineConfig {
        max_batch: 6,
        token_budget: 16,
        capacity: None,
    };
    let together = generate_batch(&m, None, others, cfg, |_| {}).unwrap();
    assert_eq!(together[2], once);
    // One sample alone with the seed of sample 2 draws what sample 2 drew.
    let single = alone(&m, Request::greedy(p, 12, vec![]).with_samples(vec![sampled(2)]));
    assert_eq!(single[0], once[2]);
}

#[test]
fn finish_reasons_name_the_stop_that_fired() {
    let m = model(9);
    let v = m.config().vocab_size;
    let p = prompt(4, 6, v);
    let free = alone(&m, Request::greedy(p.clone(), 20, vec![])).remove(0);
    assert_eq!(free.finish, FinishReason::Length);
    assert_eq!(free.tokens.len(), 20);
    // A stop token: the output ends before it, and the reason names it.
    let t = free.tokens[5];
    let first = free.tokens.iter().position(|&x| x == t).unwrap();
    let unused = (0..v as u32).find(|x| !free.tokens.contains(x)).unwrap();
    let mut req = Request::greedy(p.clone(), 20, vec![unused, t]);
    req.logprobs = Some(1);
    let stopped = alone(&m, req).remove(0);
    assert_eq!(stopped.finish, FinishReason::StopToken(t));
    assert_eq!(stopped.tokens, free.tokens[..first]);
    // Its log-probabilities end with the stop token's.
    let lp = stopped.logprobs.unwrap();
    assert_eq!(lp.len(), first + 1);
    assert_eq!(lp[first].token, t);
    // The context: a prompt near the end of the 64 positions.
    let long = prompt(5, 60, v);
    let ctx = alone(&m, Request::greedy(long, 20, vec![])).remove(0);
    assert_eq!(ctx.finish, FinishReason::Context);
    assert_eq!(ctx.tokens.len(), 4);
    // Stop strings need text: a byte-level tokenizer and a model over its vocabulary.
    let tok = test_tokenizer(v);
    let mut cfg = GptConfig::preset("test").unwrap();
    cfg.vocab_size = tok.vocab_size();
    let m = Gpt::from_weights(&cfg, &init_weights(&cfg, 9, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let p = tok.encode("the cat sat").unwrap();
    let free = alone(&m, Request::greedy(p.clone(), 20, vec![])).remove(0);
    let text = tok.decode(&free.tokens).unwrap();
    let stop: String = text.chars().skip(3).take(2).collect();
    assert_eq!(stop.chars().count(), 2, "{text:?}");
    let mut req = Request::greedy(p, 20, vec![]);
    req.stop_strings = vec!["\u{1F600} never".into(), stop.clone()];
    let got = generate_batch(&m, Some(&tok), vec![req], EngineConfig::default(), |_| {})
        .unwrap()
        .remove(0)
        .remove(0);
    assert_eq!(got.finish, FinishReason::StopString(stop.clone()));
    let cut = text.find(&stop).unwrap();
    assert_eq!(got.text, text[..cut]);
}

/// A byte-level BPE whose ids cover `vocab` (the test model's vocabulary).
fn test_tokenizer(vocab: usize) -> Tokenizer {
    let cfg = talaria::tokenizer::TrainConfig {
        vocab_size: vocab,
        min_frequency: 1,
        show_progress: false,
    };
    let text: Vec<String> = (0..400)
        .map(|i| format!("the cat {i} sat on mat number {} and ran", i * 7))
        .collect();
    let (tok, _) = talaria::tokenizer::train_bpe(&cfg, text.into_iter().map(Ok)).unwrap();
    assert!(tok.vocab_size() <= vocab);
    tok
}

#[test]
fn cancelling_a_request_frees_its_slots_at_once() {
    let m = model(11);
    let v = m.config().vocab_size;
    let mut e = Engine::new(
        &m,
        None,
        EngineConfig {
            max_batch: 4,
            token_budget: 32,
            capacity: None,
        },
    )
    .unwrap();
    let a = e
        .admit(Request::greedy(prompt(1, 5, v), 40, vec![]).with_samples(vec![Sampling::greedy(); 3]))
        .unwrap();
    assert_eq!(e.free_slots(), 1);
    assert!(
        e.admit(Request::greedy(prompt(2, 5, v), 4, vec![]).with_samples(vec![Sampling::greedy(); 2]))
            .is_err(),
        "two samples do not fit one free slot"
    );
    e.step().unwrap();
    e.step().unwrap();
    assert_eq!(e.running(), 3);
    e.cancel(a);
    assert_eq!(e.free_slots(), 4);
    let events = e.step().unwrap();
    let cancelled: Vec<&Completion> = events
        .iter()
        .filter_map(|ev| match ev {
            Event::Finished { req, completion, .. } if *req == a => Some(completion),
            _ => None,
        })
        .collect();
    assert_eq!(cancelled.len(), 3);
    assert!(
        cancelled
            .iter()
            .all(|c| c.finish == FinishReason::Cancelled && c.tokens.len() == 2)
    );
    assert!(e.is_idle());
    // The freed slots serve a new request that decodes as if alone.
    let req = Request::greedy(prompt(3, 7, v), 6, vec![]).with_samples(vec![Sampling::greedy(); 4]);
    let b = e.admit(req.clone()).unwrap();
    let mut done = vec![None; 4];
    while !e.is_idle() {
        for ev in e.step().unwrap() {
            if let Event::Finished {
                req, index, completion, ..
            } = ev
            {
                assert_eq!(req, b);
                done[index] = Some(completion);
            }
        }
    }
    let want = alone(&m, req);
    assert_eq!(done.into_iter().map(Option::unwrap).collect::<Vec<_>>(), want);
}

#[test]
fn log_probabilities_are_those_of_the_full_distribution() {
    let m = model(13);
    let v = m.config().vocab_size;
    let p = prompt(6, 8, v);
    let mut req = Request::greedy(p.clone(), 5, vec![]).with_samples(vec![sampled(1)]);
    req.logprobs = Some(3);
    req.prompt_logprobs = Some(2);
    let c = alone(&m, req).remove(0);
    let seq: Vec<u32> = p.iter().chain(&c.tokens).copied().collect();
    let x = Tensor::new(seq.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logp = candle_nn::ops::log_softmax(&m.forward(&x).unwrap(), D::Minus1)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let prompt_lp = c.prompt_logprobs.unwrap();
    assert_eq!(prompt_lp.len(), p.len());
    assert!(prompt_lp[0].is_none(), "the first prompt token has no log-probability");
    for (i, lp) in prompt_lp.iter().enumerate().skip(1) {
        let lp = lp.as_ref().unwrap();
        assert_eq!(lp.token, p[i]);
        assert!((lp.logprob - logp[i - 1][p[i] as usize]).abs() < 1e-4);
        assert_eq!(lp.top.len(), 2);
    }
    let gen_lp = c.logprobs.unwrap();
    assert_eq!(gen_lp.len(), c.tokens.len(), "no stop token ended it");
    for (k, lp) in gen_lp.iter().enumerate() {
        let row = &logp[p.len() - 1 + k];
        assert!((lp.logprob - row[lp.token as usize]).abs() < 1e-4);
        // Best first, and the best is the row's maximum.
        let best = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert!((lp.top[0].1 - best).abs() < 1e-4 && lp.top[0].1 >= lp.top[1].1 && lp.top[1].1 >= lp.top[2].1);
    }
}

#[test]
fn the_inference_kernels_match_the_composed_ops() {
    let mut rng = StdRng::seed_from_u64(1);
    let mut randn = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    };
    // Row counts around the tile sizes, columns that are not multiples of the vector width.
    for (r, k, n) in [
        (1, 7, 5),
        (2, 33, 70),
        (3, 64, 96),
        (5, 20, 131),
        (9, 48, 64),
        (70, 40, 200),
    ] {
        let (x, w, b) = (randn(&[r, k]), randn(&[k, n]), randn(&[n]));
        let want = composed::linear(&x, &w, &b).unwrap();
        let got = infer::linear(&x, &w, &b).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-4, "linear {r}x{k}x{n}");
        let e = randn(&[n, k]);
        let want = x.matmul(&e.t().unwrap()).unwrap();
        let got = infer::times_transposed(&x, &e).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-4, "lm head {r}x{k}x{n}");
        // Each row is computed the same whatever the other rows are.
        let top = x.narrow(0, 0, 1).unwrap();
        let alone = infer::linear(&top, &w, &b).unwrap();
        let in_batch = infer::linear(&x, &w, &b).unwrap().narrow(0, 0, 1).unwrap();
        assert_eq!(max_abs_diff(&alone, &in_batch), 0.0, "rows of {r}x{k}x{n}");
    }
}

/// The weights as the low-precision kernels see them: rounded to f16 or bf16, or q8 per column
/// group (`quantize_q8`), as f64 `[K, N]`.
fn rounded(w: &[f32], k: usize, n: usize, dtype: infer::WeightDtype) -> Vec<f64> {
    match dtype {
        infer::WeightDtype::F32 => w.iter().map(|&x| x as f64).collect(),
        infer::WeightDtype::F16 => w.iter().map(|&x| half::f16::from_f32(x).to_f64()).collect(),
        infer::WeightDtype::Bf16 => w.iter().map(|&x| half::bf16::from_f32(x).to_f64()).collect(),
        infer::WeightDtype::Q8 => {
            let mut out = vec![0f64; k * n];
            for j in 0..n {
                let column: Vec<f32> = (0..k).map(|kk| w[kk * n + j]).collect();
                let (q, s) = infer::quantize_q8(&column);
                for kk in 0..k {
                    out[kk * n + j] = q[kk] as f64 * s[kk / infer::Q8_GROUP] as f64;
                }
            }
            out
        }
    }
}

#[test]
fn half_and_quarter_size_kernels_compute_the_product_of_their_rounded_weights() {
    let mut rng = StdRng::seed_from_u64(5);
    // A column count that leaves a partial block; 1 to 5 rows (every tile shape).
    let (k, n) = (64, 100);
    let w: Vec<f32> = (0..k * n).map(|_| rng.random::<f32>() - 0.5).collect();
    let b: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
    let wt = Tensor::from_vec(w.clone(), (k, n), &Device::Cpu).unwrap();
    let bt = Tensor::from_vec(b.clone(), n, &Device::Cpu).unwrap();
    for dtype in [
        infer::WeightDtype::F16,
        infer::WeightDtype::Bf16,
        infer::WeightDtype::Q8,
    ] {
        let packed = infer::Packed::with_dtype(&wt, dtype).unwrap();
        assert_eq!(packed.dtype(), dtype);
        assert!(
            packed.bytes() * 2 <= k * 64 * 2 * 4,
            "{dtype}: {} bytes",
            packed.bytes()
        );
        let exact = rounded(&w, k, n, dtype);
        for rows in 1..=5 {
            let x: Vec<f32> = (0..rows * k).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            let xt = Tensor::from_vec(x.clone(), (rows, k), &Device::Cpu).unwrap();
            let y = packed.linear(&xt, &bt).unwrap().to_vec2::<f32>().unwrap();
            for r in 0..rows {
                for j in 0..n {
                    let want: f64 =
                        b[j] as f64 + (0..k).map(|kk| x[r * k + kk] as f64 * exact[kk * n + j]).sum::<f64>();
                    let got = y[r][j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{dtype} row {r} col {j}: {got} vs {want}"
                    );
                }
            }
        }
    }
    // q8 needs whole groups of 32 inputs: other shapes are kept in f16.
    let odd = Tensor::from_vec(w[..48 * n].to_vec(), (48, n), &Device::Cpu).unwrap();
    assert_eq!(
        infer::Packed::with_dtype(&odd, infer::WeightDtype::Q8).unwrap().dtype(),
        infer::WeightDtype::F16
    );
}

#[test]
fn q8_round_trip_stays_within_half_a_step_of_each_group() {
    let mut rng = StdRng::seed_from_u64(9);
    let column: Vec<f32> = (0..256)
        .map(|i| (rng.random::<f32>() - 0.5) * (1.0 + (i / 32) as f32))
        .collect();
    let (q, scales) = infer::quantize_q8(&column);
    assert_eq!(scales.len(), 256 / infer::Q8_GROUP);
    for (i, &w) in column.iter().enumerate() {
        let s = scales[i / infer::Q8_GROUP];
        let amax = column[i / 32 * 32..i / 32 * 32 + 32]
            .iter()
            .fold(0f32, |m, x| m.max(x.abs()));
        assert!((s - amax / 127.0).abs() <= f32::EPSILON * amax);
        assert!((w - q[i] as f32 * s).abs() <= s / 2.0 * (1.0 + 1e-6), "weight {i}");
    }
    // An all-zero group has scale 0 and decodes to zeros.
    let (q, s) = infer::quantize_q8(&[0.0; 32]);
    assert!(q.iter().all(|&x| x == 0) && s == [0.0]);
}

#[test]
fn low_precision_decoding_stays_close_to_f32_and_leaves_the_weights_f32() {
    let m = model(21);
    let v = m.config().vocab_size;
    let p = prompt(3, 12, v);
    let logits = |dtype: infer::WeightDtype, kv: talaria::model::KvDtype| {
        let mut mm = model(21);
        mm.set_decode_dtype(dtype);
        mm.set_kv_dtype(kv);
        let mut req = Request::greedy(p.clone(), 8, vec![]);
        req.logprobs = Some(v);
        let c = alone(&mm, req).remove(0);
        // Its tensors, as a checkpoint would save them, are the f32 originals.
        for (name, t) in mm.weights() {
            assert_eq!(t.dtype(), DType::F32);
            assert_eq!(max_abs_diff(&t, &m.weights()[&name]), 0.0, "{name}");
        }
        c
    };
    use talaria::model::KvDtype;
    let base = logits(infer::WeightDtype::F32, KvDtype::F32);
    for (dtype, kv, tol) in [
        (infer::WeightDtype::F16, KvDtype::F32, 2e-3),
        (infer::WeightDtype::Bf16, KvDtype::F32, 2e-2),
        (infer::WeightDtype::Q8, KvDtype::F32, 2e-2),
        (infer::WeightDtype::F32, KvDtype::F16, 2e-3),
        (infer::WeightDtype::F16, KvDtype::F16, 4e-3),
    ] {
        let c = logits(dtype, kv);
        // Every generated position, not only the first: later ones read the cache.
        let (la, lb) = (base.logprobs.as_ref().unwrap(), c.logprobs.as_ref().unwrap());
        if c.tokens == base.tokens {
            for (x, y) in la.iter().zip(lb) {
                assert!(
                    (x.logprob - y.logprob).abs() < tol,
                    "{dtype} kv {kv}: {} vs {}",
                    x.logprob,
                    y.logprob
                );
            }
        }
        // Log-probabilities of the first generated position (same prompt, so same distribution).
        let (a, b) = (&base.logprobs.as_ref().unwrap()[0], &c.logprobs.as_ref().unwrap()[0]);
        let worst = a
            .top
            .iter()
            .map(|(t, x)| {
                let y = b.top.iter().find(|(u, _)| u == t).unwrap().1;
                (x - y).abs()
            })
            .fold(0f32, f32::max);
        eprintln!("{dtype} (kv {kv}): largest log-probability difference at the first position {worst:.2e}");
        assert!(worst < tol, "{dtype} kv {kv}: {worst}");
    }
}
