"""Vision-language models behind one interface: a served model (OpenAI-compatible) or an in-process one.

``base`` holds the contract and the options, ``openai`` and ``transformers_backend``
the two backends, ``cache`` the replies kept for resume, ``stage`` what the VLM stages
share, ``prompts/`` the prompt templates (data files shipped in the package).
"""

# Registering the stages first breaks the cycle stages -> vlm.base -> stages.base -> stages/__init__.
import curate.stages  # noqa: F401
