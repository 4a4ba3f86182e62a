"""The in-process backend: a tiny randomly initialised LLaVA built here, loaded through the real path.

No download: the tokenizer is built with the ``tokenizers`` library, the model from a
tiny config, both saved to a temporary directory and loaded by ``AutoProcessor`` /
``AutoModelForImageTextToText`` in a Ray actor on CPU, as a real checkpoint would be.
Its vocabulary has no digits, so its replies can never parse as a score.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import CurateError
from curate.recipe import load_recipe
from curate.runner import run
from curate.stages.mlm_filter import MLMFilterConfig
from curate.vlm.base import Ask
from curate.vlm.transformers_backend import TransformersBackend, check_model
from tests.conftest import jpeg_bytes

IMAGE_SIZE = 32
CHAT_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    """Save a 1-layer LLaVA (CLIP vision tower + Llama text model) and its processor; return the directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    out = tmp_path_factory.mktemp("tiny-llava")
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    letters = [chr(c) for c in range(33, 127) if not chr(c).isdigit()]
    words = "a the of and is in on with image caption score photo red square ASSISTANT".split()
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + letters + words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=16, image_token="<image>",
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=16),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_index=vocab["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_backend_generates_text_in_batches(tiny_vlm):
    b = TransformersBackend(MLMFilterConfig(model=str(tiny_vlm), backend="transformers", generation_batch=2,
                                            max_tokens=4))
    seen = []
    asks = [Ask(f"k{i}", jpeg_bytes(color=(i * 40, 0, 0)), "jpg", f'Caption: "red square {i}"') for i in range(3)]
    asks.append(Ask("bad", b"not an image", "jpg", "x"))
    answers = b.generate(asks, lambda i, a: seen.append(i))
    b.close()
    assert [a.error for a in answers] == [None, None, None, "image_decode_error"]
    assert all(isinstance(a.text, str) for a in answers[:3]) and sorted(seen) == [0, 1, 2, 3]


def test_tiny_vlm_judge_end_to_end_is_unparseable(tiny_vlm, tmp_path, make_recipe, ray_session):
    n = 6
    pq.write_table(pa.table({"caption": [f"a red square {i}" for i in range(n)],
                             "image": pa.array([jpeg_bytes(color=(200, 10 * i, 10)) for i in range(n)])}),
                   tmp_path / "src.parquet")
    stage = {"use": "mlm_filter", "backend": "transformers", "model": str(tiny_vlm), "max_tokens": 4,
             "metrics": {"image_text_matching": 50}}
    recipe = {"source": {"path": str(tmp_path / "src.parquet")}, "stages": [stage],
              "write": {"output": str(tmp_path / "out")}, "runtime": {"num_cpus": 2}}
    m = run(load_recipe(make_recipe(recipe)))
    assert m.counts.input == n and m.counts.dropped == {"mlm_filter": {"judge_unparseable": n}}
    # the same model with on_unparseable: keep: every row kept, its score null
    recipe["stages"][0]["on_unparseable"] = "keep"
    recipe["write"]["output"] = str(tmp_path / "out2")
    m = run(load_recipe(make_recipe(recipe, "keep.yaml")))
    ledger = pq.read_table(tmp_path / "out2" / "ledger").to_pylist()
    assert m.counts.kept == n and [r["mlm_image_text_matching"] for r in ledger] == [None] * n


def test_model_not_local_is_a_clear_error(tmp_path):
    with pytest.raises(CurateError, match="huggingface-cli download"):
        check_model(MLMFilterConfig(model="no-org/no-such-vlm", backend="transformers"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurateError, match="no config.json"):
        check_model(MLMFilterConfig(model=str(tmp_path / "empty"), backend="transformers"))
    cfg = MLMFilterConfig(model="m", backend="transformers")
    assert cfg.resources.num_gpus == 1  # in-process models ask for a GPU; the runner falls back to CPU
