"""The checkpoint's byte-level BPE tokenizer, through the `tokenizers` library, and a streaming
decoder that never prints half a multi-byte character."""
from __future__ import annotations

from ..errors import FastGPT2Error

from pathlib import Path


class TokenizerError(FastGPT2Error):
    """No usable tokenizer files in a checkpoint directory."""


def load_tokenizer(directory: str | Path):
    """tokenizer.json, else vocab.json + merges.txt (GPT-2's byte-level BPE), from `directory`."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import ByteLevelBPETokenizer

    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(directory / "tokenizer.json"))
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if vocab.is_file() and merges.is_file():
        return ByteLevelBPETokenizer(str(vocab), str(merges), add_prefix_space=False)
    raise TokenizerError(
        f"{directory} has no tokenizer: expected tokenizer.json, or vocab.json and merges.txt. "
        "Pass token ids instead, or copy the tokenizer files of the model into the directory."
    )


class StreamDecoder:
    """Feed token ids one step at a time; get back the new text that is complete. A byte-level token
    can end inside a UTF-8 character: that text is held until the character's last byte arrives."""

    def __init__(self, tokenizer, prompt_ids=()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.printed = tokenizer.decode(self.ids) if self.ids else ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete character: wait for its remaining bytes
            return ""
        new, self.printed = text[len(self.printed):], text
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.printed = text[len(self.printed):], text
        return new
