"""Which backend a VLM stage talks to: ``backend: openai`` or ``backend: transformers``.

Kept apart from :mod:`curate.vlm.base` so the contract never imports its implementations;
heavy libraries (transformers, torch) are imported only when their backend is asked for.
"""

from __future__ import annotations

import os

from curate.errors import EnvironmentProblem
from curate.vlm.base import Backend, VLMOptions


def make_backend(options: VLMOptions) -> Backend:
    """The backend the options ask for."""
    if options.backend == "openai":
        from curate.vlm.openai import OpenAIBackend

        return OpenAIBackend(options)
    from curate.vlm.transformers_backend import TransformersBackend

    return TransformersBackend(options)


def check_backend(options: VLMOptions) -> None:
    """Driver-side checks before any work: the API key variable is set, the in-process model loads."""
    if options.backend == "openai":
        if options.api_key_env and not os.environ.get(options.api_key_env):
            raise EnvironmentProblem(
                f"api_key_env names {options.api_key_env}, which is not set in the environment; "
                f"export {options.api_key_env}=... (the key never goes in the recipe)")
        return
    from curate.vlm.transformers_backend import check_model

    check_model(options)
