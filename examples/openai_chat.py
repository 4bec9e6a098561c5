"""Talk to sglctl with the official OpenAI client, streamed and not.

Start sglctl first (simulated workers when there is no GPU):

    sglctl up --dp-size 2

then run:

    python examples/openai_chat.py [--base-url http://127.0.0.1:30000/v1]
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:30000/v1")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    # sglctl (like SGLang) ignores the API key on inference paths; the client insists on one.
    client = OpenAI(base_url=args.base_url, api_key="none")
    model = client.models.list().data[0].id
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Explain prefix caching in one sentence."},
    ]

    reply = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens
    )
    usage = reply.usage
    cached = (
        usage.prompt_tokens_details.cached_tokens if usage and usage.prompt_tokens_details else 0
    )
    print(f"[{model}] {reply.choices[0].message.content!r}")
    print(f"  prompt {usage.prompt_tokens if usage else '?'} tokens, {cached} of them cached")

    print("streamed: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
