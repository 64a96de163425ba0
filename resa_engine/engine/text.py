"""Text in and out of an engine: prompts to token ids (plain or through the chat template), token ids
to streamed text (incremental detokenization), and stop strings that may span token boundaries."""

from __future__ import annotations

from ..sampling import find_stop


def format_prompt(tokenizer, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
    """Token ids of a plain prompt, or of chat messages rendered by the tokenizer's chat template."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        ids = tokenizer(prompt)["input_ids"]
    else:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be an object with string `role` and `content`")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; send a plain prompt instead")
        text = tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    return list(ids)


class IncrementalDetokenizer:
    """Token ids in, text pieces out; a piece is only emitted once its characters are complete.

    Decodes a short window (the last emitted piece's tokens plus the new ones) and emits the
    difference, as vLLM does: multi-byte characters split over tokens wait for their last
    byte, and tokenizers that render a token differently at the start of a text keep their
    spacing because the window starts one piece back.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still pending (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]


class TextAssembler:
    """The completion text of one request: detokenize, cut at the first stop string, hold back
    any tail that may still become a stop string (stops can span token boundaries)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = list(stops)
        self.text = ""
        self.emitted = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """(new text safe to show, stopped)."""
        self.text += self.detok.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text when generation ends for another reason (EOS, length)."""
        self.text += self.detok.flush()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        pending = self.text[self.emitted :]
        # Text already shown never holds part of a stop string (it was held back), so search only the rest.
        hit = find_stop(pending, self.stops) if self.stops else None
        if hit is not None:
            self.text = self.text[: self.emitted + hit]
            return self._emit(len(self.text)), True
        hold = 0 if final else _stop_prefix_len(pending, self.stops)
        return self._emit(len(self.text) - hold), False

    def _emit(self, end: int) -> str:
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
