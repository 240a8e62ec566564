"""Prometheus metrics under the `leanserve:` prefix, mirroring vLLM V1's names and buckets.

Two sources, both outside the engine's hot loop:
- scheduler state and the engine's cumulative counters (running/waiting, KV usage,
  preemptions, prefix cache) are read from `engine.stats()` at scrape time by a collector;
- per-request latencies and token counts are observed by the front end as outputs stream
  through it, from the engine's monotonic stamps (TTFT and e2e start at HTTP arrival).
Image models (kind "image") get their own names, since there is no standard: running/waiting
from `engine.stats()`, request latencies observed by the images route, and per-batch stage
times (text encoding, each denoising step, VAE decoding) reported by the engine after each call.
Each app owns its CollectorRegistry, so several apps (tests) never share counters.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from leanserve.server.engine.outputs import RequestOutput, RequestTimes

if TYPE_CHECKING:  # the image engine imports torch; metrics stay importable without it
    from leanserve.server.image_engine import BatchStats, ImageOutput

logger = logging.getLogger(__name__)
disable_created_metrics()  # the *_created series double the exposition for no use (vLLM does the same)

P = "leanserve:"
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
N_BUCKETS = [1, 2, 5, 10, 20]
# 1 ms - 10 s, roughly geometric: a 1-step generator's text encoding to a large VAE decode
STAGE_BUCKETS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
# when the n choices of a request end differently, the request's reason is the first of these
FINISH_REASONS = ("error", "abort", "length", "stop")


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class EngineStatsCollector:
    """Reads scheduler gauges and the engine's cumulative counters at scrape time."""

    def __init__(self, engines: Mapping[str, object]):
        self.engines = engines

    def collect(self):
        running = GaugeMetricFamily(P + "num_requests_running", "Requests in the running batch.",
                                    labels=["model_name"])
        waiting = GaugeMetricFamily(P + "num_requests_waiting", "Requests waiting to be scheduled.",
                                    labels=["model_name"])
        kv_usage = GaugeMetricFamily(P + "kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.",
                                     labels=["model_name"])
        preemptions = CounterMetricFamily(P + "num_preemptions", "Cumulative preemptions.",
                                          labels=["model_name"])
        queries = CounterMetricFamily(P + "prefix_cache_queries", "Prefix-cache queries, in tokens.",
                                      labels=["model_name"])
        hits = CounterMetricFamily(P + "prefix_cache_hits", "Prefix-cache hits, in tokens.",
                                   labels=["model_name"])
        cache_info = GaugeMetricFamily(
            P + "cache_config_info", "Information of the KV cache configuration.",
            labels=["model_name", "block_size", "gpu_memory_utilization", "enable_prefix_caching",
                    "num_gpu_blocks"])
        for name, engine in self.engines.items():
            s = engine.stats()
            running.add_metric([name], s.num_running)
            waiting.add_metric([name], s.num_waiting)
            kv_usage.add_metric([name], s.kv_cache_usage)
            preemptions.add_metric([name], s.num_preemptions)
            queries.add_metric([name], s.prefix_cache_queries)
            hits.add_metric([name], s.prefix_cache_hits)
            cache_info.add_metric(
                [name, str(s.block_size), str(engine.config.gpu_memory_utilization),
                 str(s.enable_prefix_caching), str(s.num_kv_blocks)], 1)
        yield from (running, waiting, kv_usage, preemptions, queries, hits, cache_info)


class ImageEngineStatsCollector:
    """Reads the image engines' running/waiting requests at scrape time."""

    def __init__(self, engines: Mapping[str, object]):
        self.engines = engines

    def collect(self):
        running = GaugeMetricFamily(P + "image_requests_running", "Image requests with images being generated.",
                                    labels=["model_name"])
        waiting = GaugeMetricFamily(P + "image_requests_waiting", "Image requests none of whose images started.",
                                    labels=["model_name"])
        for name, engine in self.engines.items():
            s = engine.stats()
            running.add_metric([name], s.num_running)
            waiting.add_metric([name], s.num_waiting)
        yield from (running, waiting)


