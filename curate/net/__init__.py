"""Networking for the download stage: the HTTP fetcher, the SSRF guard and the image pipeline.

- :mod:`curate.net.fetch` — asyncio/aiohttp downloads with a total deadline, a body cap,
  manual redirects and retries of transient failures;
- :mod:`curate.net.guard` — refuses non-http(s) schemes and non-public addresses, at every hop;
- :mod:`curate.net.image` — content sniffing, pixel limit, img2dataset-compatible resize, encode.
"""
