"""Drives Muse's OpenAI-compatible API with the official `openai` package,
as a user's script would. Used by the end-to-end tests
(tests/api/openai_api.rs); prints one JSON object with what it saw and
exits non-zero on any failure.

    python scripts/openai_sdk_check.py --base-url http://127.0.0.1:8000/v1 --api-key muse_sk_... --model up/ok
"""

import argparse
import json
import sys

import openai


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--missing-model", default="nope/nothing")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=30)
    seen = {"sdk_version": openai.__version__}

    seen["models"] = [m.id for m in client.models.list()]

    whole = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}],
        temperature=0.2,
        max_tokens=32,
    )
    seen["whole"] = {
        "content": whole.choices[0].message.content,
        "finish_reason": whole.choices[0].finish_reason,
        "total_tokens": whole.usage.total_tokens if whole.usage else None,
        "model": whole.model,
    }

    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
        if chunk.usage:
            usage = chunk.usage.total_tokens
    seen["stream"] = {"content": "".join(pieces), "chunks": len(pieces), "finish_reason": finish, "total_tokens": usage}

    try:
        client.chat.completions.create(model=args.missing_model, messages=[{"role": "user", "content": "x"}])
        seen["missing"] = "no error"
    except openai.NotFoundError as e:
        seen["missing"] = {"status": e.status_code, "code": (e.body or {}).get("code") if isinstance(e.body, dict) else None}

    try:
        openai.OpenAI(base_url=args.base_url, api_key="muse_sk_wrong", max_retries=0).models.list()
        seen["bad_key"] = "no error"
    except openai.AuthenticationError as e:
        seen["bad_key"] = {"status": e.status_code}

    # `models.retrieve` with a key holding a slash, and a bare model name.
    seen["retrieve"] = client.models.retrieve(args.model).id
    bare = args.model.split("/", 1)[1]
    seen["bare"] = client.chat.completions.create(model=bare, messages=[{"role": "user", "content": "hi"}]).model

    # OpenAI's error shape: the SDK's exception classes, type, param and code.
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
    try:
        client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "x"}], tools=tools)
        seen["tools"] = "no error"
    except openai.BadRequestError as e:
        seen["tools"] = {"status": e.status_code, "type": e.type, "param": e.param, "code": e.code}
    try:
        client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "x"}], temperature=9)
        seen["temperature"] = "no error"
    except openai.BadRequestError as e:
        seen["temperature"] = {"status": e.status_code, "type": e.type, "param": e.param, "code": e.code}
    try:
        client.chat.completions.create(model=args.missing_model, messages=[{"role": "user", "content": "x"}])
    except openai.NotFoundError as e:
        seen["missing_type"] = {"type": e.type, "code": e.code}

    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