class ImageModelMetrics:
    """The labelled children of one served image model."""

    def __init__(self, m: ServerMetrics, name: str):
        self.name = name
        self.images_generated = m.images_generated
        self.e2e = m.image_e2e.labels(name)
        self.queue = m.image_queue_time.labels(name)
        self.text_encode = m.text_encode.labels(name)
        self.denoise_step = m.denoise_step.labels(name)
        self.vae_decode = m.vae_decode.labels(name)
        self.images_total = 0  # for the periodic log line
        self.logged = 0

    def observe_request(self, out: ImageOutput, num_images: int, steps: int) -> None:
        """A request answered; its e2e latency ends now, with the images encoded."""
        t = out.times
        self.e2e.observe(time.monotonic() - t.arrival)
        if t.queued is not None and t.scheduled is not None:
            self.queue.observe(t.scheduled - t.queued)
        height, width = out.images[0].shape[:2]
        self.images_generated.labels(self.name, f"{width}x{height}", str(steps)).inc(num_images)
        self.images_total += num_images

    def observe_batch(self, stats: BatchStats) -> None:
        """One pipeline call, reported by the engine on the event loop."""
        if stats.text_encode_s is not None:
            self.text_encode.observe(stats.text_encode_s)
        for seconds in stats.denoise_steps_s:
            self.denoise_step.observe(seconds)
        if stats.vae_decode_s is not None:
            self.vae_decode.observe(stats.vae_decode_s)


class ModelMetrics:
    """The labelled children of one served model (labels resolved once, not per token)."""

    def __init__(self, m: ServerMetrics, name: str):
        self.prompt_tokens = m.prompt_tokens.labels(name)
        self.generation_tokens = m.generation_tokens.labels(name)
        self.success = {r: m.request_success.labels(name, r) for r in FINISH_REASONS}
        self.ttft = m.ttft.labels(name)
        self.itl = m.itl.labels(name)
        self.e2e = m.e2e.labels(name)
        self.queue = m.queue_time.labels(name)
        self.prefill = m.prefill_time.labels(name)
        self.decode = m.decode_time.labels(name)
        self.inference = m.inference_time.labels(name)
        self.request_prompt_tokens = m.request_prompt_tokens.labels(name)
        self.request_generation_tokens = m.request_generation_tokens.labels(name)
        self.params_n = m.params_n.labels(name)
        self.params_max_tokens = m.params_max_tokens.labels(name)
        # running totals for the periodic log line (prometheus children have no public getter)
        self.prompt_total = self.generation_total = 0
        self.logged = (0, 0, 0, 0)  # prompt, generation, prefix queries, prefix hits at the last log

    def observe_params(self, n: int, max_tokens: int) -> None:
        self.params_n.observe(n)
        self.params_max_tokens.observe(max_tokens)

    def track(self, arrival: float, n: int = 1) -> RequestMetrics:
        return RequestMetrics(self, arrival, n)


