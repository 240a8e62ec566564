"""OpenAI-compatible routes: chat completions, completions, models, tokenize/detokenize.

A request with `n` choices (and, for completions, several prompts) fans out into one engine
request per choice; their output streams are merged into one response or SSE stream with a
per-choice `index`. Choice i of a seeded request uses seed + i, so each choice is
reproducible on its own (a request with seed s + i and n=1 gives choice i's text).
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from pathlib import Path

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from leanserve.server.cancellation import with_cancellation
from leanserve.server.engine.outputs import RequestOutput, TokenLogprob
from leanserve.server.engine.sampling_params import SamplingParams
from leanserve.server.engine.validation import check_token_ids, validate_request
from leanserve.server.errors import APIError
from leanserve.server.json_body import JSONBodyRoute
from leanserve.server.metrics import RequestMetrics
from leanserve.server.offload import off_loop
from leanserve.server.openapi import error_responses
from leanserve.server.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from leanserve.server.routes import server_state
from leanserve.server.streaming import (
    SSE_DONE,
    SSE_HEADERS,
    merge_streams,
    sse_error,
    sse_event,
)

logger = logging.getLogger(__name__)
router = APIRouter(route_class=JSONBodyRoute)

MIN_LOGPROB = -9999.0  # -inf is not JSON; vLLM clamps the same way
# 200 is a JSON body, or an SSE stream with "stream": true
STREAMED = {"content": {"text/event-stream": {"schema": {"type": "string"}}}}


# ---------------------------------------------------------------- models

def _model_card(state, name: str, engine) -> ModelCard:
    return ModelCard(id=name, created=state.created, kind=state.kinds[name],
                     max_model_len=engine.max_model_len if state.kinds[name] == "llm" else None)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request):
    state = server_state(request)
    return ModelList(data=[_model_card(state, name, e) for name, e in state.engines.items()])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=error_responses(404))
async def get_model(model_id: str, request: Request):
    state = server_state(request)
    if model_id not in state.engines:
        raise APIError(404, f"The model `{model_id}` does not exist.", "model")
    return _model_card(state, model_id, state.engines[model_id])


# ---------------------------------------------------------------- prompts and sampling params

def _check_input_size(state, engine, size: int, param: str, unit: str = "characters") -> None:
    """Refuse input larger than the server's bound before any tokenizing: the tokenizer's time
    grows with the text, and a prompt many times the context could never run anyway."""
    limit = state.settings.input_chars_limit(engine.max_model_len)
    if size > limit:
        raise APIError(400, f"{param} has {size} {unit}; this server accepts at most {limit} per request "
                            f"(--max-input-chars)", param)


def _messages_chars(messages: list[ChatMessage]) -> int:
    return sum(len(m.text()) for m in messages)


def _render_chat(engine, messages: list[ChatMessage], add_generation_prompt: bool = True,
                 template_kwargs: dict | None = None, add_special_tokens: bool = False) -> list[int]:
    tok = engine.tokenizer
    if not tok.chat_template:
        raise APIError(400, f"The model `{engine.model_name}` has no chat template; use /v1/completions.",
                       "messages")
    conversation = [m.template_dict() for m in messages]
    # template variables only: a per-request `chat_template` (or tokenize=...) must not slip through
    reserved = sorted(set(template_kwargs or ()) & set(inspect.signature(tok.apply_chat_template).parameters))
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")
    try:
        text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       **(template_kwargs or {}))
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        raise APIError(400, f"The chat template could not render these messages: {e}", "messages") from e
    # the template already wrote BOS; the tokenizer must not add another one
    return tok(text, add_special_tokens=add_special_tokens)["input_ids"]


@functools.cache
def _generation_defaults(model_dir: str) -> dict:
    """Sampling defaults the model ships in generation_config.json (vLLM reads the same keys)."""
    path = Path(model_dir) / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    return {k: config[k] for k in keys if config.get(k) is not None}


def _sampling_params(body: SamplingRequest, engine, prompt_ids: list[int], max_tokens: int | None,
                     logprobs: int | None, prompt_param: str) -> SamplingParams:
    """The prompt's engine params, validated here once for all its choices (InvalidRequestError:
    a 400 naming the field at fault)."""
    # default: whatever context is left (at least one token, so an over-long prompt reports clearly)
    max_tokens = max_tokens if max_tokens is not None else max(engine.max_model_len - len(prompt_ids), 1)
    bias = None
    if body.logit_bias:
        bias = {}
        for key, value in body.logit_bias.items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise APIError(400, f"logit_bias: key {key!r} is not a token id", "logit_bias") from None
    stop_token_ids = body.stop_token_ids or []
    defaults = _generation_defaults(engine.config.model)

    def pick(name: str, fallback):
        value = getattr(body, name)
        return value if value is not None else defaults.get(name, fallback)

    try:
        params = SamplingParams(
            temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0), top_k=pick("top_k", -1),
            min_p=pick("min_p", 0.0), seed=body.seed, presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0, repetition_penalty=pick("repetition_penalty", 1.0),
            max_tokens=max_tokens, min_tokens=body.min_tokens, stop=body.stop_list(),
            stop_token_ids=stop_token_ids, ignore_eos=body.ignore_eos, logprobs=logprobs, logit_bias=bias,
            skip_special_tokens=body.skip_special_tokens)
    except ValueError as e:
        raise APIError(400, str(e)) from e
    validate_request(prompt_ids, params, engine.vocab_size, engine.max_model_len, prompt_param)
    return params


# ---------------------------------------------------------------- fan-out, generation, cancellation

@dataclass(slots=True)
class _Choice:
    """One engine request behind one output choice."""
    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics  # shared by the n choices of one prompt
    slot: int             # this choice's place among them
    counts_prompt: bool   # the first choice of its prompt: usage counts the prompt once
    prefix: str = ""      # echoed prompt text, emitted before the first token
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    started: bool = False  # streaming: role chunk / echo already sent
    text_offset: int = 0   # completions logprobs: characters emitted so far


def _request_ids(prefix: str, request: Request, client_id: str | None) -> tuple[str, str]:
    """(response id, engine request-id prefix). A client's id (X-Request-Id, else the body's
    request_id) names the response as in vLLM; the engine key always adds a fresh uuid, so two
    requests with the same client id never collide."""
    unique = uuid.uuid4().hex
    client_id = request.headers.get("x-request-id") or client_id
    if client_id:
        response_id = f"{prefix}-{client_id}"
        return response_id, f"{response_id}-{unique}"
    response_id = f"{prefix}-{unique}"
    return response_id, response_id


def _fan_out(state, engine, engine_id: str, prompts: list[list[int]], params: list[SamplingParams],
             arrival: float, n: int, prefixes: list[str] | None = None) -> list[_Choice]:
    """One engine request per choice; the n choices of a prompt share one RequestMetrics (vLLM
    counts a request, its prompt and its success once, whatever n)."""
    if len(prompts) * n > engine.config.max_queued_requests:
        raise APIError(400, f"This request needs {len(prompts) * n} engine requests ({len(prompts)} prompts x "
                            f"n={n}), more than the server ever queues at once "
                            f"({engine.config.max_queued_requests}); split it", "n" if n > 1 else "prompt")
    mm = state.metrics.models[engine.model_name]
    choices = []
    for p, (ids, sp) in enumerate(zip(prompts, params)):
        mm.observe_params(n, sp.max_tokens)
        metrics = mm.track(arrival, n)
        for i in range(n):
            index = p * n + i
            choices.append(_Choice(
                index=index, request_id=f"{engine_id}-{index}", prompt_ids=ids,
                params=sp if sp.seed is None or i == 0 else replace(sp, seed=sp.seed + i),
                metrics=metrics, slot=i, counts_prompt=i == 0, prefix=prefixes[p] if prefixes else "",
                text_offset=len(prefixes[p]) if prefixes else 0))
    return choices


async def _start(engine, choices: list[_Choice], arrival: float) -> list[AsyncIterator[RequestOutput]]:
    """Admit every choice or none: a 429/400 for choice k aborts choices 0..k-1."""
    streams = []
    try:
        for c in choices:
            streams.append(engine.generate(c.request_id, c.prompt_ids, c.params, arrival_time=arrival,
                                           validated=True))  # by _sampling_params
    except BaseException as e:
        for stream in streams:
            await stream.aclose()
        if isinstance(e, ValueError):
            raise APIError(400, str(e)) from e
        raise
    return streams


async def _generate(choices: list[_Choice], streams) -> AsyncIterator[tuple[_Choice, RequestOutput]]:
    """Merged outputs of all choices, with per-choice state and metrics kept up to date."""
    try:
        async with aclosing(merge_streams(streams)) as merged:
            async for i, out in merged:
                c = choices[i]
                if out.logprobs and out.finished and out.finish_reason == "stop" and \
                        not isinstance(out.stop_reason, str):
                    # the stop token (EOS or a stop_token_id) leaves no text: no logprob either,
                    # so the logprob tokens join to the text
                    out = replace(out, logprobs=None)
                c.metrics.on_output(c.slot, out)
                c.num_output_tokens = out.num_output_tokens
                c.num_cached_tokens = out.num_cached_tokens
                if out.finished:
                    c.finish_reason = out.finish_reason
                    if out.finish_reason == "error":
                        raise APIError(500, out.error or "engine error")
                yield c, out
    finally:
        for c in choices:  # left early (client gone, error): the closed streams aborted them
            c.metrics.finish(c.slot, "abort")


def _usage(choices: list[_Choice]) -> dict:
    prompt = sum(len(c.prompt_ids) for c in choices if c.counts_prompt)
    completion = sum(c.num_output_tokens for c in choices)
    cached = sum(c.num_cached_tokens for c in choices if c.counts_prompt)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}



def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


async def _safe_events(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """After the 200 is sent, errors travel in the stream: an error event, then [DONE]."""
    try:
        async with aclosing(events) as it:
            async for event in it:
                yield event
    except APIError as e:
        yield sse_error(e.message, e.status)
    except Exception as e:  # noqa: BLE001 - reported to the client, logged here
        logger.exception("error while streaming")
        yield sse_error(f"Internal server error: {type(e).__name__}: {e}")
    yield SSE_DONE


def _clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


# ---------------------------------------------------------------- chat completions

def _chat_logprobs(items: list[TokenLogprob]) -> dict:
    return {"content": [
        {"token": t.token, "logprob": _clamp(t.logprob), "bytes": list(t.token.encode()),
         "top_logprobs": [{"token": s, "logprob": _clamp(lp), "bytes": list(s.encode())} for _, s, lp in t.top]}
        for t in items]}


@router.post("/v1/chat/completions",
             responses={200: {"model": ChatCompletionResponse, **STREAMED}, **error_responses(404, 429)})
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = server_state(request)
    arrival = request.state.arrival_time
    engine = state.engine(body.model, "llm")
    _check_input_size(state, engine, _messages_chars(body.messages), "messages")
    prompt_ids = await off_loop(_render_chat, engine, body.messages, body.add_generation_prompt,
                                body.chat_template_kwargs)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = _sampling_params(body, engine, prompt_ids, max_tokens, logprobs, "messages")
    request_id, engine_id = _request_ids("chatcmpl", request, body.request_id)
    choices = _fan_out(state, engine, engine_id, [prompt_ids], [params], arrival, body.n)
    streams = await _start(engine, choices, arrival)
    created = int(time.time())
    if body.stream:
        return _sse_response(_safe_events(_chat_stream(body, choices, streams, request_id, created)))
    return await with_cancellation(request, _chat_full(body, choices, streams, request_id, created))


async def _collect(choices, streams) -> None:
    """Run a non-streaming request to the end, gathering each choice's text and logprobs."""
    async with aclosing(_generate(choices, streams)) as outputs:
        async for c, out in outputs:
            c.text.append(out.new_text)
            if out.logprobs:
                c.logprobs += out.logprobs


