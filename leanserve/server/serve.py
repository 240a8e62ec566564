"""`leanserve serve`: load the models, then serve them over HTTP until SIGINT/SIGTERM.

Shutdown drains instead of cutting: on the first signal /health and new requests answer 503
while in-flight requests finish (up to --shutdown-timeout, then they are aborted and their
streams end with finish_reason "abort" and [DONE]); then uvicorn closes and the process exits.
A second signal falls through to uvicorn's own handling (a second Ctrl+C forces the exit).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from pathlib import Path

import uvicorn

from leanserve.errors import UserError
from leanserve.models.model_dir import check_complete
from leanserve.server.connections import ConnectionLimits, fd_budget, install_accept_error_handler
from leanserve.server.engine.config import EngineConfig
from leanserve.server.image_config import ImageEngineConfig
from leanserve.server.settings import LOG_FORMAT, ServerSettings
from leanserve.server.stack_dump import dump_stacks_on_sigusr1

logger = logging.getLogger(__name__)

# the first image model is the images API default (the fast few-step generator); its teacher stays servable by name
DEFAULT_MODELS = ["zoo/chat-tiny", "zoo/shapes-sid", "zoo/shapes-teacher"]
_IMAGE_DEFAULTS = ImageEngineConfig(model="")
DEFAULT_JOBS_DIR = "jobs"
UVICORN_GRACE_S = 2.0  # after our drain only idle keep-alive connections remain
BACKLOG = 2048  # uvicorn's default listen backlog; also bounds the sockets one accept burst opens
MIN_CONNECTIONS = 16
_SERVER_OPTIONS = {  # flag -> (ServerSettings field, type, help); defaults from ServerSettings
    "--max-input-chars": ("max_input_chars", int, "prompt/messages characters per request, checked before "
                          "tokenizing; larger requests get 400 (default: max_model_len x 32)"),
    "--limit-concurrency": ("limit_concurrency", int, "connections/requests served at once; beyond, requests "
                            "get 503 (default: %(default)s)"),
    "--max-idle-connections": ("max_idle_connections", int, "keep-alive connections kept open between requests; "
                               "connections beyond this plus --limit-concurrency are closed at accept "
                               "(default: %(default)s)"),
    "--timeout-keep-alive": ("timeout_keep_alive", float, "seconds an idle keep-alive connection stays open "
                             "(default: %(default)s)"),
    "--timeout-headers": ("timeout_headers", float, "seconds a client has to send a request head, from connect "
                          "or the previous response; then the connection closes (default: %(default)s)"),
    "--timeout-body": ("timeout_body", float, "seconds a client has to send a request body after its head; "
                       "then 408 (default: %(default)s)"),
    "--timeout-write": ("timeout_write", float, "seconds a client may leave a response unread before the "
                        "connection is cut and its request aborted (default: %(default)s)"),
    "--h11-max-incomplete-event-size": ("h11_max_incomplete_event_size", int, "largest request head in bytes "
                                        "(default: %(default)s)"),
}
_ENGINE_OPTIONS = {  # flag -> (EngineConfig field, type); unset flags keep EngineConfig's defaults
    "--max-num-seqs": ("max_num_seqs", int),
    "--max-model-len": ("max_model_len", int),
    "--max-num-batched-tokens": ("max_num_batched_tokens", int),
    "--max-prefill-tokens-with-decodes": ("max_prefill_tokens_with_decodes", int),
    "--num-kv-blocks": ("num_kv_blocks", int),
    "--block-size": ("block_size", int),
    "--max-queued-requests": ("max_queued_requests", int),
    "--gpu-memory-utilization": ("gpu_memory_utilization", float),
    "--device": ("device", str),
    "--dtype": ("dtype", str),
    "--seed": ("seed", int),
    "--tensor-parallel-size": ("tensor_parallel_size", int),
}
_UNSET_MEANS = {"max_model_len": "the model's max_position_embeddings", "num_kv_blocks": "sized from memory",
                "max_num_batched_tokens": "2048 on CUDA, 512 on CPU",
                "max_prefill_tokens_with_decodes": "the whole step budget"}
_HELP = {"max_prefill_tokens_with_decodes": "prompt tokens in a step that also decodes: bounds the inter-token "
                                            "gaps' tail at some TTFT cost; ",
         "tensor_parallel_size": "LLMs: split each over this many GPUs (CPU: processes), one process per rank; "
                                 "image models run unsplit; "}
# flags that also configure image engines: EngineConfig field -> ImageEngineConfig field
_IMAGE_OPTIONS = {"device": "device", "dtype": "dtype", "max_queued_requests": "max_queued_images"}


def add_arguments(p):
    defaults = ServerSettings()
    p.add_argument("--model", action="append", metavar="DIR",
                   help=f"model directory; repeat to serve several (default: {', '.join(DEFAULT_MODELS)})")
    p.add_argument("--chat-template", metavar="FILE",
                   help="Jinja chat template for every chat model, instead of the tokenizer's own")
    p.add_argument("--served-model-name", action="append", metavar="NAME",
                   help="the name clients send as `model`, one per --model (default: the directory name)")
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=defaults.port)
    p.add_argument("--api-key", action="append", metavar="KEY",
                   help="require `Authorization: Bearer KEY` on every route but /health, /metrics, /version and /load "
                        "(repeatable; default: $LEANSERVE_API_KEY)")
    p.add_argument("--shutdown-timeout", type=float, default=defaults.shutdown_timeout, metavar="S",
                   help="seconds in-flight requests may finish after SIGTERM; 0 aborts them at once")
    p.add_argument("--log-level", default=defaults.log_level, choices=["debug", "info", "warning", "error"])
    limits = p.add_argument_group("request and connection limits")
    for flag, (name, type_, help_) in _SERVER_OPTIONS.items():
        limits.add_argument(flag, dest=name, type=type_, default=getattr(defaults, name),
                            metavar=type_.__name__.upper(), help=help_)
    engine = p.add_argument_group("engine")
    engine_defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    for flag, (name, type_) in _ENGINE_OPTIONS.items():
        help_ = _HELP.get(name, "") + f"default: {_UNSET_MEANS.get(name, engine_defaults[name])}"
        if name == "max_queued_requests":
            help_ += f"; image models count images, default {_IMAGE_DEFAULTS.max_queued_images}"
        engine.add_argument(flag, dest=name, type=type_, default=None, metavar=type_.__name__.upper(), help=help_)
    engine.add_argument("--load-format", choices=["safetensors", "dummy"], default=None,
                        help="dummy: random LLM weights from config.json alone (no weight files), for benchmarks; "
                             "image models load theirs either way (default: safetensors)")
    engine.add_argument("--enforce-eager", action="store_true",
                        help="CUDA: run decode steps eagerly instead of replaying CUDA graphs")
    engine.add_argument("--async-scheduling", action="store_true",
                        help="launch each engine step before reading the previous step's tokens, so that "
                             "scheduling and output work overlap the GPU's (not with --tensor-parallel-size > 1)")
    engine.add_argument("--model-setting", action="append", metavar="KEY=VALUE",
                        help="set KEY of the LLM directories' leanserve.json settings before their method is "
                             "applied (repeatable; VALUE is read as JSON when it parses, else as a string)")
    image = p.add_argument_group("image engine")
    image.add_argument("--max-image-batch", type=int, default=None, metavar="INT",
                       help="images per denoising loop; concurrent requests of one shape share it (default: "
                            "auto, what fits in the free GPU memory as measured at startup; a small batch on CPU)")
    image.add_argument("--image-batch-wait", type=float, default=None, metavar="FRAC",
                       help="after a loop of several images of one shape, wait up to FRAC of its time for as many "
                            "new images before the next loop, so that clients just answered join it (default: "
                            f"{_IMAGE_DEFAULTS.batch_wait}; 0 starts at once)")
    image.add_argument("--image-cuda-graphs", action="store_true",
                       help="CUDA: replay the UNet's forward as CUDA graphs, one per padded batch size (a small "
                            "UNet is bound by kernel launches; the first call at each size captures)")
    jobs = p.add_argument_group("jobs API (/v1/jobs)")
    jobs.add_argument("--jobs-dir", default=DEFAULT_JOBS_DIR, metavar="DIR",
                      help="workspace of the jobs API: its database, each job's output and log, the inputs jobs "
                           "may read; '' turns the jobs API off (default: ./jobs)")
    jobs.add_argument("--max-queued-jobs", type=int, default=defaults.max_queued_jobs, metavar="INT")
    jobs.add_argument("--gpu-jobs", type=int, default=defaults.gpu_jobs, metavar="INT",
                      help="jobs running at once on the GPU")
    jobs.add_argument("--cpu-jobs", type=int, default=defaults.cpu_jobs, metavar="INT",
                      help="jobs running at once on the CPU, counted apart from the GPU's")


def parse_model_settings(pairs: list[str]) -> dict:
    """["KEY=VALUE", ...] -> {KEY: VALUE}, VALUE as JSON when it parses (numbers, true, lists), else
    the string itself, so `mode=fast` needs no shell-quoted JSON string."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--model-setting takes KEY=VALUE, got {pair!r}")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def engine_options(args) -> dict:
    """The EngineConfig fields the serve flags set (flags left unset keep EngineConfig's defaults)."""
    options = {name: getattr(args, name) for name, _ in _ENGINE_OPTIONS.values() if getattr(args, name) is not None}
    if args.enforce_eager:
        options["enforce_eager"] = True
    if args.async_scheduling:
        options["async_scheduling"] = True
    if args.load_format is not None:
        options["load_format"] = args.load_format
    if args.model_setting:
        options["model_settings"] = parse_model_settings(args.model_setting)
    return options


