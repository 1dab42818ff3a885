"""Per-request text tracking: stop strings (also ones split across tokens) and streaming deltas.

A stop string is looked for in the decoded text, never in token ids, so "\\n\\n" is found whether the
model emitted it as one token or as two "\\n" tokens. Decoding the whole completion after every
token would cost O(n^2); instead the last `window` tokens are decoded (enough to hold the longest
stop string even at one byte per token, 4 per character), and only on a hit is the full text
decoded to cut it exactly before the stop string. The completing token stays in `token_ids`.

Streaming emits text deltas that are final: it holds back an incomplete UTF-8 character (the
replacement character U+FFFD at the end) and any tail that could still grow into a stop string.
"""

from __future__ import annotations


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` are not yet safe to show."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


class TextTracker:
    """Follows one completion's tokens: `push` returns True when a stop string has appeared."""

    def __init__(self, tokenizer, stops: tuple[str, ...], streaming: bool):
        self.tokenizer, self.stops, self.streaming = tokenizer, stops, streaming
        self.ids: list[int] = []
        self.text: str | None = None  # set once the completion ends (or, when streaming, as it grows)
        self.emitted = 0
        self.window = 4 * max((len(s) for s in stops), default=0) + 4

    def push(self, token_id: int) -> bool:
        self.ids.append(token_id)
        if not self.stops:
            return False
        tail = decode(self.tokenizer, self.ids[-self.window:])
        return any(s in tail for s in self.stops)

    def finish(self, stopped: bool) -> str:
        """Final text: the decoded completion, cut before the first stop string when stopped."""
        text = decode(self.tokenizer, self.ids)
        if stopped:
            cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=len(text))
            text = text[:cut]
        self.text = text
        return text

    def delta(self, final: bool = False) -> str:
        """Text not yet emitted that is safe to show (everything left when final)."""
        text = self.text if final else decode(self.tokenizer, self.ids)
        end = len(text) if final else len(text) - held_back(text, self.stops)
        out = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out
