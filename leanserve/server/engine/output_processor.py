"""Token ids to text: per-request incremental detokenization, stop strings and logprob texts.

It turns the core's CoreOutputs into RequestOutputs. A stop string ends a request here, which
the core cannot see: `process` returns those requests' ids for the caller to abort in the core.
"""
from __future__ import annotations

import dataclasses

from leanserve.server.engine.detokenizer import Detokenizer
from leanserve.server.engine.outputs import CoreOutput, RequestOutput, RequestTimes, TokenLogprob
from leanserve.server.engine.sampling_params import SamplingParams


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.detokenizers: dict[str, Detokenizer] = {}
        self.times: dict[str, RequestTimes] = {}  # the core sends them with the first token and at the end

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.detokenizers[request_id] = Detokenizer(self.tokenizer, prompt_token_ids, params.stop,
                                                    params.skip_special_tokens, params.min_tokens)

    def drop(self, request_id: str) -> None:
        self.detokenizers.pop(request_id, None)
        self.times.pop(request_id, None)

    def process(self, outputs: list[CoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """(outputs of requests still tracked here, ids of requests a stop string finished)."""
        results, stopped = [], []
        for core_out in outputs:
            detok = self.detokenizers.get(core_out.request_id)
            if detok is None:  # finished here already (stop string): the core's late output
                continue
            if core_out.times is not None:
                self.times[core_out.request_id] = core_out.times
            out = self._process(detok, core_out)
            if out.finished:
                self.drop(out.request_id)
                if not core_out.finished:
                    stopped.append(out.request_id)
            results.append(out)
        return results, stopped

    def _process(self, detok: Detokenizer, o: CoreOutput) -> RequestOutput:
        finish_reason, stop_reason, times, new_text = o.finish_reason, o.stop_reason, o.times, ""
        for token in o.new_token_ids:
            if finish_reason == "stop":  # EOS or a stop token id: its text is never emitted
                detok.flush()
            elif (stop_str := detok.update(token)) is not None:  # the text is cut before it
                finish_reason, stop_reason = "stop", stop_str
                if not o.finished:  # the core's times of the first token, ended here
                    times = dataclasses.replace(self.times[o.request_id], last_token=o.token_times[-1],
                                                finished=o.token_times[-1])
            elif finish_reason is not None:
                detok.flush()
            new_text += detok.take_delta(finish_reason is not None)
        logprobs = None
        if o.logprobs is not None:
            logprobs = [TokenLogprob(t, self._text(t), lp, [(i, self._text(i), ilp) for i, ilp in top])
                        for t, lp, top in o.logprobs]
        return RequestOutput(
            request_id=o.request_id, new_token_ids=o.new_token_ids, new_text=new_text,
            finished=finish_reason is not None, finish_reason=finish_reason, stop_reason=stop_reason,
            logprobs=logprobs, num_prompt_tokens=o.num_prompt_tokens, num_cached_tokens=o.num_cached_tokens,
            num_output_tokens=o.num_output_tokens, token_times=o.token_times, times=times)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
