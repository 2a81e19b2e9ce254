//! Reward model, PPO and DPO on a small default world: readers, the reward head's position,
//! learning, exact resume, and clear errors.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use talaria::chat::{ChatTemplate, Message, Role};
use talaria::data::preferences::read_preferences;
use talaria::data::prepare::{PrepareConfig, prepare};
use talaria::data::prompts::PromptRecord;
use talaria::data::shards::{Split, TokenLoader};
use talaria::eval::tasks::{reward_on_mistakes, win_rate};
use talaria::metrics::read_metrics;
use talaria::model::{Gpt, GptConfig, init_weights};
use talaria::tokenizer::{self, Tokenizer};
use talaria::train::comparisons::{LabelConfig, label};
use talaria::train::dpo::{DpoConfig, dpo};
use talaria::train::ppo::{PpoConfig, RewardSpec, ppo};
use talaria::train::reward::{
    RewardConfig, RewardModel, fitting_prompt, render_answer, sequence_scores, train_reward_model,
};
use talaria::train::sft::{SftConfig, sft};
use talaria::train::trainer::TrainConfig;

mod common;
use common::max_abs_diff;

fn train_cfg(out: &Path, steps: u64, lr: f64) -> TrainConfig {
    TrainConfig {
        warmup: 2,
        eval_every: steps,
        seed: 9,
        ..common::train_cfg(out, steps, lr)
    }
}

/// A small world, a tokenizer trained on it, and a briefly fine-tuned chat model, built once.
struct Fixture {
    _dir: tempfile::TempDir,
    world: PathBuf,
    sft: PathBuf,
    reward: PathBuf,
    tok: Tokenizer,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let world = dir.path().join("world");
        let tok = common::small_world(&world, 400);
        let mut cfg = GptConfig::preset("tiny").unwrap();
        cfg.vocab_size = tok.vocab_size();
        let w = init_weights(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
        let base = dir.path().join("base");
        common::save_checkpoint(&base, &cfg, &w, Some(&tok.to_json().unwrap()), "pretrain");
        let sft_dir = dir.path().join("sft");
        sft(&SftConfig {
            init: base,
            data: vec![world.join("sft_train.jsonl")],
            val_data: vec![world.join("sft_val.jsonl")],
            val_fraction: 0.0,
            batch_size: 8,
            seq_len: Some(64),
            train: train_cfg(&sft_dir, 40, 2e-3),
        })
        .unwrap();
        let reward = dir.path().join("reward");
        train_reward_model(&RewardConfig {
            init: sft_dir.clone(),
            data: vec![world.join("prefs_train.jsonl"), world.join("rankings_train.jsonl")],
            val_data: vec![world.join("prefs_val.jsonl")],
            val_fraction: 0.0,
            batch_size: 8,
            train: train_cfg(&reward, 60, 1e-3),
        })
        .unwrap();
        Fixture {
            world,
            sft: sft_dir,
            reward,
            tok,
            _dir: dir,
        }
    })
}

fn metric(run: &Path, stage: &str, key: &str) -> Vec<f64> {
    read_metrics(&run.join("metrics.jsonl"), Some(stage))
        .unwrap()
        .iter()
        .filter_map(|r| r[key].as_f64())
        .collect()
}

#[test]
fn preference_readers_expand_rankings_and_skip_bad_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("p.jsonl");
    std::fs::write(
        &p,
        concat!(
            "{\"prompt\": \"Say hi\", \"chosen\": \"Hi!\", \"rejected\": \"No.\"}\n",
            "{\"prompt\": [{\"role\": \"user\", \"content\": \"Pick\"}], \"ranked\": [\"a\", \"b\", \"c\", \"d\"]}\n",
            "{\"prompt\": \"x\", \"chosen\": \"same\", \"rejected\": \"same\"}\n",
            "{\"prompt\": \"x\", \"chosen\": \"\", \"rejected\": \"something\"}\n",
            "{\"chosen\": \"\\n\\nHuman: hello\\n\\nAssistant: hi there\", \"rejected\": \"\\n\\nHuman: hello\\n\\nAssistant: go away\"}\n",
        ),
    )
    .unwrap();
    let prefs = read_preferences(&p).unwrap();
    assert_eq!(prefs.groups.len(), 3);
    assert_eq!(prefs.groups[1].pairs().len(), 6, "K = 4 gives K(K-1)/2 pairs");
    assert_eq!(prefs.skipped.len(), 2);
    assert_eq!(prefs.groups[2].prompt, vec![Message::new(Role::User, "hello")]);
    assert_eq!(
        prefs.groups[2].ranked,
        vec!["hi there".to_string(), "go away".to_string()]
    );
    std::fs::write(&p, "{\"prompt\": \"x\", \"chosen\": \"a\"}\n").unwrap();
    let e = format!("{:#}", read_preferences(&p).unwrap_err());
    assert!(e.contains("p.jsonl:1") && e.contains("unrecognised record"), "{e}");
}

