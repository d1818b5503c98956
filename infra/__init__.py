"""The Pulumi program for the tinycloud training host (`pulumi up` runs ``infra/__main__.py``).

Importing the package runs nothing: ``infra.cloud_init`` and ``infra.prices`` are plain Python
that `remote/` and the tests may use without Pulumi's engine.
"""
