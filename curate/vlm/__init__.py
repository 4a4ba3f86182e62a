"""Vision-language models behind one interface: a served model (OpenAI-compatible) or an in-process one.

``base`` holds the contract and the options, ``registry`` picks a backend, ``openai`` and
``transformers_backend`` are the two backends, ``cache`` keeps replies for resume,
``prompts/`` holds the prompt templates (data files shipped in the package). The stages
that use them (``mlm_filter``, ``recaption``) live in :mod:`curate.stages`.
"""