#[test]
fn real_preference_files_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    let hh = root.join("preference/hh_rlhf_harmless_base_test.jsonl.gz");
    if !hh.exists() {
        common::skip("data", &format!("{} is absent", hh.display()));
        return;
    }
    let prefs = read_preferences(&hh).unwrap();
    // 2312 records: every one is a parsed pair or a counted skip.
    assert_eq!(prefs.groups.len() + prefs.skipped.len(), 2312);
    assert!(prefs.groups.len() > 2000, "{}", prefs.groups.len());
    let oasst = read_preferences(&root.join("sft/oasst_en_100_trees.jsonl")).unwrap();
    // SOURCES.md: 211 nodes have at least two ranked replies (some prompts are deleted/synthetic).
    assert!(
        oasst.groups.len() > 150 && oasst.groups.len() <= 211,
        "{}",
        oasst.groups.len()
    );
    assert!(
        oasst
            .groups
            .iter()
            .all(|g| g.ranked.len() >= 2 && g.prompt.last().unwrap().role == Role::User)
    );
}

#[test]
fn win_rate_and_the_reward_models_verdicts_on_a_models_own_answers() {
    let f = fixture();
    let rm = RewardModel::load(&f.reward, &Device::Cpu).unwrap();
    let rec = |q: &str, answer: &str| PromptRecord {
        messages: vec![Message::new(Role::User, q)],
        answer: Some(answer.into()),
        skill: Some("reverse".into()),
    };
    let prompts = vec![
        rec("What is storm spelled backwards?", "mrots"),
        rec("What is lemon spelled backwards?", "nomel"),
        rec("What is river spelled backwards?", "revir"),
        rec("What is tiger spelled backwards?", "regit"),
    ];
    // A right / B wrong, A wrong / B right, both right, both wrong.
    let a: Vec<String> = ["mrots", "nomle", "revir", "rgeit"].map(String::from).into();
    let b: Vec<String> = ["mrost", "nomel", "revir", "regti"].map(String::from).into();
    let w = win_rate(&prompts, &a, &b, Some(&rm)).unwrap();
    assert_eq!(w.by_verifier, Some((1.0 + 0.0 + 0.5 + 0.5) / 4.0));
    assert_eq!(w.separated, 2);
    // Agreement from the reward model's own scores of the two separated prompts' answers.
    let score = |p: &PromptRecord, x: &str| rm.score(&[(p.messages.as_slice(), x)], 1).unwrap()[0];
    let agrees = |right: f32, wrong: f32| {
        if right > wrong {
            1.0
        } else if right == wrong {
            0.5
        } else {
            0.0
        }
    };
    let expected = (agrees(score(&prompts[0], "mrots"), score(&prompts[0], "mrost"))
        + agrees(score(&prompts[1], "nomel"), score(&prompts[1], "nomle")))
        / 2.0;
    assert_eq!(w.rm_agreement, Some(expected));
    let wins = (0..4)
        .map(|i| agrees(score(&prompts[i], &a[i]), score(&prompts[i], &b[i])))
        .sum::<f64>()
        / 4.0;
    assert_eq!(w.by_reward_model, Some(wins));
    // Without a reward model only the verifier judges.
    let w = win_rate(&prompts, &a, &b, None).unwrap();
    assert_eq!((w.by_reward_model, w.rm_agreement, w.separated), (None, None, 2));

    // On A's own mistakes (prompts 1 and 3; an empty answer is no attempt), the reference against A's answer.
    let mut a_with_empty = a.clone();
    a_with_empty[2] = String::new();
    let v = reward_on_mistakes(&prompts, &a_with_empty, &rm).unwrap();
    assert_eq!(v.mistakes(), 2);
    let right = agrees(score(&prompts[1], "nomel"), score(&prompts[1], "nomle"))
        + agrees(score(&prompts[3], "regit"), score(&prompts[3], "rgeit"));
    assert_eq!(v.accuracy(), Some(right / 2.0));
    assert_eq!(v.by_skill.len(), 1);
    assert_eq!(v.by_skill["reverse"], (right, 2));
    let all_right: Vec<String> = prompts.iter().map(|p| p.answer.clone().unwrap()).collect();
    let none = reward_on_mistakes(&prompts, &all_right, &rm).unwrap();
    assert_eq!((none.mistakes(), none.accuracy()), (0, None));
}

