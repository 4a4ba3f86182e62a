"""The VLM contract: one interface for a served model (OpenAI-compatible HTTP) and an in-process one.

A stage hands a backend a list of :class:`Ask` (an image, a prompt) and gets back one
:class:`Answer` per ask, in order: the reply text, or a short ``error`` (``http_503``,
``timeout``, ``connect_error``, ``bad_response``…) that the stage turns into a ledger
reason. A backend never raises for one bad request; it raises only when it cannot run
at all (no model, no API key), which is a recipe problem the user must fix.

The options live in :class:`VLMOptions`, which the VLM stages' configs
(``mlm_filter``, ``recaption``) extend, so a recipe writes them flat::

    - use: mlm_filter
      backend: openai                    # or transformers
      base_url: [http://gpu1:8000/v1, http://gpu2:8000/v1]
      model: weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o
      api_key_env: OPENAI_API_KEY        # the NAME of the variable; never the key itself
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from curate.errors import EnvironmentProblem, RecipeError

#: vLLM's and SGLang's default port with the OpenAI route prefix: `vllm serve MODEL` answers here.
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
#: Per-request deadline. A 1-2 B judge answers in well under a second; a loaded server queues
#: requests, and a detailed caption of 300 tokens can take tens of seconds at batch 256.
DEFAULT_TIMEOUT_S = 120.0
#: Extra attempts after 429, 5xx, timeouts and refused connections (a restarting server).
DEFAULT_RETRIES = 3
#: First retry waits this long, then doubles; a server's Retry-After is honoured (up to the timeout).
DEFAULT_RETRY_BACKOFF_S = 1.0
#: Requests in flight per worker: enough to keep a vLLM server's continuous batching full
#: (it batches across requests) while bounding memory (one base64 image per request).
DEFAULT_CONCURRENCY = 64
#: Images per ``generate`` call in-process: what fits a small GPU for a 1-2 B model at 384 px.
DEFAULT_GENERATION_BATCH = 8
#: Rows handed to a VLM worker per batch: with many requests in flight a batch ends at its
#: slowest reply, so batches are small enough that shards finish (and resume state is written) often.
DEFAULT_BATCH_ROWS = 256

PROMPTS = "prompts"
IMAGE_MIME = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass(frozen=True)
class Ask:
    """One request: the row's key, its image bytes and format, and the prompt text."""

    key: str
    image: bytes
    image_format: str | None
    prompt: str


@dataclass(frozen=True)
class Answer:
    """The reply text, or ``error`` (a short reason such as ``http_503`` or ``timeout``)."""

    text: str | None = None
    error: str | None = None


class Backend(Protocol):
    """What a VLM backend does. ``generate`` never raises for a single failed request."""

    def generate(self, asks: list[Ask], on_answer: Any = None) -> list[Answer]:
        """Answer every ask, in order; ``on_answer(i, answer)`` is called as each one arrives."""

    def close(self) -> None:
        """Release sessions, threads, models."""


class VLMOptions(BaseModel):
    """Options every VLM stage has: which backend, which model, and how to talk to it."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["openai", "transformers"] = Field(
        "openai", description="openai: any OpenAI-compatible chat-completions server (vLLM, SGLang, a hosted "
        "API); transformers: load the model in-process (pip install 'curate[vlm]').")
    model: str = Field(description="Model name the server knows (openai), or a local path / cached "
                       "Hugging Face id (transformers).")
    base_url: str | list[str] = Field(DEFAULT_BASE_URL, description=(
        "Endpoint(s) ending in /v1; several are load-balanced (see load_balance)."))
    load_balance: Literal["least_in_flight", "round_robin"] = "least_in_flight"
    api_key_env: str | None = Field(None, description=(
        "Name of the environment variable holding the API key (sent as a Bearer token). The key itself "
        "never goes in a recipe, ledger, manifest or log."))
    max_tokens: int = Field(16, ge=1, description="Most tokens generated per reply.")
    temperature: float = Field(0.0, ge=0, description="0: greedy, reproducible replies (and resumable ones).")
    timeout: float = Field(DEFAULT_TIMEOUT_S, gt=0, description="Seconds per request attempt.")
    retries: int = Field(DEFAULT_RETRIES, ge=0, description="Extra attempts after 429, 5xx, timeouts, refusals.")
    retry_backoff: float = Field(DEFAULT_RETRY_BACKOFF_S, ge=0)
    concurrency_per_worker: int = Field(DEFAULT_CONCURRENCY, ge=1, description="Requests in flight per worker.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="transformers: where the model runs.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="transformers: bfloat16 on a GPU, float32 on CPU when auto.")
    generation_batch: int = Field(DEFAULT_GENERATION_BATCH, ge=1, description="transformers: images per generate().")
    resume: bool = Field(True, description=(
        "Keep every reply under <output>/_work/stages/<stage>/ as it arrives, so a re-run after a crash asks "
        "only what was not answered."))

    @field_validator("base_url")
    @classmethod
    def _urls(cls, v: str | list[str]) -> str | list[str]:
        urls = [v] if isinstance(v, str) else v
        if not urls:
            raise ValueError("give at least one endpoint URL")
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"{u!r} is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and (not v.replace("_", "").isalnum() or v[0].isdigit()):
            raise ValueError("api_key_env is the NAME of an environment variable (e.g. OPENAI_API_KEY), "
                             "not the key")
        return v

    @property
    def urls(self) -> list[str]:
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)

    def fingerprint(self, *prompts: str) -> str:
        """What decides a reply: model, generation settings and prompt templates (not endpoints or keys)."""
        data = {"backend": self.backend, "model": self.model, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "prompts": list(prompts)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_prompt(name_or_path: str) -> str:
    """A prompt template: a file shipped in ``curate/vlm/prompts/`` by name, or a path to a text file."""
    p = Path(name_or_path)
    if p.suffix == ".txt" and p.is_file():
        return p.read_text(encoding="utf-8").strip()
    ref = importlib_resources.files("curate.vlm").joinpath(PROMPTS, f"{name_or_path}.txt")
    if ref.is_file():
        return ref.read_text(encoding="utf-8").strip()
    shipped = sorted(f.name[:-4] for f in importlib_resources.files("curate.vlm").joinpath(PROMPTS).iterdir()
                     if f.name.endswith(".txt"))
    # a .txt file this machine lacks, or a prompt name that is not shipped (a recipe mistake)
    kind = EnvironmentProblem if p.suffix == ".txt" else RecipeError
    raise kind(f"prompt {name_or_path!r} is neither a shipped prompt ({', '.join(shipped)}) "
               "nor an existing .txt file")


def render(template: str, **values: str | None) -> str:
    """Fill ``{name}`` placeholders; plain replace, so braces inside captions are harmless."""
    out = template
    for k, v in values.items():
        out = out.replace("{" + k + "}", (v or "").replace('"', "'"))
    return out