async def _chat_full(body: ChatCompletionRequest, choices, streams, request_id: str, created: int) -> Response:
    await _collect(choices, streams)
    response = ChatCompletionResponse(
        id=request_id, created=created, model=body.model, usage=_usage(choices),
        choices=[ChatCompletionChoice(index=c.index, message=ChatResponseMessage(content="".join(c.text)),
                                      logprobs=_chat_logprobs(c.logprobs) if body.logprobs else None,
                                      finish_reason=c.finish_reason) for c in choices])
    return JSONResponse(response.model_dump())


async def _chat_stream(body: ChatCompletionRequest, choices, streams, request_id: str,
                       created: int) -> AsyncIterator[str]:
    options = body.stream_options
    include_usage = bool(options and options.include_usage)
    continuous = include_usage and bool(options.continuous_usage_stats)
    head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": body.model}

    def chunk(choice: dict) -> str:
        event = {**head, "choices": [choice]}
        if include_usage:
            event["usage"] = _usage(choices) if continuous else None
        return sse_event(event)

    async with aclosing(_generate(choices, streams)) as outputs:
        async for c, out in outputs:
            events = []
            if not c.started:  # the role chunk goes out with the first token, never earlier (TTFT)
                c.started = True
                events.append(chunk({"index": c.index, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}))
            # one event per engine step, even when the text delta is held back (ITL counts events)
            delta = {"content": out.new_text} if out.new_text or not out.finished else {}
            events.append(chunk({"index": c.index, "delta": delta,
                                 "logprobs": _chat_logprobs(out.logprobs) if out.logprobs else None,
                                 "finish_reason": out.finish_reason if out.finished else None}))
            yield "".join(events)
    if include_usage:
        yield sse_event({**head, "choices": [], "usage": _usage(choices)})