#[test]
fn the_reward_head_reads_the_last_answer_token_not_padding() {
    let f = fixture();
    let rm = RewardModel::load(&f.reward, &Device::Cpu).unwrap();
    let t = ChatTemplate::new(&f.tok).unwrap();
    let prompt = vec![Message::new(Role::User, "What is storm spelled backwards?")];
    let short = render_answer(&f.tok, &t, &prompt, "mrots").unwrap();
    let long = render_answer(
        &f.tok,
        &t,
        &prompt,
        "I am not sure, but it could be mrots or something else.",
    )
    .unwrap();
    let alone = sequence_scores(&rm.gpt, &rm.head, std::slice::from_ref(&short), 0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let padded = sequence_scores(&rm.gpt, &rm.head, &[short.clone(), long], 7)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((alone[0] - padded[0]).abs() < 1e-4, "{alone:?} vs {padded:?}");
    // And it is the last token: the same answer without its closing <|end|> scores differently.
    let cut = sequence_scores(&rm.gpt, &rm.head, &[short[..short.len() - 1].to_vec()], 0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(cut[0], alone[0]);
}

#[test]
fn the_reward_model_learns_the_labeller_and_flags_length_bias() {
    let f = fixture();
    let acc = metric(&f.reward, "reward", "accuracy");
    let corr = metric(&f.reward, "reward", "length_corr");
    assert_eq!(acc.len(), 1);
    assert_eq!(corr.len(), 1);
    assert!(acc[0] > 0.6, "held-out pairwise accuracy {}", acc[0]);
    // The world's chosen answers are the concise ones, so a reward model that learned them scores
    // shorter answers higher: the alarm reads a clearly negative correlation.
    assert!(corr[0] < -0.2, "reward/length correlation {}", corr[0]);
}

fn ppo_cfg(f: &Fixture, out: &Path, reward: RewardSpec, steps: u64) -> PpoConfig {
    PpoConfig {
        policy: f.sft.clone(),
        device: Device::Cpu,
        dtype: DType::F32,
        reference: None,
        reward,
        monitor: None,
        prompts: f.world.join("rl_prompts.jsonl"),
        eval_prompts: Some(f.world.join("eval_prompts.jsonl")),
        out: out.to_path_buf(),
        steps,
        prompts_per_step: 4,
        samples_per_prompt: 2,
        max_new_tokens: 10,
        temperature: 1.0,
        lr: 1e-4,
        critic_lr: 1e-4,
        warmup: 1,
        ppo_epochs: 2,
        minibatch: 4,
        clip: 0.2,
        value_clip: 0.2,
        gamma: 1.0,
        lambda: 0.95,
        kl_coef: 0.05,
        kl_target: Some(1.0),
        kl_horizon: 100.0,
        kl_loss_coef: 0.0,
        reward_clip: 5.0,
        prompt_baseline: false,
        no_end_penalty: -2.0,
        ptx_data: None,
        ptx_coef: 0.0,
        ptx_seq_len: usize::MAX,
        grad_clip: 1.0,
        seed: 4,
        eval_every: steps,
        save_every: 1000,
        resume: false,
        stop_at: None,
        progress: false,
    }
}

#[test]
fn ppo_logs_every_quantity_and_resumes_exactly() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    let o = ppo(&ppo_cfg(f, &whole, RewardSpec::Model(f.reward.clone()), 4)).unwrap();
    assert_eq!(o.steps, 4);
    for key in [
        "reward",
        "kl",
        "kl_coef",
        "entropy",
        "clip_frac",
        "value_loss",
        "answer_len",
        "ended",
        "train_accuracy",
    ] {
        let v = metric(&whole, "ppo", key);
        assert_eq!(v.len(), 4, "{key}");
        assert!(v.iter().all(|x| x.is_finite()), "{key}: {v:?}");
    }
    // Probed before the first update and at the end.
    assert_eq!(metric(&whole, "ppo", "eval_accuracy").len(), 2);
    // The first rollouts come from the reference itself: every log-ratio is zero. Later ones have moved.
    let kl = metric(&whole, "ppo", "kl");
    assert!(kl[0].abs() < 1e-6 && kl[1..].iter().any(|k| *k > 1e-4), "{kl:?}");
    // The adaptive controller moved the coefficient.
    assert_ne!(metric(&whole, "ppo", "kl_coef")[3], 0.05);

    let split = tmp.path().join("split");
    let mut cfg = ppo_cfg(f, &split, RewardSpec::Model(f.reward.clone()), 4);
    cfg.stop_at = Some(2);
    assert!(ppo(&cfg).unwrap().interrupted);
    cfg.stop_at = None;
    cfg.resume = true;
    ppo(&cfg).unwrap();
    for key in ["reward", "kl", "value_loss", "kl_coef"] {
        assert_eq!(
            metric(&whole, "ppo", key),
            metric(&split, "ppo", key),
            "{key} after resume"
        );
    }
    // The critic is saved inside the actor's checkpoint; one at another step than its actor is refused.
    let critic_meta = split.join("checkpoint/critic/talaria.json");
    let mut meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&critic_meta).unwrap()).unwrap();
    assert_eq!(meta["step"], 4);
    meta["step"] = 2.into();
    std::fs::write(&critic_meta, meta.to_string()).unwrap();
    cfg.steps = 6;
    let e = format!("{:#}", ppo(&cfg).unwrap_err());
    assert!(e.contains("at step 4 but its critic at step 2"), "{e}");
}

