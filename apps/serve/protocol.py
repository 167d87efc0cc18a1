"""The OpenAI wire format: a /v1/completions or /v1/chat/completions body -> one Request (through the
runtime's one option parser and text path), OpenAI-shaped errors, and the response objects."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace

from starlette.responses import JSONResponse

from dllm.models.config import CheckpointError
from dllm.runtime import Bucket, DecodeStructure, Engine, Generation, Request, RequestError
from dllm.runtime.options import policy_option_names, request_options
from dllm.runtime.request import OPTION_FIELDS
from dllm.runtime.text import Text

# OpenAI fields this server accepts only at their default (it has one sequence, no logprobs, no penalties)
INERT_FIELDS = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None, False, 0),
                "top_logprobs": (None, 0), "presence_penalty": (0,), "frequency_penalty": (0,),
                "logit_bias": (None, {}), "suffix": (None, ""), "parallel_tool_calls": (None,),
                "tools": (None, []), "tool_choice": (None, "none"), "response_format": (None, {"type": "text"})}
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier")
OPENAI_FIELDS = ("model", "max_tokens", "stream", "stream_options")
# Request fields a body may set (OpenAI's max_tokens is gen_length; the prompt comes from prompt/messages)
BODY_OPTIONS = tuple(f.name for f in OPTION_FIELDS if f.name not in ("gen_length", "chat", "text_tokens"))


# ---------------------------------------------------------------- errors

@dataclass
class ApiError(Exception):
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}} with an HTTP status."""
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = "invalid_request_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def refused(e: RequestError | CheckpointError, length_field: str = "max_tokens") -> ApiError:
    """A runtime refusal as a 400 naming the field the client sent (gen_length is its max_tokens)."""
    name, message = getattr(e, "param", None), str(e)
    if name == "gen_length":
        name, message = length_field, message.replace("gen_length", length_field)
    return bad(message, name)


# ---------------------------------------------------------------- request parsing

@dataclass(frozen=True)
class ServeOptions:
    """What the server was started with; requests default to it."""
    model_name: str
    request: Request                              # the defaults: the server's flags, over the model's defaults
    buckets: tuple[Bucket, ...] = ()
    queue: int = 32
    drain_seconds: float = 30.0
    max_batch: int = 1
    api_key: str | None = None
    max_tokens_limit: float = float("inf")  # the most max_tokens a request may ask for
    request_timeout: float = 600.0         # seconds from arrival after which a request is stopped (504)
    max_body_bytes: int = 1 << 20          # larger request bodies are refused (413) before they are parsed
    lockstep: object | None = None         # tensor parallel: the apps.serve.lockstep.Lockstep to the other ranks


@dataclass(frozen=True)
class ServeRequest:
    """One validated request: what the engine runs and how the reply is shaped."""
    chat: bool
    prompt_ids: list[int]
    request: Request
    structure: DecodeStructure
    stream: bool = False
    include_usage: bool = False


def _inert(value, allowed: tuple) -> bool:
    """value is one of the allowed defaults, of the same type (True is not 1)."""
    return any(type(value) is type(a) and value == a for a in allowed)


def _check_fields(body: dict, allowed: set[str]) -> None:
    for key, value in body.items():
        if key in INERT_FIELDS:
            if not _inert(value, INERT_FIELDS[key]):
                raise bad(f"{key}={value!r} is not supported by this server (it runs one sequence without "
                          f"logprobs, penalties or tools); leave it out", key, "unsupported_parameter")
        elif key not in allowed and key not in IGNORED_FIELDS:
            raise bad(f"unrecognized request argument {key!r}", key, "unknown_parameter")


