"""Request and response models of the OpenAI-compatible API (vLLM's field names and bounds).

Requests accept unknown fields (logged at debug level and ignored) like vLLM, so clients that
send newer OpenAI fields keep working. Known fields are strict, like OpenAI's API: "0.5" is not a
number and true is not an integer. Every rule a model enforces is also in its JSON schema (Field
bounds, or `json_schema_extra` where a validator keeps a clearer message), so the OpenAPI schema
accepts exactly what these models accept. Streaming chunks are built as plain dicts in the route
module (one per token: the hot path), the non-streaming responses here document the schema.
"""
from __future__ import annotations

import logging
import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger(__name__)

# seeds: the integers every JSON parser reads exactly (RFC 8259 §6); beyond them a client or a
# schema validator working in doubles sees another number than the server
MAX_SEED = 2**53 - 1
MAX_N = 8
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 4
MAX_IMAGES = 10
# repetition_penalty divides or multiplies logits: far from 1 a float32 logit overflows (1e-45
# made NaN logits); two decades either way is beyond any useful setting
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
# str.strip() also strips characters a JSON-schema `\s` does not match (and the other way round):
# "blank" is spelled out so the schema's pattern and the check agree on every input
BLANK = " \t\n\r\x0b\x0c"
NOT_BLANK_PATTERN = r"[^ \t\n\r\x0b\x0c]"


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_fields(cls, data: Any):
        if isinstance(data, dict):
            unknown = set(data) - set(cls.model_fields)
            if unknown:
                logger.debug("%s: ignoring unknown fields %s", cls.__name__, sorted(unknown))
        return data


# ---------------------------------------------------------------- requests

class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM extension: running usage on every chunk


class ResponseFormat(OpenAIBaseModel):
    type: str = Field(json_schema_extra={"enum": ["text"]})

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v != "text":
            raise ValueError(f"response_format type {v!r} is not supported; only 'text'")
        return v


