"""Byte-level BPE tokenizer trained locally, saved as a transformers tokenizer directory.

Special tokens and the chat template follow Llama 3, so prompts look like a real
Llama-3-Instruct model's and the same serving code handles both.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from leanserve.errors import UserError

BOS, EOS, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|pad|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, EOT, PAD, HEADER_START, HEADER_END]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + text | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 8192,
                    model_max_length: int = 1024):
    """Train a byte-level BPE on `texts` and save it (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # Plain encode() adds BOS like Llama 3; apply_chat_template encodes without special
    # tokens and takes BOS from the template, so it is never doubled.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD,
        additional_special_tokens=[EOS, HEADER_START, HEADER_END],
        model_max_length=model_max_length, chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a generation: end of turn and end of text."""
    return [tokenizer.convert_tokens_to_ids(t) for t in (EOT, EOS)]


def _iter_texts(data_dir: Path) -> Iterator[str]:
    """Training text for the tokenizer: every train split of a `leanserve data build` output."""
    for path in sorted(data_dir.glob("*/train.jsonl")):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if "text" in row:
                    yield row["text"]
                for m in row.get("messages", []):
                    yield m["content"]


def add_arguments(p):
    p.add_argument("--data", required=True, help="output directory of `leanserve data build`")
    p.add_argument("--out", required=True, help="tokenizer directory to write")
    p.add_argument("--vocab-size", type=int, default=8192)


def run(args):
    data = Path(args.data)
    if not (data / "manifest.json").is_file():
        raise UserError(f"{data} is not a built data directory (no manifest.json); run `leanserve data build` first")
    fast = train_tokenizer(_iter_texts(data), args.out, vocab_size=args.vocab_size)
    print(f"tokenizer: {len(fast)} tokens -> {args.out}")