/// `--kl-loss-coef`: the exact KL to the reference as a loss term is logged, and a strong one keeps
/// the policy measurably closer to its reference (the exact KL on held-out prompts) than none.
#[test]
fn the_exact_kl_loss_holds_the_policy_near_its_reference() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let mut last_kl = vec![];
    for coef in [0.0, 20.0] {
        let out = tmp.path().join(format!("kl{coef}"));
        let mut cfg = ppo_cfg(f, &out, RewardSpec::Model(f.reward.clone()), 4);
        cfg.kl_loss_coef = coef;
        cfg.kl_target = None;
        ppo(&cfg).unwrap();
        let logged = metric(&out, "ppo", "kl_loss");
        if coef > 0.0 {
            assert!(
                logged.len() == 4 && logged.iter().all(|k| k.is_finite() && *k >= 0.0),
                "{logged:?}"
            );
        } else {
            assert!(logged.is_empty(), "kl_loss logged with the term off: {logged:?}");
        }
        last_kl.push(*metric(&out, "ppo", "eval_kl").last().unwrap());
    }
    assert!(
        last_kl[1] < 0.5 * last_kl[0],
        "exact KL to the reference after 4 steps: {} without the term, {} with it",
        last_kl[0],
        last_kl[1]
    );
}

#[test]
fn ppo_with_the_verifier_and_clear_errors() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("v");
    ppo(&ppo_cfg(f, &run, RewardSpec::Verifier, 2)).unwrap();

    // The gold labeller drives while the reward model only watches; the exact KL starts at zero when the
    // reference is the starting policy, and above zero from a policy that has moved away from it.
    let gold = tmp.path().join("gold");
    let mut c = ppo_cfg(f, &gold, RewardSpec::Gold, 2);
    c.monitor = Some(f.reward.clone());
    ppo(&c).unwrap();
    assert!(metric(&gold, "ppo", "reward").iter().all(|x| x.is_finite()));
    let (rm, kl) = (metric(&gold, "ppo", "eval_rm"), metric(&gold, "ppo", "eval_kl"));
    assert_eq!((rm.len(), kl.len(), metric(&gold, "ppo", "eval_gold").len()), (2, 2, 2));
    assert!(kl[0].abs() < 1e-6 && kl[1] > 0.0, "{kl:?}");
    let moved = tmp.path().join("moved");
    let mut c = ppo_cfg(f, &moved, RewardSpec::Gold, 1);
    c.policy = run.clone();
    c.reference = Some(f.sft.clone());
    ppo(&c).unwrap();
    let kl = metric(&moved, "ppo", "eval_kl");
    assert!(kl[0] > 1e-4, "a moved policy is away from its reference: {kl:?}");

    // A reward model with another tokenizer.
    let other = tmp.path().join("other_rm");
    let tcfg = tokenizer::TrainConfig {
        vocab_size: 300,
        min_frequency: 2,
        show_progress: false,
    };
    let (tok, _) = tokenizer::train_bpe(
        &tcfg,
        ["a completely different corpus of text".to_string()]
            .into_iter()
            .map(Ok),
    )
    .unwrap();
    let mut cfg = GptConfig::preset("tiny").unwrap();
    cfg.vocab_size = tok.vocab_size();
    let mut w = init_weights(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    w.insert(
        "score.weight".into(),
        Tensor::zeros((1, cfg.n_embd), DType::F32, &Device::Cpu).unwrap(),
    );
    common::save_checkpoint(
        &other.join("checkpoint"),
        &cfg,
        &w,
        Some(&tok.to_json().unwrap()),
        "reward",
    );
    let e = format!(
        "{:#}",
        ppo(&ppo_cfg(f, &tmp.path().join("x"), RewardSpec::Model(other), 1)).unwrap_err()
    );
    assert!(e.contains("different tokenizer"), "{e}");

    // Verifier rewards need reference answers.
    let plain = tmp.path().join("plain.jsonl");
    std::fs::write(&plain, "\"Tell me a story.\"\n").unwrap();
    let mut c = ppo_cfg(f, &tmp.path().join("y"), RewardSpec::Verifier, 1);
    c.prompts = plain;
    assert!(format!("{:#}", ppo(&c).unwrap_err()).contains("need prompts with"));
    let mut c = ppo_cfg(f, &tmp.path().join("z"), RewardSpec::Verifier, 1);
    c.temperature = 0.0;
    assert!(format!("{:#}", ppo(&c).unwrap_err()).contains("--temperature must be positive"));
}

