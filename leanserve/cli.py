"""The `leanserve` command.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args)`;
the module is imported only when its command is chosen, so `leanserve --help` stays fast
and one command's heavy imports never slow another.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import sys

from leanserve import __version__
from leanserve.errors import UserError

# command words -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("serve",): ("leanserve.server.serve", "serve chat and image models over an OpenAI-compatible API"),
    ("data", "build"): ("leanserve.data.build", "build the local corpora, tasks and chat sets with a manifest"),
    ("data", "tokenizer"): ("leanserve.data.tokenizer", "train the byte-level BPE tokenizer on built data"),
    ("train", "lm"): ("leanserve.trainers.lm", "pretrain then chat-finetune a Llama-architecture LM (dense, MoE or MoE++)"),
    ("train", "diffusion"): ("leanserve.trainers.diffusion", "train a text-to-image diffusion teacher (diffusers layout)"),
    ("train", "dpm-ot"): ("leanserve.trainers.dpm_ot", "fit a DPM-OT map (semi-discrete OT jump to t') for an image teacher"),
    ("train", "sgld"): ("leanserve.trainers.sgld", "SGLD posterior samples of a trained LM, written as an ensemble directory"),
    ("train", "rlvr"): ("leanserve.trainers.rlvr", "RL with verifiable rewards (GRPO) of a chat LM on a mixture of task groups"),
    ("distill", "sid"): ("leanserve.trainers.sid", "distil a diffusion teacher into a 1..K-step SiD generator"),
    ("compress", "moa"): ("leanserve.compressors.moa", "give each KV head its own attention span (MoA) at a KV density"),
    ("mixture", "fit"): ("leanserve.eval.mixture_fit", "fit Scheffé surrogates to pilot runs' scores; the best mixtures in a trust region"),
    ("eval", "lm"): ("leanserve.eval.lm", "held-out perplexity, calibration and task exact-match of an LM or ensemble"),
    ("eval", "images"): ("leanserve.eval.images", "FD, KID, alignment, diversity and images/s of an image model"),
    ("eval", "sid"): ("leanserve.eval.sid", "SiD generators against their teacher: FD, alignment, diversity; JSON + plot"),
    ("eval", "dpm-ot"): ("leanserve.eval.dpm_ot", "DPM-OT maps against fast solvers and controls: FD vs NFE, memorisation"),
    ("eval", "bayes"): ("leanserve.eval.bayes", "Bayesian mixtures: exact CTW regret (C1) against KT learners; JSON + plot"),
    ("eval", "classifier"): ("leanserve.eval.classifier", "train the shapes attribute classifier behind the image metrics"),
    ("eval", "moa"): ("leanserve.eval.moa", "MoA plans against dense and a uniform window: retrieval by position "
                                            "and length, response perplexity; JSON + plot"),
    ("eval", "leakage"): ("leanserve.eval.leakage", "what a noise schedule's late x_t still shows of the image: "
                                                    "background and position probes; JSON + plot"),
    ("jobs",): ("leanserve.server.jobs.client", "submit, list, show, follow, cancel and resume jobs of a running server (/v1/jobs)"),
}
# commands `leanserve serve` runs as jobs (POST /v1/jobs): each writes its output to --out and
# continues from its last checkpoint there with --resume
JOB_COMMANDS = [("train", "lm"), ("train", "diffusion"), ("distill", "sid"), ("train", "dpm-ot"), ("train", "sgld"),
                ("train", "rlvr"), ("compress", "moa")]
# options of job commands that name files or directories to read: the server confines them
PATH_OPTIONS = ("data", "tokenizer", "vae", "teacher", "model", "warm_start")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line, not usage + traceback
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


class _ArgsError(Exception):
    pass


class _CheckingParser(_Parser):
    def error(self, message: str):
        raise _ArgsError(f"{self.prog}: {message}")

    def exit(self, status=0, message=None):  # --help, --version
        raise _ArgsError(f"{self.prog}: --help and --version are not job arguments")


def _check_job(command: str, argv: list[str]) -> dict:
    from leanserve.runtime import resolve_device

    words = tuple(command.split())
    if words not in JOB_COMMANDS:
        known = ", ".join(" ".join(w) for w in JOB_COMMANDS)
        what = "is not a leanserve command" if words not in COMMANDS else "does not run as a job"
        return {"error": f"{command!r} {what}; jobs run: {known}"}
    module_name, help_ = COMMANDS[words]
    parser = _CheckingParser(prog="leanserve " + command, description=help_)
    importlib.import_module(module_name).add_arguments(parser)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # stdout carries the answers
            args = parser.parse_args(argv)
        device = resolve_device(getattr(args, "device", "auto")).type
    except (_ArgsError, UserError) as e:
        return {"error": str(e)}
    paths = {dest: getattr(args, dest) for dest in PATH_OPTIONS if getattr(args, dest, None) is not None}
    return {"paths": paths, "device": device}


def check_jobs() -> int:
    """`leanserve --check-jobs`: the job-argument checker `leanserve serve` runs beside itself (the
    server may not import the commands). One JSON request a line on stdin, {"command": "train lm",
    "argv": [...]}, one answer a line on stdout: {"error": the parser's message} or {"paths": {option
    dest: value} of PATH_OPTIONS, "device": "cpu" | "cuda"}. Long-lived, so that each command's
    module is imported once rather than on every request."""
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.write(json.dumps(_check_job(request["command"], request["argv"])) + "\n")
        sys.stdout.flush()
    return 0


def _usage() -> str:
    lines = [f"leanserve {__version__}", "", "usage: leanserve COMMAND [options]   (leanserve COMMAND --help)", ""]
    for words, (_, help_) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<18} {help_}")
    return "\n".join(lines)


def _find_command(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    for n in (2, 1):
        key = tuple(argv[:n])
        if key in COMMANDS:
            return key, argv[n:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    if argv[0] == "--check-jobs":
        return check_jobs()
    found = _find_command(argv)
    if found is None:
        sys.stderr.write(f"leanserve: error: unknown command '{' '.join(argv[:2])}' (see leanserve --help)\n")
        return 2
    words, rest = found
    module_name, help_ = COMMANDS[words]
    module = importlib.import_module(module_name)
    parser = _Parser(prog="leanserve " + " ".join(words), description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return module.run(args) or 0
    except UserError as e:
        sys.stderr.write(f"leanserve {' '.join(words)}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
