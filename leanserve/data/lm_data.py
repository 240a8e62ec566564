"""Token data of the language models, read from a `leanserve data build` directory: splits, the chat
tokenizer, packed document streams and their windows, labelled chat examples, padded batches and the
chat phase's batch sampler (pretraining batches: data/mixture.py). What `train lm` trains on and
`eval lm` scores, read alike, so that train-time validation losses and test losses are comparable.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from leanserve.data.build import read_jsonl
from leanserve.data.tokenizer import EOS, stop_token_ids
from leanserve.errors import UserError

IGNORE = -100  # label of tokens that carry no loss (prompts, padding)


def read_split(data: Path, manifest: dict, domain: str, split: str) -> list[dict]:
    """Rows of one split of a built data directory ([] if the build has no such split)."""
    entry = manifest["splits"].get(domain, {}).get(split)
    if entry is None:
        return []
    path = data / entry["path"]
    if not path.is_file():
        raise UserError(f"{path} is missing; rebuild {data} with `leanserve data build`")
    return list(read_jsonl(path))


def load_tokenizer(path: str | Path):
    """The chat tokenizer (leanserve/data/tokenizer.py conventions), checked for what training needs."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise UserError(f"{path} is not a tokenizer directory (no tokenizer.json); "
                        "run `leanserve data tokenizer` first")
    tok = AutoTokenizer.from_pretrained(path)
    if not tok.chat_template:
        raise UserError(f"tokenizer {path} has no chat_template")
    special = [tok.bos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids(EOS), *stop_token_ids(tok)]
    if any(t is None or t == tok.unk_token_id for t in special):
        raise UserError(f"tokenizer {path} lacks leanserve's special tokens (bos, pad, {EOS}, end of turn)")
    return tok


def encode_documents(tokenizer, texts: list[str]):
    """One packed stream `<bos> doc <end_of_text> <bos> doc ...`: what pretraining and perplexity read."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    # documents may be longer than the context (they are packed and windowed): no length warning
    ids = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"] if texts else []
    return torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.long)


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation; only assistant replies and their end-of-turn carry loss.

    Each prompt (the conversation so far plus the assistant header) is tokenized in one piece,
    exactly as the server tokenizes a chat prompt, and each reply on its own: training then sees
    the token boundary the model meets when it generates.
    """
    def render(msgs, add_generation_prompt=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(text):
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], add_generation_prompt=True), render(messages[: i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError("the tokenizer's chat template does not render a conversation as a prefix of its "
                            "continuation; assistant tokens cannot be labelled")
        prompt_ids, reply_ids = encode(prompt[len(done):]), encode(full[len(prompt):])
        ids += prompt_ids + reply_ids
        labels += [IGNORE] * len(prompt_ids) + reply_ids
        done = full
    return ids, labels


def chat_examples(tokenizer, rows: list[dict], seq_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(ids, labels) of chat rows cut to seq_len, dropping any left without a labelled token;
    and how many were cut."""
    examples, truncated = [], 0
    for row in rows:
        ids, labels = encode_chat(tokenizer, row["messages"])
        if len(ids) > seq_len:
            ids, labels, truncated = ids[:seq_len], labels[:seq_len], truncated + 1
        if any(t != IGNORE for t in labels[1:]):
            examples.append((ids, labels))
    return examples, truncated


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, length: int | None = None) -> dict:
    """Right-padded batch, to `length` or the longest example. No attention mask: under causal
    attention no real token can see the padding after it, and without a mask SDPA keeps its
    fused (flash) kernels; the padding's own outputs carry no labels."""
    length = length or max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        labels[row, : len(lab)] = torch.as_tensor(lab)
    return {"input_ids": input_ids, "labels": labels}


def batched(examples: list, batch_size: int, pad_id: int) -> list[dict]:
    """Consecutive batches of `batch_size` examples (the last may be smaller), each padded to its longest."""
    return [collate(examples[i:i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


def stream_windows(stream, seq_len: int, max_windows: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Consecutive non-overlapping windows of a packed stream, as (ids, labels) examples."""
    chunks = stream.split(seq_len)[:max_windows]
    return [(c.tolist(), c.tolist()) for c in chunks if len(c) > 1]


@dataclass
class ChatExamples:
    """Chat examples drawn with replacement, padded to `seq_len`."""
    examples: list[tuple[list[int], list[int]]]
    pad_id: int
    seq_len: int

    def sample(self, batch_size: int, generator) -> dict:
        idx = torch.randint(len(self.examples), (batch_size,), generator=generator).tolist()
        # one fixed shape: on an H200, batches padded to their own (varying) length ran 4x
        # slower per step than batches padded to 1024 (CUDA allocator churn), despite 5x fewer tokens
        return collate([self.examples[i] for i in idx], self.pad_id, self.seq_len)
