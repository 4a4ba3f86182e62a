"""The offline demo: a synthetic image-text world with known truth, a loopback server, a graded run.

- :mod:`curate.demo.world` — generate the world (rendered scenes, planted defects, truth table).
- :mod:`curate.demo.server` — serve it on 127.0.0.1 with 404s, drips, opt-outs and HTML-as-JPEG.
- :mod:`curate.demo.run` — ``curate demo``: run ``pipelines/demo.yaml`` on it and grade every stage.
"""