# ---------------------------------------------------------------- completions

def _completion_logprobs(items: list[TokenLogprob], c: _Choice) -> dict:
    offsets = []
    for t in items:
        offsets.append(c.text_offset)
        c.text_offset += len(t.token)
    return {"tokens": [t.token for t in items], "token_logprobs": [_clamp(t.logprob) for t in items],
            "top_logprobs": [{s: _clamp(lp) for _, s, lp in t.top} for t in items], "text_offset": offsets}


@router.post("/v1/completions",
             responses={200: {"model": CompletionResponse, **STREAMED}, **error_responses(404, 429)})
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = server_state(request)
    arrival = request.state.arrival_time
    engine = state.engine(body.model, "llm")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo together with logprobs is not supported (no prompt logprobs)", "echo")
    _check_input_size(state, engine, sum(len(p) for p in body.prompts() if isinstance(p, str)), "prompt")
    prompts = await off_loop(lambda: [engine.tokenizer(p)["input_ids"] if isinstance(p, str) else p
                                      for p in body.prompts()])
    params = [_sampling_params(body, engine, ids, body.max_tokens, body.logprobs, "prompt") for ids in prompts]
    # after validation: decoding needs ids inside the vocabulary
    prefixes = await off_loop(lambda: [p if isinstance(p, str) else engine.tokenizer.decode(p)
                                       for p in body.prompts()]) if body.echo else None
    request_id, engine_id = _request_ids("cmpl", request, body.request_id)
    choices = _fan_out(state, engine, engine_id, prompts, params, arrival, body.n, prefixes)
    streams = await _start(engine, choices, arrival)
    created = int(time.time())
    if body.stream:
        return _sse_response(_safe_events(_completion_stream(body, choices, streams, request_id, created)))
    return await with_cancellation(request, _completion_full(body, choices, streams, request_id, created))


