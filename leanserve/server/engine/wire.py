"""The messages between the API process and its engine processes (child_process.py), as msgpack.

API -> core: (ADD, request_id, prompt_token_ids, sampling params, arrival) | (ABORT, [ids]) | (SHUTDOWN,)
core -> API: (READY, engine facts) | (FAILED, error class name or None, message: errors.startup_error_to_wire): once, at startup;
             (STEP, [output], stats, adds_received): after each step (or batch of inputs);
             (DEAD, message): the core loop raised and is exiting.
An image engine (image_proc.py) shares READY, FAILED, DEAD, ADD, ABORT and SHUTDOWN (their fields are
its own) and adds START / STARTED (sizing its batch once every engine has loaded), DONE (one request's
images or error), BATCH (one pipeline call's stage times) and STATS (its running and waiting gauges).
Dataclasses travel as tuples of their fields in declaration order (both ends run the same code).
"""
from __future__ import annotations

import dataclasses

import msgpack

from leanserve.server.engine.outputs import CoreOutput, EngineStats, RequestTimes
from leanserve.server.engine.sampling_params import SamplingParams

ADD, ABORT, SHUTDOWN, START = 0, 1, 2, 3
READY, FAILED, STEP, DEAD, STARTED, DONE, BATCH, STATS = 0, 1, 2, 3, 4, 5, 6, 7

_PARAMS = [f.name for f in dataclasses.fields(SamplingParams)]
_TIMES = [f.name for f in dataclasses.fields(RequestTimes)]
_STATS = [f.name for f in dataclasses.fields(EngineStats)]


def encode(message) -> bytes:
    return msgpack.packb(message)


def decode(data: bytes):
    # logit_bias maps token ids (ints) to biases
    return msgpack.unpackb(data, strict_map_key=False)


def params_to_wire(p: SamplingParams) -> list:
    return [getattr(p, name) for name in _PARAMS]


def params_from_wire(values: list) -> SamplingParams:
    return SamplingParams(*values)


def stats_to_wire(s: EngineStats) -> list:
    return [getattr(s, name) for name in _STATS]


def stats_from_wire(values: list) -> EngineStats:
    return EngineStats(*values)


def output_to_wire(o: CoreOutput) -> list:
    return [o.request_id, o.new_token_ids, o.finish_reason, o.stop_reason, o.logprobs, o.num_prompt_tokens,
            o.num_cached_tokens, o.num_output_tokens, o.token_times,
            None if o.times is None else [getattr(o.times, name) for name in _TIMES]]


def output_from_wire(v: list) -> CoreOutput:
    return CoreOutput(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], None if v[9] is None else RequestTimes(*v[9]))
