"""curate — vision-language pre-training data curation on Ray.

The public surface is small:

>>> from curate.recipe import load_recipe          # doctest: +SKIP
>>> from curate.runner import run                  # doctest: +SKIP
>>> run(load_recipe("pipelines/demo.yaml"))        # doctest: +SKIP
"""

__version__ = "0.1.0"
