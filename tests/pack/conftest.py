"""Fixtures for the packing tests: a real tokenizer, trained here (no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest

CORPUS = [
    "a red circle on a white background",
    "two blue squares next to a green triangle",
    "a photo of a small dog running on the beach at sunset",
    "an orange cat sleeping on a wooden chair near the window",
    "the quick brown fox jumps over the lazy dog",
] * 20


def train_tokenizer(path: Path) -> Path:
    """A tiny BPE (small vocabulary, so words split into several tokens) with a BOS/EOS template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "[BOS]", "[EOS]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", tok.token_to_id("[BOS]")), ("[EOS]", tok.token_to_id("[EOS]"))])
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")
