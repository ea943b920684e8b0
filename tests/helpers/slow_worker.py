"""``archopt`` whose every measurement sleeps after its result is written: a queue job still in hand.

    python tests/helpers/slow_worker.py SECONDS --db URL worker ...

The queue tests run it as a worker process to kill it (or SIGTERM it) while a job is running; the
product has no test hook for this, the patch lives in this process only.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def slow_measurements(seconds: float) -> None:
    """Make ``Campaign.run`` sleep ``seconds`` after it has written its results."""
    from archopt.optimizer.campaign import Campaign
    measure = Campaign.run

    def measure_then_sleep(self: Campaign, *args: Any, **kwargs: Any) -> Any:
        report = measure(self, *args, **kwargs)
        time.sleep(seconds)
        return report

    Campaign.run = measure_then_sleep  # type: ignore[method-assign]


if __name__ == "__main__":
    slow_measurements(float(sys.argv[1]))
    from archopt.cli import main
    main(sys.argv[2:])
