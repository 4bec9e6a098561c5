"""Talk to sglctl with the official OpenAI client, streamed and not.

From a fresh clone (no need to activate the venv), start sglctl first (simulated workers when
there is no GPU):

    python3 -m venv .venv && .venv/bin/pip install -e . openai
    .venv/bin/sglctl up --dp-size 2

then, in another terminal:

    .venv/bin/python examples/openai_chat.py [--base-url http://127.0.0.1:30000/v1]

(``openai`` is not a dependency of sglctl; the ``test`` extra includes it.)
"""

from __future__ import annotations

import argparse
import sys

try:
    from openai import OpenAI
except ImportError:
    sys.exit(
        "error: this example needs the OpenAI client, which sglctl does not install.\n"
        f"Install it for this Python ({sys.executable}):\n"
        f"    {sys.executable} -m pip install openai\n"
        "(from a clone: .venv/bin/pip install openai, then run .venv/bin/python "
        "examples/openai_chat.py)"
    )


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
