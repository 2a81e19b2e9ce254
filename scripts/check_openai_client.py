#!/usr/bin/env python3
"""Checks a running `talaria serve` with the official `openai` Python client, streaming and not,
log-probabilities included.

Usage: python3 scripts/check_openai_client.py http://127.0.0.1:8080/v1
Skips (exit 0, printing why) when the `openai` package is not installed: pip install openai
"""

import sys

try:
    import openai
except ImportError:
    print("SKIPPED: the openai Python package is not installed (pip install openai)")
    sys.exit(0)


def main(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Hello from the openai client!"}]

    whole = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=24, seed=3
    )
    text = whole.choices[0].message.content
    assert whole.object == "chat.completion", whole
    assert whole.usage.completion_tokens >= 1, whole.usage

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=24,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
    assert "".join(pieces) == text, ("".join(pieces), text)
    assert usage is not None and usage.total_tokens == whole.usage.total_tokens, usage

    completion = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == completion.choices[0].text, (streamed, completion.choices[0].text)

    # Log-probabilities through the client's own types, on both routes.
    scored = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=8, logprobs=True, top_logprobs=2
    )
    content = scored.choices[0].logprobs.content
    assert len(content) == scored.usage.completion_tokens, content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content), content
    assert bytes(b for t in content for b in t.bytes).decode("utf-8", "replace") == scored.choices[0].message.content

    echoed = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    lp = echoed.choices[0].logprobs
    assert echoed.choices[0].text == "Once upon a time", echoed
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:]), lp
    assert len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset), lp

    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=-5)
        raise AssertionError("a negative max_tokens was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == "max_tokens", e.body

    print(f"openai client: ok (openai {openai.__version__}, model {model}, {len(pieces)} streamed chunks)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/v1")
