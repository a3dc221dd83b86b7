"""The event-loop lag watch (server/app.py `_loop_watch`): a stalled loop shows in
`sly_event_loop_lag_seconds` and in one warning line."""

from __future__ import annotations

import asyncio
import logging
import time
import types
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry, Histogram

from server import app


def test_a_blocked_loop_is_measured_and_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(app, "LAG_EVERY_S", 0.05)
    monkeypatch.setattr(app, "LAG_WARN_S", 0.3)
    reg = CollectorRegistry()
    state = types.SimpleNamespace(
        metrics=types.SimpleNamespace(loop_lag=Histogram("lag", "lag", buckets=(0.1, 0.35, 1.0), registry=reg))
    )

    async def scenario():
        watch = asyncio.create_task(app._loop_watch(state))
        await asyncio.sleep(0.3)  # a few on-time checks
        time.sleep(0.5)  # a blocking call on the loop
        await asyncio.sleep(0.2)
        time.sleep(0.5)  # again, within the minute: measured, not logged again
        await asyncio.sleep(0.2)
        watch.cancel()

    with caplog.at_level(logging.WARNING, logger="sly-server"), ThreadPoolExecutor(1) as ex:
        ex.submit(asyncio.run, scenario()).result(timeout=30)
    count = reg.get_sample_value("lag_count")
    # the two blocks are about 0.45 s late; a busy machine (a suite on all cores) makes an
    # on-time check up to a few tenths late, never as late as a block
    late = count - reg.get_sample_value("lag_bucket", {"le": "0.35"})
    assert count >= 6 and late == 2, (count, late)
    warnings = [r for r in caplog.records if "event loop ran" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert any(f"{x} s late" in warnings[0].getMessage() for x in ("0.4", "0.5", "0.6")), warnings[0].getMessage()
