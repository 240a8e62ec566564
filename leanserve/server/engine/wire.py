"""The messages between the API process and its engine processes (child_process.py), as msgpack.

API -> core: (ADD, request_id, prompt_token_ids, sampling params, arrival) | (ABORT, [ids]) | (SHUTDOWN,)
core -> API: (READY, engine facts) | (FAILED, error class name or None, message: errors.startup_error_to_wire): once, at startup;
             (STEP, [output], stats, adds_received): after each step (or batch of inputs);
             (DEAD, message): the core loop raised and is exiting.
An image engine (image_proc.py) shares READY, FAILED, DEAD, ADD, ABORT and SHUTDOWN (their fields are
its own) and adds START / STARTED (sizing its batch once every engine has loaded), DONE (one request's
images or error), BATCH (one pipeline call's stage times) and STATS (its running and waiting gauges).
Dataclasses travel as lists of their fields in declaration order (to_wire; both ends run the same code).
"""
from __future__ import annotations

import dataclasses
import functools

import msgpack

from leanserve.server.engine.outputs import CoreOutput, EngineStats, RequestTimes
from leanserve.server.engine.sampling_params import SamplingParams

ADD, ABORT, SHUTDOWN, START = 0, 1, 2, 3
READY, FAILED, STEP, DEAD, STARTED, DONE, BATCH, STATS = 0, 1, 2, 3, 4, 5, 6, 7


@functools.cache
def _field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def to_wire(obj) -> list:
    """A dataclass as the list of its fields, in declaration order (cls(*values) rebuilds it)."""
    return [getattr(obj, name) for name in _field_names(type(obj))]


def encode(message) -> bytes:
    return msgpack.packb(message)


def decode(data: bytes):
    # logit_bias maps token ids (ints) to biases
    return msgpack.unpackb(data, strict_map_key=False)


def params_from_wire(values: list) -> SamplingParams:
    return SamplingParams(*values)


def stats_from_wire(values: list) -> EngineStats:
    return EngineStats(*values)


def output_to_wire(o: CoreOutput) -> list:
    return [o.request_id, o.new_token_ids, o.finish_reason, o.stop_reason, o.logprobs, o.num_prompt_tokens,
            o.num_cached_tokens, o.num_output_tokens, o.token_times,
            None if o.times is None else to_wire(o.times)]


def output_from_wire(v: list) -> CoreOutput:
    return CoreOutput(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], None if v[9] is None else RequestTimes(*v[9]))