async def _completion_full(body: CompletionRequest, choices, streams, request_id: str, created: int) -> Response:
    await _collect(choices, streams)
    response = CompletionResponse(
        id=request_id, created=created, model=body.model, usage=_usage(choices),
        choices=[CompletionChoice(
            index=c.index, text=c.prefix + "".join(c.text), finish_reason=c.finish_reason,
            logprobs=CompletionLogprobs(**_completion_logprobs(c.logprobs, c)) if body.logprobs is not None else None)
            for c in choices])
    return JSONResponse(response.model_dump())


async def _completion_stream(body: CompletionRequest, choices, streams, request_id: str,
                             created: int) -> AsyncIterator[str]:
    options = body.stream_options
    include_usage = bool(options and options.include_usage)
    continuous = include_usage and bool(options.continuous_usage_stats)
    head = {"id": request_id, "object": "text_completion", "created": created, "model": body.model}
    async with aclosing(_generate(choices, streams)) as outputs:
        async for c, out in outputs:
            text = out.new_text
            if not c.started:
                c.started = True
                text = c.prefix + text
            event = {**head, "choices": [{
                "index": c.index, "text": text,
                "logprobs": _completion_logprobs(out.logprobs, c) if out.logprobs else None,
                "finish_reason": out.finish_reason if out.finished else None}]}
            if include_usage:
                event["usage"] = _usage(choices) if continuous else None
            yield sse_event(event)
    if include_usage:
        yield sse_event({**head, "choices": [], "usage": _usage(choices)})


# ---------------------------------------------------------------- tokenize / detokenize

@router.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(404))
async def tokenize(body: TokenizeRequest, request: Request) -> Response:
    state = server_state(request)
    engine = state.engine(body.model, "llm") if body.model else state.default_engine("llm")
    if body.messages is not None:
        _check_input_size(state, engine, _messages_chars(body.messages), "messages")
        tokens = await off_loop(_render_chat, engine, body.messages, body.add_generation_prompt,
                                add_special_tokens=bool(body.add_special_tokens))
    else:
        _check_input_size(state, engine, len(body.prompt), "prompt")
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        tokens = await off_loop(lambda: engine.tokenizer(body.prompt, add_special_tokens=add_special)["input_ids"])
    # a maximal prompt has ~10^6 tokens, serialized off the loop and by pydantic-core: json.dumps
    # holds the GIL five times longer (17 vs 3.5 ms per 10^5 ids), stalling every stream meanwhile
    return await off_loop(lambda: Response(TokenizeResponse(
        count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens).model_dump_json(),
        media_type="application/json"))


@router.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(404))
async def detokenize(body: DetokenizeRequest, request: Request):
    state = server_state(request)
    engine = state.engine(body.model, "llm") if body.model else state.default_engine("llm")
    _check_input_size(state, engine, len(body.tokens), "tokens", "tokens")  # each decodes to 1+ characters
    check_token_ids(body.tokens, engine.vocab_size, "tokens")
    return DetokenizeResponse(prompt=await off_loop(engine.tokenizer.decode, body.tokens))