class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIBaseModel):
    """A message in; "developer" is OpenAI's newer name for "system" (templated as system).
    Null content is empty text (vLLM), e.g. an assistant turn that only called tools."""
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls, passed to the chat template

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v: Any):
        # a clear message instead of pydantic's union error listing both branches
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text":
                    raise ValueError(f"content part type {kind!r} is not supported; only 'text'")
        return v

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content or ())

    def template_dict(self) -> dict:
        """The message as chat templates expect it (text content, system for developer)."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return message


LogitBias = dict[str, Annotated[float, Field(ge=-100, le=100)]]
# the validators' rules in schema terms; a constrained union would name its branches in error
# locations ("stop.str"), these keep the param a client sent ("stop")
STOP_SCHEMA = {"minLength": 1, "maxItems": MAX_STOP_STRINGS, "items": {"minLength": 1}}
PROMPT_SCHEMA = {"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
    {"type": "array", "minItems": 1, "items": {"type": "integer"}},
    {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": {"type": "integer"}}}]}


class SamplingRequest(OpenAIBaseModel):
    """Sampling fields shared by chat and completions (spec §2)."""
    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)  # None: generation_config.json, else 1.0
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = Field(None, json_schema_extra=STOP_SCHEMA)
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=-MAX_SEED, le=MAX_SEED)  # choice i of n uses seed + i
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    logit_bias: LogitBias | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    user: str | None = None
    request_id: str | None = None  # vLLM extension: the response id's suffix (X-Request-Id wins)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


# top_logprobs > 0 needs logprobs: true (the model validator below, in schema terms)
TOP_LOGPROBS_NEED_LOGPROBS = {
    "if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}}, "required": ["top_logprobs"]},
    "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
}


class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(json_schema_extra=TOP_LOGPROBS_NEED_LOGPROBS)

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # preferred over max_tokens
    max_tokens: int | None = Field(None, ge=1)             # deprecated alias
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(None, json_schema_extra={"maxItems": 0})
    tool_choice: Any = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tools are not supported by this server")
        return v

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self


TokenIds = list[int]


def _best_of_schema(schema: dict) -> None:
    """best_of, when given, must equal n (default 1): one branch per allowed n."""
    equal_n = [{"properties": {"best_of": {"const": k}, "n": {"const": k}}, "required": ["n"]}
               for k in range(1, MAX_N + 1)]
    equal_n.append({"properties": {"best_of": {"const": 1}}, "not": {"required": ["n"]}})
    schema["if"] = {"properties": {"best_of": {"type": "integer"}}, "required": ["best_of"]}
    schema["then"] = {"anyOf": equal_n}


class CompletionRequest(SamplingRequest):
    model_config = ConfigDict(json_schema_extra=_best_of_schema)

    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(json_schema_extra=lambda s: s.update(PROMPT_SCHEMA))
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default; null = remaining context
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: None = None  # not supported: only null
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if not v or (isinstance(v, list) and any(len(p) == 0 for p in v if isinstance(p, (str, list)))):
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("suffix", mode="before")
    @classmethod
    def _no_suffix(cls, v):
        if v is not None:
            raise ValueError("suffix is not supported")
        return v

    @model_validator(mode="after")
    def _check_best_of(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (it must be unset or equal to n)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TokenizeRequest(OpenAIBaseModel):
    # exactly one of prompt / messages (the validator below, in schema terms)
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"properties": {"prompt": {"type": "string"}}, "required": ["prompt"]},
        {"properties": {"messages": {"type": "array"}}, "required": ["messages"]}]})

    model: str | None = None  # default: the first served chat model
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None   # default True for prompt, False for messages (as vLLM)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


SIZE_PATTERN = r"^(auto|0*[1-9][0-9]*x0*[1-9][0-9]*)$"
# far above what any model serves (its engine checks its own limits), and small enough to cross to the
# engine's process as msgpack integers
MAX_IMAGE_SIDE = 65536
MAX_IMAGE_STEPS = 10_000


class ImageGenerationRequest(OpenAIBaseModel):
    """OpenAI's images.generate fields plus diffusers-named extensions (spec §6). Bounds that depend
    on the model (size, steps, guidance, scheduler) are checked by its engine."""
    # size excludes height/width (the validator below, in schema terms)
    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"size": {"type": "string"}}, "required": ["size"]},
        "then": {"properties": {"height": {"type": "null"}, "width": {"type": "null"}}},
        "not": {"properties": {"scheduler": {"type": "string"}, "sampler": {"type": "string"}},
                "required": ["scheduler", "sampler"]}})

    prompt: str = Field(json_schema_extra={"pattern": NOT_BLANK_PATTERN})
    model: str | None = None                   # default: the first served image model
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    size: str | None = Field(None, json_schema_extra={"pattern": SIZE_PATTERN})  # "WxH" or "auto" (native)
    height: int | None = Field(None, ge=1, le=MAX_IMAGE_SIDE)  # extension; with width, instead of size
    width: int | None = Field(None, ge=1, le=MAX_IMAGE_SIDE)
    response_format: str | None = Field(None, json_schema_extra={"enum": ["b64_json", None]})  # inline only
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)  # jpeg/webp quality; png is lossless
    negative_prompt: str | None = None
    # default: the pipeline's own; 0 and below reach the model, which says what it serves
    num_inference_steps: int | None = Field(None, ge=-MAX_IMAGE_STEPS, le=MAX_IMAGE_STEPS)
    guidance_scale: float | None = None        # default: the pipeline's own
    seed: int | None = Field(None, ge=-MAX_SEED, le=MAX_SEED)  # image i uses seed + i
    scheduler: str | None = None               # e.g. ddim, dpmsolver++; default: the model's own
    sampler: str | None = None                 # alias of scheduler: give one
    # accepted and ignored (OpenAI fields without a meaning here)
    quality: Any = None
    style: Any = None
    background: Any = None
    moderation: Any = None
    user: Any = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip(BLANK):
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("response_format")
    @classmethod
    def _b64_only(cls, v: str | None) -> str | None:
        if v not in (None, "b64_json"):
            raise ValueError(f"response_format {v!r} is not supported; only 'b64_json' (images are returned "
                             "inline, there are no hosted URLs)")
        return v

    @field_validator("size")
    @classmethod
    def _check_size(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(SIZE_PATTERN, v):
            raise ValueError(f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {v!r}")
        if v is not None and v != "auto" and max(map(int, v.split("x"))) > MAX_IMAGE_SIDE:
            raise ValueError(f"size {v!r}: width and height must be at most {MAX_IMAGE_SIDE}")
        return v

    @model_validator(mode="after")
    def _one_size_and_scheduler(self):
        if self.size is not None and (self.height is not None or self.width is not None):
            raise ValueError("give either size or height/width, not both")
        if self.scheduler is not None and self.sampler is not None:
            raise ValueError("scheduler and sampler name the same setting; give one")
        return self

    def requested_size(self) -> tuple[int | None, int | None]:
        """(width, height) asked for; None where the model's native size applies."""
        if self.size is not None and self.size != "auto":
            w, _, h = self.size.partition("x")
            return int(w), int(h)
        return self.width, self.height


# ---------------------------------------------------------------- responses

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int  # the HTTP status


class ErrorResponse(BaseModel):
    """Every error response (and an in-stream error event) of the server: OpenAI's envelope."""
    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "leanserve"
    kind: Literal["llm", "image"] | None = None  # extension: llm -> chat/completions, image -> images
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ImageObject(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageObject]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