def _model_kind(path: str) -> str:
    """"image" for a diffusers pipeline directory, "llm" for a transformers one."""
    d = Path(path)
    if not d.is_dir():
        raise UserError(f"model directory {path} does not exist")
    check_complete(d)  # one line for a half-written directory, before any library parses it
    index = d / "model_index.json"
    if index.is_file():
        try:
            class_name = json.loads(index.read_text()).get("_class_name")
        except (json.JSONDecodeError, AttributeError):
            class_name = None
        if not class_name:
            raise UserError(f"{index} names no pipeline class (_class_name); not a diffusers pipeline directory")
        return "image"
    if not (d / "config.json").is_file():
        raise UserError(f"{path} is not a model directory (no config.json, nor model_index.json)")
    return "llm"


def run(args) -> int:
    models = args.model or DEFAULT_MODELS
    names = args.served_model_name or []
    if names and len(names) != len(models):
        raise UserError(f"{len(names)} --served-model-name for {len(models)} --model; give one per model or none")
    for flag in ("max_queued_jobs", "gpu_jobs", "cpu_jobs"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 0")
    kinds = [_model_kind(path) for path in models]
    chat_template = None
    if args.chat_template:
        if not Path(args.chat_template).is_file():
            raise UserError(f"--chat-template {args.chat_template}: no such file")
        chat_template = Path(args.chat_template).read_text()
    env_key = os.environ.get("LEANSERVE_API_KEY")
    for flag, (name, _, _) in _SERVER_OPTIONS.items():
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"{flag} must be > 0, got {getattr(args, name)}")
    settings = ServerSettings(host=args.host, port=args.port, api_keys=args.api_key or ([env_key] if env_key else []),
                              shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
                              jobs_dir=args.jobs_dir or None, max_queued_jobs=args.max_queued_jobs,
                              gpu_jobs=args.gpu_jobs, cpu_jobs=args.cpu_jobs,
                              **{name: getattr(args, name) for name, _, _ in _SERVER_OPTIONS.values()})
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    dump_stacks_on_sigusr1()
    limits = _connection_limits(settings)

    # heavy imports (torch, transformers) only once the arguments are known to be good
    from leanserve.server.app import create_app
    from leanserve.server.engine.async_engine import AsyncLLMEngine
    from leanserve.server.image_client import ImageEngineClient

    engine_kwargs = engine_options(args)
    image_kwargs = {field: engine_kwargs[name] for name, field in _IMAGE_OPTIONS.items() if name in engine_kwargs}
    if args.max_image_batch is not None:
        image_kwargs["max_image_batch"] = args.max_image_batch
    if args.image_batch_wait is not None:
        image_kwargs["batch_wait"] = args.image_batch_wait
    if args.image_cuda_graphs:
        image_kwargs["cuda_graphs"] = True

    def make_engine(path: str, name: str | None, kind: str | None = None):
        """An unstarted engine with this server's engine options (also for models published later)."""
        if (kind or _model_kind(path)) == "image":
            return ImageEngineClient(ImageEngineConfig(model=path, served_model_name=name, **image_kwargs))
        engine = AsyncLLMEngine(EngineConfig(model=path, served_model_name=name, **engine_kwargs))
        if chat_template is not None:
            engine.tokenizer.chat_template = chat_template
        return engine

    engines = {}
    for i, (path, kind) in enumerate(zip(models, kinds)):
        engine = make_engine(path, names[i] if names else None, kind)
        if engine.model_name in engines:
            raise UserError(f"two models are served as {engine.model_name!r}; use --served-model-name")
        engines[engine.model_name] = engine

    app = create_app(settings, engines, make_engine)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=UVICORN_GRACE_S, backlog=BACKLOG,
                            http=limits.protocol_class(),
                            limit_concurrency=settings.limit_concurrency,
                            timeout_keep_alive=settings.timeout_keep_alive,
                            h11_max_incomplete_event_size=settings.h11_max_incomplete_event_size)
    server = DrainingServer(config, app.state.server)
    server.run()
    if server.engine_died:
        return 1  # a supervisor restarts the process: a dead engine does not come back by itself
    return 0 if server.started else 1


