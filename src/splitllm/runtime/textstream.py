"""Streaming text: tokens in, text deltas out, never splitting a multi-byte character."""

from __future__ import annotations

from collections.abc import Callable

from splitllm.runtime.models import LoadedModel


class TextStream:
    """Turns tokens into text deltas as they arrive, holding back incomplete UTF-8.

    Each token decodes only a window of recent tokens (from the last token already shown, as in
    text-generation-inference's decode_token), not the whole output: the streamed text is that
    of decoding the whole sequence, at a constant cost per token.
    """

    def __init__(self, loaded: LoadedModel, on_text: Callable[[str], None] | None) -> None:
        self.tokenizer = loaded.tokenizer
        self.on_text = on_text
        self.tokens: list[int] = []
        self._pieces: list[str] = []  # what on_text got, in order
        self._shown = 0  # characters in them
        self._text: str | None = None  # the whole decode, once finished
        self._prefix = 0  # the window starts here: tokens[_prefix:_read] are already shown
        self._read = 0  # tokens before this are in self.text

    def push(self, token: int) -> None:
        self.tokens.append(token)
        if self.tokenizer is None:
            return
        shown = self._decode(self.tokens[self._prefix:self._read])
        text = self._decode(self.tokens[self._prefix:])
        if len(text) <= len(shown) or text.endswith("\ufffd"):  # nothing new, or an incomplete
            return  # multi-byte character: wait for more
        self._prefix, self._read = self._read, len(self.tokens)
        self._emit(text[len(shown):])

    def finish(self) -> None:
        """Flush what is left (a generation may end inside a multi-byte character)."""
        if self.tokenizer is not None:
            self._text = self._decode(self.tokens)
            self._emit(self._text[self._shown:])

    @property
    def text(self) -> str:
        """The text so far; once finished, the decode of all tokens."""
        return self._text if self._text is not None else "".join(self._pieces)

    def _decode(self, tokens: list[int]) -> str:
        assert self.tokenizer is not None
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True)) if tokens else ""

    def _emit(self, delta: str) -> None:
        if delta:
            self._pieces.append(delta)
            self._shown += len(delta)
            if self.on_text is not None:
                self.on_text(delta)
