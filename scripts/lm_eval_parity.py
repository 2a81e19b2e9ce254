#!/usr/bin/env python3
"""lm-evaluation-harness against `talaria serve` and against `transformers` on the same checkpoint.

Builds an MMLU-format multiple-choice task from ../shared/data/eval/mmlu_test.jsonl (local files only:
no Hub), keeping questions whose zero-shot prompt and answers fit the model's context without
truncation, and runs it twice: `--model local-completions` against `talaria serve` (token-id prompts,
`echo` and `logprobs` on /v1/completions) and `--model hf` on `talaria export hf` of the checkpoint.
The accuracies must be equal and every per-answer log-likelihood must agree within 1e-4. Then a
generation task runs through `--model local-chat-completions` and must complete.

Usage: python3 scripts/lm_eval_parity.py CHECKPOINT [--limit 20] [--work DIR] [--data DIR] [--talaria BIN]
Needs `pip install lm-eval torch transformers`.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

TOLERANCE = 1e-4


def run(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        sys.stdout.write(out.stdout[-4000:])
        sys.stderr.write(out.stderr[-8000:])
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}")
    return out


def build_tasks(work, data, hf_dir, limit):
    """Writes the two task YAMLs and their data, returns the include path."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    context = json.load(open(os.path.join(hf_dir, "config.json")))["n_positions"]
    letters = ["A", "B", "C", "D"]

    def prompt(d):
        lines = [d["question"].strip()] + [f"{l}. {c}" for l, c in zip(letters, d["choices"])]
        return "\n".join(lines) + "\nAnswer:"

    kept = []
    with open(os.path.join(data, "eval", "mmlu_test.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            if len(d["choices"]) != 4:
                continue
            # The longest scored sequence: the prompt, a space and a letter, plus the generated token.
            if len(tok(prompt(d) + " A")["input_ids"]) + 2 <= context:
                kept.append(d)
            if len(kept) == limit:
                break
    if len(kept) < limit:
        raise SystemExit(f"only {len(kept)} questions fit a context of {context} tokens")
    tasks = os.path.join(work, "tasks")
    os.makedirs(tasks, exist_ok=True)
    path = os.path.join(tasks, "mmlu_fit.jsonl")
    with open(path, "w") as f:
        for d in kept:
            f.write(json.dumps(d) + "\n")
    text = (
        "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
    )
    with open(os.path.join(tasks, "talaria_mmlu.yaml"), "w") as f:
        f.write(
            "task: talaria_mmlu\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(path)}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            f"doc_to_text: {json.dumps(text)}\n"
            'doc_to_choice: ["A", "B", "C", "D"]\n'
            "doc_to_target: answer\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        )
    with open(os.path.join(tasks, "talaria_gen.yaml"), "w") as f:
        f.write(
            "task: talaria_gen\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(path)}\n"
            "test_split: test\n"
            "output_type: generate_until\n"
            'doc_to_text: "{{question.strip()}}"\n'
            'doc_to_target: "{{choices[answer]}}"\n'
            'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 16\n'
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        )
    return tasks, context


def samples(out_dir, task):
    files = glob.glob(os.path.join(out_dir, "**", f"samples_{task}_*.jsonl"), recursive=True)
    if len(files) != 1:
        raise SystemExit(f"expected one samples file for {task} under {out_dir}, found {files}")
    return {s["doc_id"]: s for s in map(json.loads, open(files[0]))}


def accuracy(out_dir):
    files = glob.glob(os.path.join(out_dir, "**", "results_*.json"), recursive=True)
    return json.load(open(files[0]))["results"]["talaria_mmlu"]["acc,none"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--work")
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    ap.add_argument("--talaria", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "talaria"))
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="talaria-lm-eval-")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    hf_dir = os.path.join(work, "hf")
    run([args.talaria, "export", "hf", args.checkpoint, "--out", hf_dir])
    tasks, context = build_tasks(work, args.data, hf_dir, args.limit)
    lm_eval = [sys.executable, "-m", "lm_eval", "--include_path", tasks, "--log_samples", "--seed", "0"]

    server = subprocess.Popen(
        [args.talaria, "serve", args.checkpoint, "--port", "0", "--db", os.path.join(work, "feedback.sqlite")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()
        if not line.startswith("listening on "):
            raise SystemExit(f"talaria serve did not start: {line!r}")
        url = line.split()[2]
        # 1. Log-likelihoods through the server: token ids, echo, logprobs.
        api_out = os.path.join(work, "out_api")
        run(
            lm_eval
            + [
                "--model", "local-completions", "--tasks", "talaria_mmlu", "--output_path", api_out,
                "--model_args",
                f"model=talaria,base_url={url}/v1/completions,tokenizer={hf_dir},tokenizer_backend=huggingface,"
                f"tokenized_requests=True,max_length={context},num_concurrent=1,max_retries=1",
                "--batch_size", "4",
            ],
            env=env,
        )
        # 2. A generation task through the chat route.
        gen_out = os.path.join(work, "out_chat")
        run(
            lm_eval
            + [
                "--model", "local-chat-completions", "--tasks", "talaria_gen", "--apply_chat_template",
                "--limit", "3", "--output_path", gen_out,
                "--model_args", f"model=talaria,base_url={url}/v1/chat/completions,num_concurrent=1,max_retries=1",
            ],
            env=env,
        )
    finally:
        server.terminate()
        server.wait()
    # 3. The same task in transformers.
    hf_out = os.path.join(work, "out_hf")
    run(
        lm_eval
        + [
            "--model", "hf", "--tasks", "talaria_mmlu", "--output_path", hf_out, "--device", "cpu",
            "--model_args", f"pretrained={hf_dir},dtype=float32", "--batch_size", "4",
        ],
        env=env,
    )

    api, hf = samples(api_out, "talaria_mmlu"), samples(hf_out, "talaria_mmlu")
    if sorted(api) != sorted(hf):
        raise SystemExit(f"different questions: {sorted(api)} vs {sorted(hf)}")
    worst, n = 0.0, 0
    for doc, a in api.items():
        for ra, rh in zip(a["resps"], hf[doc]["resps"]):
            worst = max(worst, abs(float(ra[0][0]) - float(rh[0][0])))
            n += 1
    acc_api, acc_hf = accuracy(api_out), accuracy(hf_out)
    generated = samples(gen_out, "talaria_gen")
    print(
        f"{len(api)} questions, {n} answers: accuracy {acc_api:.4f} (talaria serve) vs {acc_hf:.4f} (transformers); "
        f"largest |log-likelihood difference| {worst:.2e}; chat generation answered {len(generated)} prompts"
    )
    ok = acc_api == acc_hf and worst <= TOLERANCE and len(generated) == 3
    if not all(isinstance(s["resps"][0][0], str) for s in generated.values()):
        ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
