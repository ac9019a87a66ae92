"""The bundled examples: worked recipes (``*.yaml``) and the tiny inputs they run on (``inputs/``).

This folder is the source of the package ``adapterops.examples`` (pyproject.toml maps it there), so
the examples ship inside the wheel and ``adapterops example DIR`` can write a copy of them anywhere.
Their outputs (``out/``) stay out of the package.
"""
