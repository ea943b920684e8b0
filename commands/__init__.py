"""The commands of ``archopt``, one module per family; ``archopt.cli`` loads them by name.

archive (ingest, export, models, archs, show, evaluations), measure (evaluate, prune), query,
predictors, serve, queue (submit, worker, jobs) and db; ``output`` prints for all of them.
"""