def parse_request(body, *, chat: bool, opts: ServeOptions, engine: Engine) -> ServeRequest:
    """Validate a /v1/completions or /v1/chat/completions body (ApiError with the field at fault): everything
    the engine would refuse is refused here, before the request is queued."""
    text = engine.text
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}    # null means the default (as OpenAI's API)
    main = {"messages", "max_completion_tokens"} if chat else {"prompt"}
    _check_fields(body, main | set(OPENAI_FIELDS) | set(BODY_OPTIONS) | set(policy_option_names()))
    model = body.get("model", opts.model_name)
    if model != opts.model_name:
        raise ApiError(404, f"model {model!r} is not served here; this server serves {opts.model_name!r}",
                       "model", "model_not_found")
    ids = chat_ids(text, body.get("messages")) if chat else prompt_ids(text, body.get("prompt"))

    options = {k: v for k, v in body.items() if k in BODY_OPTIONS or k in policy_option_names()}
    if options.get("top_p") == 1:                  # top_p 1 keeps the whole distribution: no filter
        del options["top_p"]
    length = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    if length in body:
        options["gen_length"] = body[length]
    try:
        given = request_options(options, text=False, base_policy=opts.request.policy)
        lengths = ("gen_length", "steps", "block_length")
        request = replace(opts.request, prompt=[ids], **{k: v for k, v in given.items() if k not in lengths})
        request = _shaped(request, given, opts, engine)
        structure = request.check(text.cfg).structure
    except RequestError as e:
        raise refused(e, length) from None
    asked = request.text_tokens or request.gen_length          # steps <= G: G bounds the work
    if asked > opts.max_tokens_limit:
        raise bad(f"{length} {asked} is over this server's limit of {opts.max_tokens_limit:g}; ask for fewer, or "
                  f"start dllm serve with --max-tokens-limit {asked}", length, "over_limit")
    try:
        engine.check(request)
    except RequestError as e:
        if e.param == "gen_length":               # the shape: no bucket has it, none is prepared on demand
            raise bad(_no_bucket(request, opts, len(ids)), length, "no_bucket") from None
        raise refused(e, length) from None


    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad(f"stream must be true or false, got {stream!r}", "stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool):
        raise bad("stream_options must be an object like {\"include_usage\": true}", "stream_options")
    return ServeRequest(chat, ids, request, structure, stream, bool(so.get("include_usage", False)))


def _shaped(request: Request, given: dict, opts: ServeOptions, engine: Engine) -> Request:
    """The request's lengths: OpenAI's max_tokens is G. Steps and block default to those of the first
    bucket with that G, else to the server's for its own G, else G steps of one block. A max_tokens that
    no bucket has runs in the smallest bucket longer than it, its text cut at max_tokens (finish_reason
    "length"), unless new shapes are prepared on demand."""
    base = opts.request
    G = replace(request, gen_length=given.get("gen_length", base.gen_length), steps=None,   # validated
                block_length=None).gen_length
    exact = [b for b in opts.buckets if b.gen_length == G]
    longer = sorted((b for b in opts.buckets if b.gen_length > G), key=lambda b: b.gen_length)
    if not exact and longer and engine.prepare_on_demand != "shapes" and not ({"steps", "block_length"} & set(given)):
        b = longer[0]
        return replace(request, gen_length=b.gen_length, steps=b.steps, block_length=b.block, text_tokens=G)
    like = exact[0] if exact else None
    steps = given.get("steps", like.steps if like else base.steps if G == base.gen_length else G)
    block = given.get("block_length", like.block if like else base.block_length if G == base.gen_length else G)
    return replace(request, gen_length=G, steps=steps, block_length=block)


def _no_bucket(r: Request, opts: ServeOptions, prompt_tokens: int) -> str:
    have = "; ".join(f"{b.prompt}:{b.gen_length}:{b.steps}:{b.block}" for b in opts.buckets) or "none"
    P = max([prompt_tokens] + [b.prompt for b in opts.buckets])
    return (f"no bucket this server prepared fits max_tokens {r.gen_length} with steps {r.steps}, block "
            f"{r.block_length} and a {prompt_tokens}-token prompt (buckets P:G:STEPS:BLOCK: {have}); start "
            f"dllm serve with --bucket {P}:{r.gen_length}:{r.steps}:{r.block_length} for it, or with "
            f"--prepare-on-demand shapes")


def prompt_ids(text: Text, prompt) -> list[int]:
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt must be one non-empty string (this server runs one sequence per request)", "prompt")
    try:
        return text.prompt_ids(prompt)[0]
    except (RequestError, CheckpointError) as e:
        raise bad(str(e), "prompt") from None


def chat_ids(text: Text, messages) -> list[int]:
    """The conversation through the folder's chat template (the text path's encode_chat)."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    convo = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string role", "messages")
        content = m.get("content")
        if isinstance(content, list):            # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string", "messages")
        convo.append({"role": m["role"], "content": content})
    try:
        ids = text.encode_chat(convo)
        text.prompt_ids([ids])                   # the ids against the vocabulary and the mask id
    except (RequestError, CheckpointError) as e:
        raise bad(str(e).replace("drop --chat", "use /v1/completions"), "messages") from None
    if not ids:
        raise bad("the chat template produced an empty prompt", "messages")
    return ids


# ---------------------------------------------------------------- responses

def final_prefix(row: list[int], mask_id: int, block: int) -> int:
    """How many leading positions of a response canvas are final: whole blocks, from the first, with no
    position still masked."""
    n = 0
    while n < len(row) and mask_id not in row[n:n + block]:
        n += block
    return min(n, len(row))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Reply:
    """Builds the OpenAI objects of one request (completion or chat, whole or chunked)."""
    chat: bool
    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, obj: str) -> dict:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, gen: Generation, use: dict) -> dict:
        text, finish = gen.text[0], gen.finish_reasons[0]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": use, "dllm": {"steps": gen.steps, "step_kinds": gen.step_kinds, "seconds": gen.seconds,
                                       "tokens_per_second": gen.tokens_per_second}}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    def usage_chunk(self, use: dict) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": use}
