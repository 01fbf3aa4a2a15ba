"""Text input for text bundles: the bundle's own tokenizer turns strings into padded token ids.

Loaded with the `tokenizers` package (Rust, no torch). Each request is padded to its own longest
sequence; the batcher pads a batch of requests to the longest among them. Over-long texts are
refused, not truncated: a silently cut review can flip its label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from exitserve.errors import BadBundle, InvalidInput
from exitserve.models.bundle import Bundle, TextSpec
from exitserve.models.tokens import pad_batch

# A token covers at most this many characters (WordPiece turns a longer word into one [UNK]), so a
# text longer than max_length x this cannot fit and is refused before the tokenizer sees it: a 40 MiB
# text would otherwise be tokenised in full (minutes of CPU, gigabytes) only to be refused after.
MAX_CHARS_PER_TOKEN = 100


class TextInputError(InvalidInput):
    """Client-side problem with the texts; the message names the offending text."""


class TextTokenizer:
    def __init__(self, bundle: Bundle):
        spec = bundle.manifest.input.text
        if spec is None:
            raise BadBundle(f"{bundle.path}: not a text bundle")
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise BadBundle(f"{bundle.path}: text bundles need the `tokenizers` package (the `text` extra)") from exc
        path = bundle.path / spec.tokenizer
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own exception type for bad files
            raise BadBundle(f"{path}: cannot load the tokenizer ({exc})") from exc
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.spec: TextSpec = spec

    def encode(self, texts: Sequence[object], where: str = "texts") -> np.ndarray:
        """Token ids [n, longest] int64, right-padded with the bundle's padding id."""
        if not isinstance(texts, (list, tuple)) or not texts:
            raise TextInputError(f"{where}: must be a non-empty list of strings")
        limit = self.spec.max_length * MAX_CHARS_PER_TOKEN
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TextInputError(f"{where}[{index}]: must be a string, got {type(text).__name__}")
            if len(text) > limit:
                raise TextInputError(f"{where}[{index}]: {len(text)} characters cannot fit the model's limit of "
                                     f"{self.spec.max_length} tokens; shorten the text")
        encodings = self.tokenizer.encode_batch(list(texts))
        lengths = [len(e.ids) for e in encodings]
        for index, length in enumerate(lengths):
            if length > self.spec.max_length:
                raise TextInputError(
                    f"{where}[{index}]: {length} tokens exceed the model's limit of {self.spec.max_length} "
                    "(special tokens included); shorten the text"
                )
        return pad_batch([e.ids for e in encodings], self.spec.pad_id)


def check_token_ids(spec: TextSpec, ids: np.ndarray, where: str = "inputs") -> None:
    """Token ids sent directly (tensor input to a text model): within the vocabulary and the length limit."""
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise TextInputError(f"{where}: token ids must be a [batch, length] matrix with length >= 1")
    if ids.shape[1] > spec.max_length:
        raise TextInputError(f"{where}: sequence length {ids.shape[1]} exceeds the model's limit of {spec.max_length}")
    if ids.size and (ids.min() < 0 or ids.max() >= spec.vocab_size):
        raise TextInputError(f"{where}: token ids must be in [0, {spec.vocab_size})")
    if ids.size and not (ids != spec.pad_id).any(axis=1).all():
        raise TextInputError(f"{where}: every sample needs at least one non-padding token")
