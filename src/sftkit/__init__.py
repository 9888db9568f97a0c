"""sftkit: supervised fine-tuning of language models, correct by construction.

The pipeline, one module a step:  data -> template -> render (tokens + masks) -> pack -> model
-> train -> export.  Start at `sftkit.cli`.
"""

__version__ = "0.1.0"
