"""Pure pipeline policies: retry decisions and backoff, the settlement batcher, the rate limiter."""

import pytest

from children.batcher import Batcher
from children.ratelimit import TokenBucket, host_share
from children.retry import ACK, DEAD, RELEASE, backoff_delay, settle_action


@pytest.mark.parametrize("ok, attempt, max_attempts, expected", [
    (True, 1, 5, ACK), (True, 9, 5, ACK), (False, 1, 5, RELEASE), (False, 4, 5, RELEASE),
    (False, 5, 5, DEAD), (False, 7, 5, DEAD), (False, 1, 1, DEAD),
])
def test_settle_action(ok, attempt, max_attempts, expected):
    assert settle_action(ok, attempt, max_attempts) == expected


def test_backoff_doubles_then_caps_and_scales_by_jitter():
    assert [backoff_delay(a, 1.0, 300.0, 1.0) for a in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(20, 1.0, 300.0, 1.0) == 300.0
    assert backoff_delay(3, 1.0, 300.0, 1.5) == 6.0
    assert backoff_delay(10_000, 1.0, 300.0, 2.0) == 600.0  # no overflow for huge attempts


def test_batcher_flushes_on_size():
    b = Batcher(batch_size=3, max_latency_secs=10.0)
    b.add("r1", 1, now=0.0)
    b.add("r2", 2, now=0.0)
    assert not b.due(0.0)
    b.add("r3", 3, now=0.0)
    assert b.due(0.0)
    assert b.take() == [1, 2, 3]
    assert b.due_at() is None


def test_batcher_flushes_on_latency_from_first_item():
    b = Batcher(batch_size=100, max_latency_secs=0.02)
    b.add("r1", 1, now=5.0)
    b.add("r2", 2, now=5.015)
    assert b.due_at() == pytest.approx(5.02)
    assert not b.due(5.019)
    assert b.due(5.02)


def test_batcher_deduplicates_by_receipt_and_takes_in_order():
    b = Batcher(batch_size=10, max_latency_secs=0.0)
    for receipt, item in [("a", 1), ("b", 2), ("a", 3), ("c", 4)]:
        b.add(receipt, item, now=0.0)
    assert b.take(2) == [3, 2]
    assert b.take() == [4]


def test_batcher_put_back_waits_for_retry_time_even_when_draining():
    b = Batcher(batch_size=1, max_latency_secs=0.0)
    b.put_back([("r1", 1)], now=1.0, retry_at=3.0)
    assert not b.due(2.9, draining=True)
    assert b.due(3.0, draining=True)


def test_token_bucket_caps_rate():
    bucket = TokenBucket(rate=2.0, burst=1.0)
    assert bucket.wait_secs(0.0) == 0.0
    bucket.take(0.0)
    assert bucket.wait_secs(0.0) == pytest.approx(0.5)
    assert bucket.wait_secs(0.5) == 0.0
    bucket.take(0.5)
    assert bucket.wait_secs(0.75) == pytest.approx(0.25)


def test_token_bucket_zero_rate_is_unlimited():
    bucket = TokenBucket(rate=0.0)
    for _ in range(1000):
        bucket.take(0.0)
    assert bucket.wait_secs(0.0) == 0.0


def test_leaser_and_reaper_share_the_hosts_requests_per_sec():
    # The leaser and the reaper each hold one share: together they stay within the host's budget.
    leaser, reaper = host_share(10.0), host_share(10.0)
    calls, now = 0, 0.0
    while now < 10.0:
        for bucket in (leaser, reaper):
            if bucket.wait_secs(now) == 0.0:
                bucket.take(now)
                calls += 1
        now += 0.001
    # the rate over 10 s, plus each bucket's burst (one second of its share); each alone would allow 100
    assert 95 <= calls <= 10.0 * 10 + 2 * 5


def test_host_share_of_zero_is_unlimited():
    assert host_share(0.0).wait_secs(0.0) == 0.0
