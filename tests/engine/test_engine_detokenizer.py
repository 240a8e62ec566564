"""Incremental detokenization: multi-byte characters split across tokens, stop strings spanning
tokens (never emitted, nothing after them), held-back stop-string prefixes, special tokens."""
from __future__ import annotations

import pytest

from leanserve.server.engine.detokenizer import Detokenizer


@pytest.fixture(scope="module")
def tok(tiny_llm_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_llm_dir)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def stream(tok, text: str, prompt: str = "Q: ", **kwargs) -> tuple[list[str], str | None, Detokenizer]:
    """Feed `text`'s tokens one by one as the engine does; returns deltas, matched stop, detokenizer."""
    detok = Detokenizer(tok, encode(tok, prompt), **kwargs)
    deltas, stop = [], None
    for t in encode(tok, text):
        stop = detok.update(t)
        deltas.append(detok.take_delta(finished=stop is not None))
        if stop is not None:
            return deltas, stop, detok
    detok.flush()
    deltas.append(detok.take_delta(finished=True))
    return deltas, None, detok


def test_multibyte_characters_split_across_tokens(tok):
    text = "héllo 世界 🙂 ok"
    ids = encode(tok, text)
    assert len(ids) > len(text.split())  # byte-level pieces: characters do span several tokens
    deltas, stop, _ = stream(tok, text)
    assert stop is None
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas[:-1]  # some steps held an incomplete character back


def test_trailing_incomplete_character_is_flushed_at_the_end(tok):
    ids = encode(tok, "ok 🙂")
    detok = Detokenizer(tok, encode(tok, "Q: "))
    for t in ids[:-1]:  # stop inside the emoji's bytes
        detok.update(t)
    assert "\ufffd" not in detok.take_delta(finished=False)
    detok.flush()
    assert detok.take_delta(finished=True).endswith("\ufffd")


def test_stop_string_spanning_tokens(tok):
    text, stop = "1 + 2 = 3 and more", "2 = 3"
    ids = encode(tok, text)
    pieces = [tok.decode([t]) for t in ids]
    assert stop not in pieces  # the stop string is made of several tokens
    deltas, matched, detok = stream(tok, text, stop=[stop])
    assert matched == stop
    assert "".join(deltas) == "1 + " == detok.output_text


def test_possible_stop_prefix_is_held_back_then_released(tok):
    text = "1 + 2 = 3"
    deltas, matched, _ = stream(tok, text, stop=["= 5"])
    assert matched is None and "".join(deltas) == text
    # the step that produced "=" must not emit it: it could have begun "= 5"
    emitted = ""
    for d in deltas[:-1]:
        emitted += d
        assert not emitted.endswith("=") and not emitted.endswith("= ")


def test_earliest_stop_string_wins(tok):
    deltas, matched, _ = stream(tok, "a long line of text", stop=["text", "long"])
    assert matched == "long" and "".join(deltas) == "a "


def test_stop_strings_wait_for_min_tokens(tok):
    text = "1 + 2 = 3 + 4"
    n_first = len(encode(tok, "1 + 2"))
    deltas, matched, _ = stream(tok, text, stop=["+"], min_tokens=n_first + 1)
    # the first "+" came before min_tokens and is kept; the second one stops
    assert matched == "+" and "".join(deltas) == "1 + 2 = 3 "


def test_skip_special_tokens(tok):
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    ids = encode(tok, "ab") + [eot] + encode(tok, " cd")
    for skip, want in ((True, "ab cd"), (False, "ab<|eot_id|> cd")):
        detok = Detokenizer(tok, [], skip_special_tokens=skip)
        for t in ids:
            detok.update(t)
        assert detok.take_delta(finished=True) == want


def test_first_token_decodes_in_context(tok):
    prompt, text = "x = 12", "34 + 5"
    deltas, _, _ = stream(tok, text, prompt=prompt)
    full = tok.decode(encode(tok, prompt) + encode(tok, text))
    assert full == tok.decode(encode(tok, prompt)) + "".join(deltas)
