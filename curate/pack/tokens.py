"""Counting a caption's tokens: a real tokenizer from a local file, or a labelled approximation.

A packed sequence must never exceed the model's context, so the count should
come from the tokenizer the model trains with: a ``tokenizers`` JSON file
(``tokenizer.json``) or a transformers tokenizer directory, always a *local*
path (no hub downloads here). Without one, :class:`ApproximateCounter` counts
``max(words, ceil(utf-8 bytes / 4))`` — BPE vocabularies of English-trained
models average about four bytes per token — and says so: ``exact`` is False,
a warning is logged, and the packed outputs record ``token_count: approximate``.

>>> c = make_counter(None)
>>> c.exact, c.count(["a red circle", ""])
(False, [3, 0])
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

BYTES_PER_TOKEN = 4  # typical for English BPE vocabularies (GPT-2, Qwen2, LLaMA): about 4 UTF-8 bytes/token
TOKENIZER_FILE = "tokenizer.json"  # what `tokenizers` and transformers' fast tokenizers save


class TokenCounter:
    """Counts the tokens of texts, without special tokens (the caller adds BOS/EOS)."""

    exact: bool = True
    description: str = ""

    def count(self, texts: list[str]) -> list[int]:  # pragma: no cover - contract
        raise NotImplementedError

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` with at most ``max_tokens`` tokens.

        A binary search over character prefixes, keeping only prefixes whose count was
        checked, so the result never exceeds the limit (merges make counts only nearly
        monotone in the prefix length). Truncation is rare: a dozen encodes per caption.
        """
        if max_tokens <= 0:
            return ""
        if self.count([text])[0] <= max_tokens:
            return text
        lo, hi = 0, len(text)  # count(text[:lo]) <= max_tokens < count(text[:hi])
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.count([text[:mid]])[0] <= max_tokens:
                lo = mid
            else:
                hi = mid
        return text[:lo]


class ApproximateCounter(TokenCounter):
    """No tokenizer given: ``max(words, ceil(bytes / BYTES_PER_TOKEN))`` — an estimate, labelled so."""

    exact = False
    description = f"approximate: max(words, ceil(utf8_bytes / {BYTES_PER_TOKEN}))"

    def count(self, texts: list[str]) -> list[int]:
        return [max(len(t.split()), math.ceil(len(t.encode("utf-8")) / BYTES_PER_TOKEN)) for t in texts]


class HFTokenizerCounter(TokenCounter):
    """A Hugging Face ``tokenizers`` tokenizer loaded from a local JSON file or directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tokenizer = load_tokenizer(self.path)
        self.tokenizer.no_truncation()  # a saved truncation/padding setting would change the counts
        self.tokenizer.no_padding()
        self.description = f"tokenizer: {self.path}"

    def count(self, texts: list[str]) -> list[int]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encodings]


def load_tokenizer(path: Path):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` (a file, or a directory holding one),
    else from a transformers tokenizer directory (its fast backend). Errors name the path."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise RuntimeError("counting tokens needs the `tokenizers` package: pip install tokenizers") from e
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} does not exist (a tokenizer.json file or a tokenizer "
                                "directory is expected; hub names are not downloaded)")
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if file.is_file():
        try:
            return Tokenizer.from_file(str(file))
        except Exception as e:
            raise ValueError(f"tokenizer {file} is not a valid `tokenizers` JSON file: {e}") from e
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ValueError(f"tokenizer directory {path} has no {TOKENIZER_FILE}; loading it needs transformers "
                         "(pip install transformers)") from e
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ValueError(f"tokenizer directory {path} could not be loaded by transformers: {e}") from e
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer {path} has no fast (tokenizers) backend; save it with "
                         "tokenizer.save_pretrained() from a fast tokenizer so it writes tokenizer.json")
    return backend


def make_counter(tokenizer: str | None) -> TokenCounter:
    """The counter for a ``pack`` stage's ``tokenizer`` option (None: the approximation, with a warning)."""
    if tokenizer is None:
        log.warning("pack: no tokenizer given, caption token counts are approximate (%s); set "
                    "`tokenizer:` to the model's tokenizer.json for exact counts", ApproximateCounter.description)
        return ApproximateCounter()
    return HFTokenizerCounter(tokenizer)