#[test]
fn dpo_learns_the_preferences() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("dpo");
    let mut tc = train_cfg(&run, 30, 1e-3);
    tc.eval_every = 15;
    dpo(&DpoConfig {
        policy: f.sft.clone(),
        data: vec![f.world.join("prefs_train.jsonl")],
        val_data: vec![f.world.join("prefs_val.jsonl")],
        val_fraction: 0.0,
        beta: 0.1,
        nll_coef: 0.0,
        batch_size: 8,
        train: tc,
    })
    .unwrap();
    let acc = metric(&run, "dpo", "accuracy");
    let margin = metric(&run, "dpo", "margin");
    let val = metric(&run, "dpo", "val_loss");
    assert_eq!(acc.len(), 2);
    // Before the first step the policy is its reference and every pair's loss is ln 2 = 0.693; the
    // tiny model learns the pairs that differ in form (padding, repetition), not all that differ in content,
    // and by the second evaluation it may already be fitting the training pairs more than the held-out ones.
    assert!(val.iter().all(|&v| v < 0.6), "held-out DPO loss {val:?}");
    assert!(acc[1] > 0.5, "held-out implicit-reward accuracy {acc:?}");
    assert!(margin[1] > 0.0, "{margin:?}");
    // Every parameter moved away from the reference (gradients reached them all).
    let a = talaria::checkpoint::Checkpoint::load(&run, DType::F32, &Device::Cpu).unwrap();
    let b = talaria::checkpoint::Checkpoint::load(&f.sft, DType::F32, &Device::Cpu).unwrap();
    let _: Gpt = a.model().unwrap();
    for (name, t) in &a.weights {
        assert!(max_abs_diff(t, &b.weights[name]) > 0.0, "{name} did not change");
    }
}

