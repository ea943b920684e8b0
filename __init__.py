"""archopt: find the best pruned LLM for a size target.

Installed as the ``archopt`` package: ``archopt.archdb`` (the archive), ``archopt.evaluators``
(pruning and measurement), ``archopt.optimizer`` (predictors and search) and ``archopt.cli``.
"""

__version__ = "0.1.0"
