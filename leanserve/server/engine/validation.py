"""The one check of a request's token ids and context length. The OpenAI routes run it once per
prompt, before fanning the prompt out into choices, and tell the engine so; offline callers and
direct users of AsyncLLMEngine get it from add_request / generate."""
from __future__ import annotations

from leanserve.server.engine.errors import InvalidRequestError
from leanserve.server.engine.sampling_params import SamplingParams

CONTEXT_OVERFLOW = ("This model's maximum context length is {L} tokens. However, you requested {total} tokens "
                    "({P} in the messages, {M} in the completion). Please reduce the length of the messages "
                    "or completion.")


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"{param}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})",
                                  param)


def validate_request(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int,
                     prompt_param: str = "prompt") -> None:
    """Raise InvalidRequestError (a ValueError) for a request the engine cannot run. `prompt_param`
    is the request field the prompt came from (chat: "messages"). No side effects, thread-safe."""
    if not prompt_token_ids:
        raise InvalidRequestError("the prompt is empty", prompt_param)
    check_token_ids(prompt_token_ids, vocab_size, prompt_param)
    total = len(prompt_token_ids) + params.max_tokens
    if total > max_model_len:
        raise InvalidRequestError(CONTEXT_OVERFLOW.format(L=max_model_len, total=total, P=len(prompt_token_ids),
                                                          M=params.max_tokens), prompt_param)
    check_token_ids(list(params.logit_bias or ()), vocab_size, "logit_bias")
    check_token_ids(params.stop_token_ids, vocab_size, "stop_token_ids")
