"""In-process VLM with Hugging Face transformers: AutoProcessor + AutoModelForImageTextToText.

Loaded once per actor (the VLM stages are stateful), on a GPU when Ray gives the actor
one, else on CPU. Requests are answered ``generation_batch`` at a time with one batched
``generate`` (left padding, greedy at temperature 0): the reference MLM-Filter loop runs
batch 4-8 per GPU; a served model (``backend: openai`` + vLLM) is much faster at scale.

The model is a local directory or a Hugging Face id already in the local cache: curate
never downloads weights behind your back (``huggingface-cli download ID`` first).
transformers is an optional dependency: ``pip install 'curate[vlm]'``.
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path
from typing import Any

from curate.errors import EnvironmentProblem
from curate.vlm.base import Answer, Ask, VLMOptions

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'curate[vlm]'"


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise EnvironmentProblem(f"backend transformers needs the transformers library: {INSTALL_HINT}") from e
    return transformers


def check_model(options: VLMOptions) -> None:
    """Fail on the driver when the library is missing or the model is neither a directory nor cached."""
    _import_transformers()
    p = Path(options.model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise EnvironmentProblem(f"model directory {p} has no config.json (save it with save_pretrained)")
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(options.model, "config.json"), str):
        raise EnvironmentProblem(
            f"model {options.model!r} is not a local directory nor in the local Hugging Face cache; "
            f"curate downloads no weights: run `huggingface-cli download {options.model}` first (or give a directory)")


class TransformersBackend:
    """A VLM loaded in this process; ``generate`` answers asks in batches (see the module doc)."""

    def __init__(self, options: VLMOptions) -> None:
        transformers = _import_transformers()
        import torch

        self.options = options
        device = options.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = options.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        if device == "cpu":
            from curate.models.clip import assigned_cpus

            torch.set_num_threads(assigned_cpus())
        self.device = device
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(options.model, local_files_only=True)
            self.model = transformers.AutoModelForImageTextToText.from_pretrained(
                options.model, local_files_only=True, dtype=getattr(torch, dtype)).to(device).eval()
        except (OSError, ValueError) as e:
            raise EnvironmentProblem(f"cannot load VLM {options.model!r} with transformers: {e}") from e
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"  # batched generation continues every prompt from its end
        self._lock = threading.Lock()  # one generate at a time per model
        log.info("transformers VLM %s on %s (%s)", options.model, device, dtype)

    def close(self) -> None:
        self.model = None

    def generate(self, asks: list[Ask], on_answer: Any = None) -> list[Answer]:
        out: list[Answer] = []
        step = self.options.generation_batch
        for start in range(0, len(asks), step):
            answers = self._batch(asks[start:start + step])
            for j, a in enumerate(answers):
                if on_answer is not None:
                    on_answer(start + j, a)
            out += answers
        return out

    def _batch(self, asks: list[Ask]) -> list[Answer]:
        import torch
        from PIL import Image

        answers: list[Answer | None] = [None] * len(asks)
        images, texts, idx = [], [], []
        for i, ask in enumerate(asks):
            try:
                with Image.open(io.BytesIO(ask.image)) as im:
                    images.append(im.convert("RGB"))
            except Exception:  # noqa: BLE001 - any decoder failure is this row's error
                answers[i] = Answer(error="image_decode_error")
                continue
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ask.prompt}]}]
            texts.append(self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False))
            idx.append(i)
        if idx:
            try:
                with self._lock, torch.inference_mode():
                    inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
                    inputs = inputs.to(self.device)
                    sampling: dict[str, Any] = {"do_sample": False}
                    if self.options.temperature > 0:
                        sampling = {"do_sample": True, "temperature": self.options.temperature}
                    generated = self.model.generate(**inputs, max_new_tokens=self.options.max_tokens, **sampling)
                new = generated[:, inputs["input_ids"].shape[1]:]
                replies = self.processor.batch_decode(new, skip_special_tokens=True)
                for i, text in zip(idx, replies, strict=True):
                    answers[i] = Answer(text=text)
            except Exception:  # noqa: BLE001 - a failed batch is these rows' error, not the run's end
                log.exception("generate failed for %d images", len(idx))
                for i in idx:
                    answers[i] = Answer(error="generate_error")
        return [a if a is not None else Answer(error="generate_error") for a in answers]
