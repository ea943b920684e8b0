"""Helpers shared by several test modules (and by benchmarks/, which put tests/ on ``sys.path``).

- ``synthetic``: known ground truths (metrics as functions of the widths) and random archives.
- ``archives``: a small synthetic base model, its protocols, and archives filled with its truth.
- ``cli_runs``: ``archopt evaluate`` on the tiny model and archive row counts.
- ``service``: ``archopt serve`` in a thread with a test token.
- ``first_hour``: ``archopt`` in a new process with the hub offline or unreachable, timed.
- ``slow_worker.py``: a script, ``archopt`` whose every measurement then sleeps (queue tests).

Test modules import from here or from conftest, never from another test module.
"""