#[test]
fn the_labeller_ranks_the_policys_own_answers() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("label").join("rankings.jsonl");
    let cfg = LabelConfig {
        policy: f.sft.clone(),
        prompts: f.world.join("label_prompts.jsonl"),
        out: out.clone(),
        samples: 4,
        temperature: 1.0,
        max_new_tokens: 12,
        seed: 3,
        progress: false,
        dtype: talaria::model::WeightDtype::F32,
        device: Device::Cpu,
    };
    let s = label(&cfg).unwrap();
    let prompts = talaria::data::prompts::read_prompts(&f.world.join("label_prompts.jsonl")).unwrap();
    assert_eq!(s.prompts, prompts.len());
    assert_eq!(s.rankings + s.no_signal, s.prompts);
    assert!(s.rankings > 0 && (0.0..=1.0).contains(&s.sample_accuracy), "{s:?}");
    // The first answer is the greedy one: its content accuracy, as the gold labeller reads it, is what
    // evaluation measures on the same prompts.
    let model = talaria::checkpoint::Checkpoint::load(&f.sft, DType::F32, &Device::Cpu)
        .unwrap()
        .model()
        .unwrap();
    let template = ChatTemplate::new(&f.tok).unwrap();
    let convs: Vec<&[Message]> = prompts.iter().map(|p| p.messages.as_slice()).collect();
    let greedy = talaria::engine::chat_answers(&model, &f.tok, &template, &convs, 12).unwrap();
    let right = talaria::eval::behaviour::judgements(&prompts, &greedy)
        .iter()
        .filter(|j| j.content)
        .count();
    assert_eq!(s.greedy_accuracy, right as f64 / prompts.len() as f64, "{s:?}");
    // The file reads back as preference groups, and every ranking is strictly ordered by the labeller.
    let prefs = read_preferences(&out).unwrap();
    assert_eq!(prefs.groups.len(), s.rankings);
    assert_eq!(prefs.groups.iter().map(|g| g.pairs().len()).sum::<usize>(), s.pairs);
    let tasks = talaria::data::synth::verify::Task::load_jsonl(&f.world.join("label_prompts.jsonl")).unwrap();
    // Each ranking comes with the gold labeller's scores, strictly decreasing, and each score is the
    // judgement of its answer as text (ended, or cut off at the token limit).
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), prefs.groups.len());
    for (g, r) in prefs.groups.iter().zip(&records) {
        let t = tasks.iter().find(|t| t.messages == g.prompt).unwrap();
        let scores: Vec<f64> = r["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(scores.len(), g.ranked.len());
        assert!(scores.windows(2).all(|w| w[0] > w[1]), "{g:?} {scores:?}");
        for (a, s) in g.ranked.iter().zip(&scores) {
            let judged = |ended| talaria::data::synth::gold::judge(&t.messages, &t.answer, &t.skill, a, ended).score;
            // (JSON reads floats back to within an ulp or so.)
            let near = |x: f64| (x - s).abs() < 1e-9;
            assert!(
                near(judged(true)) || near(judged(false)),
                "{a:?} scored {s}, judged {} or {}",
                judged(true),
                judged(false)
            );
        }
    }
    // Same seed, same file.
    let again = tmp.path().join("again.jsonl");
    label(&LabelConfig {
        out: again.clone(),
        ..cfg.clone()
    })
    .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
    // Prompts without reference answers are a clear error.
    let e = format!(
        "{:#}",
        label(&LabelConfig {
            prompts: f.world.join("prefs_train.jsonl"),
            ..cfg.clone()
        })
        .unwrap_err()
    );
    assert!(e.contains("record 1 lacks a non-empty answer or a skill"), "{e}");
    let e = format!("{:#}", label(&LabelConfig { samples: 1, ..cfg }).unwrap_err());
    assert!(e.contains("--samples must be at least 2"), "{e}");
}

#[test]
fn long_prompts_lose_their_oldest_turns_before_a_pair_is_left_out() {
    let f = fixture();
    let template = ChatTemplate::new(&f.tok).unwrap();
    let prompt = vec![
        Message::new(Role::System, "Be brief."),
        Message::new(
            Role::User,
            "Tell me a long story about a garden and a river and a town.",
        ),
        Message::new(
            Role::Assistant,
            "Once upon a time there was a garden by a river near a small town.",
        ),
        Message::new(Role::User, "Reverse the word garden."),
    ];
    let answers = ["nedrag", "garden"];
    let full = render_answer(&f.tok, &template, &prompt, answers[0]).unwrap().len();
    let short = render_answer(&f.tok, &template, &[prompt[0].clone(), prompt[3].clone()], answers[0])
        .unwrap()
        .len();
    // Room for everything: the prompt is kept whole.
    let fit = fitting_prompt(&f.tok, &template, &prompt, &answers, full + 5)
        .unwrap()
        .unwrap();
    assert_eq!((fit.prompt.len(), fit.shortened), (4, false));
    // Room for the system message and the last question only: the first exchange goes.
    let fit = fitting_prompt(&f.tok, &template, &prompt, &answers, short + 1)
        .unwrap()
        .unwrap();
    assert!(fit.shortened);
    assert_eq!(fit.prompt, vec![prompt[0].clone(), prompt[3].clone()]);
    // The rendered answers come with it, ready to score.
    assert_eq!(fit.seqs.len(), answers.len());
    for (seq, a) in fit.seqs.iter().zip(answers) {
        assert_eq!(*seq, render_answer(&f.tok, &template, &fit.prompt, a).unwrap());
    }
    // Not even that fits: left out.
    assert!(
        fitting_prompt(&f.tok, &template, &prompt, &answers, short - 2)
            .unwrap()
            .is_none()
    );
}