class RequestMetrics:
    """Front-end bookkeeping of one request: a prompt and its n choices (engine requests), fed
    with each choice's output deltas. As in vLLM the request is counted once, whatever n: its
    prompt tokens, time to first token, success and latencies; tokens and inter-token latencies
    are per choice."""
    __slots__ = ("mm", "arrival", "last_token_time", "reasons", "num_generation_tokens", "times")

    def __init__(self, mm: ModelMetrics, arrival: float, n: int = 1):
        self.mm = mm
        self.arrival = arrival
        self.last_token_time: list[float | None] = [None] * n
        self.reasons: list[str | None] = [None] * n  # per choice, once finished
        self.num_generation_tokens = 0
        self.times: list[RequestTimes | None] = [None] * n

    def on_output(self, choice: int, out: RequestOutput) -> None:
        mm = self.mm
        if out.new_token_ids:
            times = out.token_times
            prev = self.last_token_time[choice]
            if prev is None:  # this choice's first token
                if all(t is None for t in self.last_token_time):  # the request's: its prompt is processed
                    mm.prompt_tokens.inc(out.num_prompt_tokens)
                    mm.prompt_total += out.num_prompt_tokens
                    mm.ttft.observe(times[0] - self.arrival)
                prev, times = times[0], times[1:]
            for t in times:  # one inter-token observation per token after the first
                mm.itl.observe(t - prev)
                prev = t
            self.last_token_time[choice] = prev
            mm.generation_tokens.inc(len(out.new_token_ids))
            mm.generation_total += len(out.new_token_ids)
            self.num_generation_tokens += len(out.new_token_ids)
        if out.finished:
            self.finish(choice, out.finish_reason or "stop", out.times, out.num_prompt_tokens)

    def finish(self, choice: int, reason: str, times: RequestTimes | None = None, num_prompt_tokens: int = 0) -> None:
        """A choice ended (idempotent); the request is counted when its last choice ends. Latencies
        only when the engine stamped every choice (a client disconnect aborts without a final
        engine output, so only its reason is counted)."""
        if self.reasons[choice] is not None:
            return
        self.reasons[choice] = reason
        self.times[choice] = times
        if None in self.reasons:
            return
        mm = self.mm
        mm.success[next(r for r in FINISH_REASONS if r in self.reasons)].inc()
        if None in self.times:
            return
        times = self.times
        mm.e2e.observe(max(t.finished or time.monotonic() for t in times) - self.arrival)
        mm.request_prompt_tokens.observe(num_prompt_tokens)
        mm.request_generation_tokens.observe(self.num_generation_tokens)
        queued = _first(t.queued for t in times)
        scheduled = _first(t.scheduled for t in times)
        first_token = _first(t.first_token for t in times)
        last_token = max((t.last_token for t in times if t.last_token is not None), default=None)
        if queued is not None and scheduled is not None:
            mm.queue.observe(scheduled - queued)
        if scheduled is not None and first_token is not None:
            mm.prefill.observe(first_token - scheduled)
            if last_token is not None:
                mm.decode.observe(last_token - first_token)
                mm.inference.observe(last_token - scheduled)


def _first(stamps) -> float | None:
    """The earliest of the choices' stamps (None where a choice has none)."""
    return min((s for s in stamps if s is not None), default=None)


