"""Incremental detokenization with stop strings (vLLM's prefix/read-offset scheme).

Decoding token by token is wrong for byte-level BPE (one character may span several tokens) and
for SentencePiece (a token's leading space depends on its left neighbour). So each step decodes a
small window of recent ids twice, with and without the new ones, and emits the difference; a
window whose text ends in U+FFFD is an incomplete UTF-8 sequence and waits for more tokens.
"""
from __future__ import annotations

# prompt tokens kept as left context, so the first output token decodes as it would mid-text
_PROMPT_CONTEXT = 5
_REPLACEMENT_CHAR = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str] | None = None,
                 skip_special_tokens: bool = True, min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.min_tokens = min_tokens
        self.ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.num_output_tokens = 0
        self.output_text = ""  # everything decoded so far (cut at a matched stop string)
        self.num_emitted = 0   # chars of output_text already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, allow_incomplete: bool) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or (full_text.endswith(_REPLACEMENT_CHAR) and not allow_incomplete):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full_text[len(prefix_text):]

    def update(self, token_id: int) -> str | None:
        """Add one generated token; returns the stop string it completed, if any (the text is then
        cut before it and nothing more is ever emitted)."""
        self.ids.append(token_id)
        self.num_output_tokens += 1
        start = len(self.output_text)
        self.output_text += self._advance(allow_incomplete=False)
        if not self.stop or self.num_output_tokens < self.min_tokens:
            return None
        # only matches that end in the new text: earlier ones were seen (or deliberately skipped
        # under min_tokens) in earlier steps
        best: tuple[int, str] | None = None
        for s in self.stop:
            pos = self.output_text.find(s, max(0, start - len(s) + 1))
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return None
        self.output_text = self.output_text[:best[0]]
        return best[1]

    def flush(self) -> None:
        """At the end of a sequence (not cut by a stop string): decode whatever an incomplete
        UTF-8 sequence held back, replacement character included."""
        self.output_text += self._advance(allow_incomplete=True)

    def _held_back(self) -> int:
        """Length of the longest tail of output_text that could still grow into a stop string."""
        text, longest = self.output_text, 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if s.startswith(text[-n:]):
                    longest = n
                    break
        return longest

    def take_delta(self, finished: bool) -> str:
        """The text not yet emitted; while running, minus a possible stop-string prefix."""
        end = len(self.output_text) if finished else len(self.output_text) - self._held_back()
        if end <= self.num_emitted:
            return ""
        delta = self.output_text[self.num_emitted:end]
        self.num_emitted = end
        return delta
