"""The `leanserve` command.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args)`;
the module is imported only when its command is chosen, so `leanserve --help` stays fast
and one command's heavy imports never slow another.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from leanserve import __version__
from leanserve.errors import UserError

# command words -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("serve",): ("leanserve.server.serve", "serve chat and image models over an OpenAI-compatible API"),
    ("data", "build"): ("leanserve.data.build", "build the local corpora, tasks and chat sets with a manifest"),
    ("data", "tokenizer"): ("leanserve.data.tokenizer", "train the byte-level BPE tokenizer on built data"),
    ("train", "lm"): ("leanserve.trainers.lm", "pretrain then chat-finetune a Llama-architecture LM"),
    ("train", "diffusion"): ("leanserve.trainers.diffusion", "train a text-to-image diffusion teacher (diffusers layout)"),
    ("train", "dpm-ot"): ("leanserve.trainers.dpm_ot", "fit a DPM-OT map (semi-discrete OT jump to t') for an image teacher"),
    ("distill", "sid"): ("leanserve.trainers.sid", "distil a diffusion teacher into a 1..K-step SiD generator"),
    ("eval", "lm"): ("leanserve.eval.lm", "held-out perplexity per domain and task exact-match of an LM"),
    ("eval", "images"): ("leanserve.eval.images", "FD, KID, alignment, diversity and images/s of an image model"),
    ("eval", "sid"): ("leanserve.eval.sid", "SiD generators against their teacher: FD, alignment, diversity; JSON + plot"),
    ("eval", "dpm-ot"): ("leanserve.eval.dpm_ot", "DPM-OT maps against fast solvers and controls: FD vs NFE, memorisation"),
    ("eval", "classifier"): ("leanserve.eval.classifier", "train the shapes attribute classifier behind the image metrics"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line, not usage + traceback
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


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