class ServerMetrics:
    def __init__(self, all_engines: Mapping[str, object]):
        """`all_engines`: every served engine; each is measured according to its `kind`."""
        self.engines = engines = {name: e for name, e in all_engines.items() if e.kind == "llm"}
        self.image_engines = {name: e for name, e in all_engines.items() if e.kind == "image"}
        self.registry = r = CollectorRegistry()
        r.register(EngineStatsCollector(engines))
        r.register(ImageEngineStatsCollector(self.image_engines))
        labels = ["model_name"]
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prefill tokens processed.", labels, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generation tokens produced.", labels,
                                         registry=r)
        self.request_success = Counter(P + "request_success", "Finished requests by finish reason.",
                                       labels + ["finished_reason"], registry=r)

        def hist(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(P + name, doc, labels, buckets=buckets, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token (from HTTP arrival).",
                         TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Interval between consecutive tokens.", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end latency (from HTTP arrival).",
                        REQUEST_LATENCY_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds", "Time in the waiting queue.",
                               REQUEST_LATENCY_BUCKETS)
        self.prefill_time = hist("request_prefill_time_seconds", "First scheduled to first token.",
                                 REQUEST_LATENCY_BUCKETS)
        self.decode_time = hist("request_decode_time_seconds", "First token to last token.",
                                REQUEST_LATENCY_BUCKETS)
        self.inference_time = hist("request_inference_time_seconds", "First scheduled to last token.",
                                   REQUEST_LATENCY_BUCKETS)
        max_len = max((e.max_model_len for e in engines.values()), default=1)
        token_buckets = build_1_2_5_buckets(max_len)
        self.request_prompt_tokens = hist("request_prompt_tokens", "Prompt tokens per request.", token_buckets)
        self.request_generation_tokens = hist("request_generation_tokens", "Generated tokens per request.",
                                              token_buckets)
        self.params_max_tokens = hist("request_params_max_tokens", "The max_tokens parameter per request.",
                                      token_buckets)
        self.params_n = hist("request_params_n", "The n parameter per request.", N_BUCKETS)
        self.models = {name: ModelMetrics(self, name) for name in engines}
        # HTTP middleware metrics, named like the instrumentator vLLM uses (no prefix); the ops
        # routes (/metrics, /health, /load, /version) are not counted
        self.http_requests = Counter("http_requests", "HTTP requests by route, method and status.",
                                     ["handler", "method", "status"], registry=r)
        self.http_duration = Histogram("http_request_duration_seconds", "HTTP request duration, to the last "
                                       "byte sent.", ["handler", "method"], buckets=REQUEST_LATENCY_BUCKETS,
                                       registry=r)

        self.image_e2e = hist("image_generation_seconds", "Image request latency (from HTTP arrival to encoded "
                              "images).", REQUEST_LATENCY_BUCKETS)
        self.image_queue_time = hist("image_queue_time_seconds", "Time until the first image of a request "
                                     "started.", REQUEST_LATENCY_BUCKETS)
        self.text_encode = hist("text_encode_seconds", "Prompt encoding of one image batch.", STAGE_BUCKETS)
        self.denoise_step = hist("denoise_step_seconds", "One denoising step of one image batch (both CFG "
                                 "branches).", STAGE_BUCKETS)
        self.vae_decode = hist("vae_decode_seconds", "VAE decoding of one image batch.", STAGE_BUCKETS)
        self.images_generated = Counter(P + "images_generated", "Images returned, by size and steps.",
                                        labels + ["size", "steps"], registry=r)
        self.image_models = {name: ImageModelMetrics(self, name) for name in self.image_engines}
        self._last_log = time.monotonic()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def log_stats(self) -> None:
        """One line per active model since the last call, like vLLM's LoggingStatLogger."""
        now = time.monotonic()
        dt, self._last_log = max(now - self._last_log, 1e-9), now
        for name, mm in self.models.items():
            s = self.engines[name].stats()
            current = (mm.prompt_total, mm.generation_total, s.prefix_cache_queries, s.prefix_cache_hits)
            d_prompt, d_gen, d_queries, d_hits = (a - b for a, b in zip(current, mm.logged))
            mm.logged = current
            if not (d_prompt or d_gen or s.num_running or s.num_waiting):
                continue
            hit_rate = 100 * d_hits / d_queries if d_queries else 0.0
            logger.info("%s: running %d, waiting %d, KV cache %.1f%%, prompt %.1f tok/s, generation %.1f tok/s, "
                        "prefix cache hit rate %.1f%%", name, s.num_running, s.num_waiting,
                        100 * s.kv_cache_usage, d_prompt / dt, d_gen / dt, hit_rate)
        for name, im in self.image_models.items():
            s = self.image_engines[name].stats()
            d_images, im.logged = im.images_total - im.logged, im.images_total
            if d_images or s.num_running or s.num_waiting:
                logger.info("%s: running %d, waiting %d, %.2f images/s", name, s.num_running, s.num_waiting,
                            d_images / dt)

    def add_engine(self, name: str, engine) -> None:
        """A model loaded while serving (POST /v1/models), measured like those served from the start."""
        if engine.kind == "llm":
            self.engines[name] = engine
            self.models[name] = ModelMetrics(self, name)
        else:
            self.image_engines[name] = engine
            self.image_models[name] = ImageModelMetrics(self, name)
            engine.batch_observer = self.image_models[name].observe_batch

    def remove_engine(self, name: str) -> None:
        for by_name in (self.engines, self.models, self.image_engines, self.image_models):
            by_name.pop(name, None)