#[test]
fn ppo_learns_to_end_its_answers_within_a_few_steps() {
    // The tiny SFT model rarely ends an answer within 10 tokens, and the gold labeller takes 4 points off
    // an answer that never ends: the one thing a few PPO steps can learn here.
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("learn");
    let mut c = ppo_cfg(f, &run, RewardSpec::Gold, 12);
    c.prompts_per_step = 8;
    c.samples_per_prompt = 4;
    c.minibatch = 32;
    c.prompt_baseline = true;
    c.lr = 5e-4;
    c.kl_target = None;
    c.eval_prompts = None;
    ppo(&c).unwrap();
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let (r, ended) = (metric(&run, "ppo", "reward"), metric(&run, "ppo", "ended"));
    let (first, last) = (mean(&r[..3]), mean(&r[9..]));
    eprintln!(
        "reward {first:.2} -> {last:.2}, answers ended {:.2} -> {:.2}",
        mean(&ended[..3]),
        mean(&ended[9..])
    );
    assert!(
        last > first + 0.7,
        "PPO did not learn: reward {first:.2} -> {last:.2} ({r:?})"
    );
    assert!(mean(&ended[9..]) > mean(&ended[..3]) + 0.2, "{ended:?}");
}

/// Mean LM loss of the checkpoint at `ckpt` on 16 validation windows of `data`.
fn lm_loss_on(ckpt: &Path, data: &Path) -> f64 {
    let c = talaria::checkpoint::Checkpoint::load(ckpt, DType::F32, &Device::Cpu).unwrap();
    let mut loader = TokenLoader::open(data, Split::Val, 32, 0).unwrap();
    let (x, y) = loader.next_batch(16, &Device::Cpu).unwrap();
    let loss = c.model().unwrap().lm_loss(&x, &y, None).unwrap();
    loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn ppo_ptx_keeps_the_language_model_that_plain_ppo_lets_drift() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let tok_file = tmp.path().join("tokenizer.json");
    std::fs::write(&tok_file, f.tok.to_json().unwrap()).unwrap();
    let data = tmp.path().join("data");
    prepare(&PrepareConfig::new(
        vec![f.world.join("pretrain.txt")],
        tok_file,
        data.clone(),
    ))
    .unwrap();
    let run = |name: &str, ptx: f64| {
        let out = tmp.path().join(name);
        let mut cfg = ppo_cfg(f, &out, RewardSpec::Model(f.reward.clone()), 4);
        cfg.lr = 1e-3;
        if ptx > 0.0 {
            (cfg.ptx_data, cfg.ptx_coef, cfg.ptx_seq_len) = (Some(data.clone()), ptx, 32);
        }
        ppo(&cfg).unwrap();
        out
    };
    let (plain, ptx) = (run("plain", 0.0), run("ptx", 1.0));
    let logged = metric(&ptx, "ppo", "ptx_loss");
    assert_eq!(logged.len(), 4);
    assert!(logged.iter().all(|l| l.is_finite() && *l > 0.0), "{logged:?}");
    assert!(metric(&plain, "ppo", "ptx_loss").is_empty());
    let (before, after_plain, after_ptx) = (
        lm_loss_on(&f.sft, &data),
        lm_loss_on(&plain.join("checkpoint"), &data),
        lm_loss_on(&ptx.join("checkpoint"), &data),
    );
    println!("LM loss on held-out pretraining text: SFT {before:.4}, PPO {after_plain:.4}, PPO-ptx {after_ptx:.4}");
    assert!(
        after_plain > before,
        "plain PPO left the LM loss at {after_plain} (SFT {before})"
    );
    assert!(
        after_ptx < before && after_ptx < after_plain,
        "{before} {after_plain} {after_ptx}"
    );
}
