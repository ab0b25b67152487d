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
    parser.add_argument("--tools-model", action="append", default=[],
                        help="a model that calls tools (the test upstream's `tools`, the Anthropic and Gemini fakes); repeatable")
    parser.add_argument("--json-model", help="a model answering structured output (the test upstream's `json`)")
    parser.add_argument("--limited-model", help="a model whose provider answers 429 (the test upstream's `limited`)")
    parser.add_argument("--embedding-model", help="an embedding model (the test upstream's `embed`)")
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

    two = client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "Say hello"}], n=2)
    seen["n2"] = [c.message.content for c in two.choices]
    by_index, finishes, usage = {}, {}, None
    for chunk in client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "Say hello"}],
                                                n=2, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        if chunk.usage:
            usage = chunk.usage.total_tokens
    seen["n2_stream"] = {"content": [by_index.get(i) for i in range(2)], "finish": [finishes.get(i) for i in range(2)],
                         "total_tokens": usage}

    # `models.retrieve` with a key holding a slash, and a bare model name.
    seen["retrieve"] = client.models.retrieve(args.model).id
    bare = args.model.split("/", 1)[1]
    seen["bare"] = client.chat.completions.create(model=bare, messages=[{"role": "user", "content": "hi"}]).model

    # OpenAI's error shape: the SDK's exception classes, type, param and code.
    try:
        client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "x"}], top_logprobs=2)
        seen["logprobs_alone"] = "no error"
    except openai.BadRequestError as e:
        seen["logprobs_alone"] = {"status": e.status_code, "type": e.type, "param": e.param, "code": e.code}
    lp = client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=2)
    streamed_lp = []
    for chunk in client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "x"}],
                                                logprobs=True, top_logprobs=2, stream=True):
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                streamed_lp.extend((t.token, t.logprob, len(t.top_logprobs)) for t in choice.logprobs.content)
    seen["logprobs"] = {
        "whole": [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in lp.choices[0].logprobs.content],
        "streamed": streamed_lp,
    }

    # A tool round trip (call -> tool result -> final answer), whole and streamed.
    seen["tool_round_trip"] = {}
    for tools_model in args.tools_model:
        tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                  "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}]
        ask = [{"role": "user", "content": "What's the weather in Paris?"}]
        first = client.chat.completions.create(model=tools_model, messages=ask, tools=tools, tool_choice="auto")
        call = first.choices[0].message.tool_calls[0]
        follow = ask + [first.choices[0].message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id, "content": "22 C"}]
        final = client.chat.completions.create(model=tools_model, messages=follow, tools=tools)
        calls, finish = {}, None
        for chunk in client.chat.completions.create(model=tools_model, messages=ask, tools=tools, stream=True):
            for choice in chunk.choices:
                for d in choice.delta.tool_calls or []:
                    c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                    if d.id:
                        c["id"] = d.id
                    if d.function and d.function.name:
                        c["name"] += d.function.name
                    if d.function and d.function.arguments:
                        c["arguments"] += d.function.arguments
                if choice.finish_reason:
                    finish = choice.finish_reason
        seen["tool_round_trip"][tools_model] = {
            "finish_reason": first.choices[0].finish_reason,
            "call": {"id": call.id, "name": call.function.name, "arguments": json.loads(call.function.arguments)},
            "final": final.choices[0].message.content,
            "streamed": {"calls": list(calls.values()), "finish_reason": finish},
        }
    try:
        client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "x"}], temperature=9)
        seen["temperature"] = "no error"
    except openai.BadRequestError as e:
        seen["temperature"] = {"status": e.status_code, "type": e.type, "param": e.param, "code": e.code}
    try:
        client.chat.completions.create(model=args.missing_model, messages=[{"role": "user", "content": "x"}])
    except openai.NotFoundError as e:
        seen["missing_type"] = {"type": e.type, "code": e.code}
    if args.limited_model:
        try:
            client.chat.completions.create(model=args.limited_model, messages=[{"role": "user", "content": "x"}])
            seen["rate_limited"] = "no error"
        except openai.RateLimitError as e:
            seen["rate_limited"] = {"status": e.status_code, "type": e.type, "code": e.code,
                                    "retry_after": e.response.headers.get("retry-after")}

    # Structured output through the SDK's parse helper (a pydantic model
    # becomes a strict json_schema response_format).
    if args.json_model:
        import pydantic

        class Idea(pydantic.BaseModel):
            title: str
            year: int

        parsed = client.chat.completions.parse(model=args.json_model, messages=[{"role": "user", "content": "An idea"}], response_format=Idea)
        seen["parsed"] = parsed.choices[0].message.parsed.model_dump()
        try:
            client.chat.completions.parse(model=args.json_model, messages=[{"role": "user", "content": "break it"}], response_format=Idea)
            seen["broken_schema"] = "no error"
        except openai.APIStatusError as e:
            seen["broken_schema"] = {"status": e.status_code, "code": e.code, "param": e.param}

    # Embeddings: the SDK asks for base64 and decodes it itself.
    if args.embedding_model:
        e = client.embeddings.create(model=args.embedding_model, input=["Muse", "ideas"], dimensions=3)
        seen["embeddings"] = {"vectors": [d.embedding for d in e.data], "tokens": e.usage.prompt_tokens}

    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
