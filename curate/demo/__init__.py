"""The offline demo: a synthetic image-text world with known truth, a loopback server, a graded run.

- :mod:`curate.demo.scenes` — the concepts, a scene, its true tags and tag vocabulary, drawing it.
- :mod:`curate.demo.captions` — English captions, other languages, junk alt-text, caption edits.
- :mod:`curate.demo.world` — generate the world (rendered scenes, planted defects, truth table).
- :mod:`curate.demo.server` — serve it on 127.0.0.1 with 404s, drips, opt-outs and HTML-as-JPEG.
- :mod:`curate.demo.run` — ``curate demo``: run ``pipelines/demo.yaml`` on it and grade every stage.
- :mod:`curate.demo.tags_eval` — grade ``clip_tags`` against the world's truth tags.
- :mod:`curate.demo.train_clip` — train the demo CLIP (``curate-demo-clip``) on rendered scenes.
"""
