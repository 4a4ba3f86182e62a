"""The `pack` stage: token counts from a real tokenizer (or a labelled estimate), drops and truncation."""

from __future__ import annotations

import logging

import pyarrow as pa
import pytest
from pydantic import ValidationError

from curate import rows
from curate.errors import CurateError
from curate.pack.tokens import ApproximateCounter, HFTokenizerCounter
from curate.stages.base import StageContext
from curate.stages.pack import Pack, PackConfig


def batch(captions: list[str | None], images: list[bytes | None] | None = None) -> pa.Table:
    n = len(captions)
    images = images if images is not None else [b"\xff\xd8jpeg"] * n
    return pa.table({
        rows.KEY: [f"k{i:03d}" for i in range(n)], rows.URL: [None] * n, rows.CAPTION: pa.array(captions, pa.string()),
        rows.STATUS: [rows.KEPT] * n, rows.DROPPED_BY: pa.nulls(n, pa.string()), rows.REASON: pa.nulls(n, pa.string()),
        rows.IMAGE: pa.array(images, pa.binary()),
    })


def stage(**options) -> Pack:
    s = Pack(PackConfig(**options))
    s.check()
    s.setup(StageContext())
    return s


def test_counts_equal_the_tokenizers_encode(tokenizer_file):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    captions = ["a red circle on a white background", "zebra xylophone quantum", "", "dog dog dog dog"]
    out = stage(tokenizer=str(tokenizer_file))(batch(captions, [b"img", b"img", None, b"img"]))
    text_tokens = out["text_tokens"].to_pylist()
    assert text_tokens == [len(tok.encode(c, add_special_tokens=False).ids) for c in captions]
    assert text_tokens[1] > 3  # unseen words split into many BPE pieces: not a word count
    # num_tokens = image tokens + the tokenizer's own encode with its BOS/EOS template
    assert out["num_tokens"].to_pylist() == [144 * (img is not None) + len(tok.encode(c).ids)
                                             for c, img in zip(captions, [1, 1, None, 1], strict=True)]
    assert out["num_tokens"].type == pa.int32()
    assert out[rows.STATUS].to_pylist() == [rows.KEPT] * 4
    assert HFTokenizerCounter(tokenizer_file.parent).count(captions) == text_tokens  # a directory works too


def test_transformers_tokenizer_directory(tokenizer_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]")
    fast.save_pretrained(tmp_path / "hf")
    caps = ["a small dog on the beach", "quantum"]
    assert HFTokenizerCounter(tmp_path / "hf").count(caps) == [len(fast(c, add_special_tokens=False)["input_ids"])
                                                               for c in caps]


def test_over_long_samples_are_dropped_with_a_reason(tokenizer_file):
    s = stage(tokenizer=str(tokenizer_file), max_tokens=20, image_tokens=8)
    short, long = "a red circle", "the quick brown fox jumps over the lazy dog " * 3
    out = s(batch([short, long, None]))
    assert out[rows.STATUS].to_pylist() == [rows.KEPT, rows.DROPPED, rows.KEPT]
    assert out[rows.REASON].to_pylist() == [None, "too_long_for_sequence", None]
    assert out[rows.DROPPED_BY].to_pylist() == [None, "pack", None]
    assert out[rows.IMAGE][1].as_py() is None  # a dropped row releases its bytes
    assert out["num_tokens"][2].as_py() == 8 + 2  # no caption: image + BOS/EOS
    bare = stage(special_tokens=0)(batch(["", "a"], [None, None]))
    assert bare[rows.REASON].to_pylist() == ["empty_sample", None]  # nothing to pack, not a zero length


def test_truncate_cuts_the_text_to_fit(tokenizer_file):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    s = stage(tokenizer=str(tokenizer_file), max_tokens=20, image_tokens=8, on_overflow="truncate")
    long = "the quick brown fox jumps over the lazy dog " * 3
    out = s(batch(["a red circle", long]))
    assert out[rows.STATUS].to_pylist() == [rows.KEPT, rows.KEPT]
    assert out["pack_truncated"].to_pylist() == [False, True]
    cut = out["pack_text"][1].as_py()
    assert out["pack_text"][0].as_py() is None and long.startswith(cut) and len(cut) < len(long)
    n = len(tok.encode(cut, add_special_tokens=False).ids)
    assert n <= 20 - 8 - 2 and out["text_tokens"][1].as_py() == n
    assert out["num_tokens"][1].as_py() == 8 + 2 + n <= 20
    assert len(tok.encode(long[:len(cut) + 1], add_special_tokens=False).ids) > 10  # the longest prefix that fits
    assert out[rows.CAPTION][1].as_py() == long  # the caption itself stays whole (ledger, shards)


def test_rows_dropped_earlier_are_untouched(tokenizer_file):
    b = batch(["a red circle", "two blue squares"])
    b = rows.mark_dropped(b, [None, "caption_junk"], "caption_rules")
    out = stage(tokenizer=str(tokenizer_file))(b)
    assert out[rows.REASON].to_pylist() == [None, "caption_junk"]
    assert out[rows.CAPTION].to_pylist() == ["a red circle", "two blue squares"]
    assert out["num_tokens"][1].as_py() is None


def test_without_a_tokenizer_counts_are_approximate_and_say_so(caplog):
    with caplog.at_level(logging.WARNING, logger="curate.pack.tokens"):
        s = stage()
    assert "approximate" in caplog.text
    assert not s.counter.exact and isinstance(s.counter, ApproximateCounter)
    out = s(batch(["a red circle", "supercalifragilisticexpialidocious"]))
    # max(words, ceil(bytes / 4)): 3 words/12 bytes -> 3; one 34-byte word -> 9
    assert out["text_tokens"].to_pylist() == [3, 9]
    assert out["num_tokens"].to_pylist() == [149, 155]
    trunc = stage(max_tokens=160, on_overflow="truncate")(batch(["word " * 40]))
    assert trunc["num_tokens"][0].as_py() <= 160 and trunc["pack_truncated"][0].as_py()


def test_bad_options_and_tokenizer_paths_fail_clearly(tmp_path):
    with pytest.raises(ValidationError, match="leave no room for text"):
        PackConfig(max_tokens=100, image_tokens=98)
    with pytest.raises(CurateError, match=f"tokenizer {tmp_path / 'nope.json'} does not exist"):
        stage(tokenizer=str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CurateError, match="not a valid `tokenizers` JSON file"):
        stage(tokenizer=str(bad))
    with pytest.raises(CurateError, match="no column 'recaption'"):
        stage(text_column="recaption")(batch(["a"]))
