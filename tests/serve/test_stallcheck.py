"""No stall under abuse: oversized requests are refused fast and small chats beside them stay fast.

A real `vlbridge serve` process (no flags) on the tiny checkpoint; the abusive requests come from another
process, as `python -m vlbridge.serve.stallcheck` sends them.
"""

from __future__ import annotations

import pytest

from vlbridge.serve.loadgen import ServerProcess, vlbridge_serve
from vlbridge.serve.stallcheck import ABUSES, check

pytestmark = pytest.mark.slow


def test_oversized_requests_are_refused_in_seconds_and_small_chats_stay_within_2x(checkpoint):
    server = ServerProcess(vlbridge_serve(str(checkpoint)))
    try:
        server.wait_ready()
        report = check(server.url, seconds=3.0)  # twice the small chats of 1.5 s: steadier medians
    finally:
        server.stop()
    for name, (senders, _) in ABUSES.items():
        result = report[name]
        assert result["statuses"] == [413], (name, result)  # refused from byte counts, before any parsing
        # One at a time, each is refused in well under a second (slowest 43-80 ms of 80-340 alone on 2
        # cores). A shared CI machine adds rare pauses of its own (one of 46 at 1.06 s, the median 41 ms),
        # so nine in ten within a second and none past three. Of 64 sent at once (640 MiB a round for the
        # server to receive and drop, small chats served first), those ahead delay the rest: half are
        # refused within 2 s (0.35-0.53 s measured alone on 2 cores; 1.4-1.7 s in CI runs of the suite).
        if senders == 1:
            assert result["p90_s"] < 1.0 and result["slowest_s"] < 3.0, (name, result)
        else:
            assert result["median_s"] < 2.0, (name, result)
        assert result["small_ratio"] <= 2.0, (name, result, report["idle_small_s"])