def _connection_limits(settings: ServerSettings) -> ConnectionLimits:
    wanted = settings.limit_concurrency + settings.max_idle_connections
    room = fd_budget(BACKLOG)
    if room < min(wanted, MIN_CONNECTIONS):
        raise UserError(f"the file descriptor limit (ulimit -n) leaves room for {max(room, 0)} connections; raise it")
    if room < wanted:
        logger.warning("the file descriptor limit (ulimit -n) leaves room for %d connections, not the %d of "
                       "--limit-concurrency + --max-idle-connections: connections beyond %d are closed at once",
                       room, wanted, room)
    return ConnectionLimits(max_connections=min(room, wanted), max_idle=settings.max_idle_connections,
                            timeout_headers=settings.timeout_headers, timeout_write=settings.timeout_write)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGINT/SIGTERM drains the app before uvicorn shuts down, and
    which shuts down the same way when an engine dies (its requests have ended with an error; the
    process exits with status 1 for a supervisor to restart it, as vLLM's server does)."""

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._draining = False
        self.engine_died = False

    async def serve(self, sockets=None):
        self._loop = asyncio.get_running_loop()
        install_accept_error_handler(self._loop)
        await super().serve(sockets)

    async def on_tick(self, counter: int) -> bool:
        # uvicorn's main loop calls this every 0.1 s once serving
        if not self._draining:
            dead = [name for name, engine in self.state.engines.items() if not engine.healthy]
            if dead:
                logger.error("engine %s died: shutting down", ", ".join(dead))
                self.engine_died = self._draining = True
                self._start_drain()
        return await super().on_tick(counter)

    def handle_exit(self, sig, frame):
        if not self.started or self._draining:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        # the handler runs between two bytecodes of the loop's own thread: schedule, don't await
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self):
        self._drain_task = asyncio.ensure_future(self._drain())  # keep a reference: tasks are weakly held

    async def _drain(self):
        await self.state.shutdown()
        self.should_exit = True
