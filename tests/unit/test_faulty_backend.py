"""children/backends/faulty.py over the memory backend: each fault kind, call selection, seeding, the
URL form, and the property that matters: a consumer that retries every failed call (or item) loses
nothing."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from children.backends import (
    SCHEMES,
    BackendConfigError,
    BackendUnavailable,
    Outcome,
    open_backend,
    redact_url,
)
from children.backends.faulty import DATA_PATH, PER_ITEM, FaultyBackend, Plan, Rule, split_url
from children.backends.memory import FakeClock, MemoryBackend
from config import ConfigError, validate

pytestmark = pytest.mark.timeout(20)

CONFIG = Path("/x/t.toml")


def faulty(clock: FakeClock | None = None, seed: int = 0, delay_secs: float = 1.0,
           **kinds: str) -> tuple[FaultyBackend, MemoryBackend, list[float]]:
    inner = MemoryBackend("memory://", "q", clock=clock or FakeClock())
    slept: list[float] = []
    return FaultyBackend(inner, Plan.of(seed, delay_secs, **kinds), sleep=slept.append), inner, slept


def leased_one(backend, payload: bytes = b"x") -> str:
    backend.enqueue([payload])
    (task,) = backend.lease(1, 30)
    return task.receipt


# -- the four kinds --------------------------------------------------------------------------

def test_fail_raises_and_does_nothing() -> None:
    backend, inner, slept = faulty(fail="ack@1")
    receipt = leased_one(inner)
    with pytest.raises(BackendUnavailable, match="ack call 1: injected failure"):
        backend.ack([receipt])
    assert inner.stats().leased == 1 and slept == []
    assert backend.ack([receipt]) == {receipt: Outcome.OK}
    assert inner.stats().leased == 0


def test_timeout_sleeps_then_raises_and_does_nothing() -> None:
    backend, inner, slept = faulty(delay_secs=0.7, timeout="extend@1")
    receipt = leased_one(inner)
    with pytest.raises(BackendUnavailable, match="injected timeout after 0.7s"):
        backend.extend([receipt], 60)
    assert slept == [0.7]
    assert inner.get(receipt.split(".")[0]).visible_at == pytest.approx(inner._clock() + 30)


def test_half_takes_effect_then_raises_and_the_retry_is_harmless() -> None:
    backend, inner, _ = faulty(half="ack@1,release@1,dead_letter@1")
    first, second, third = (leased_one(inner, p) for p in (b"a", b"b", b"c"))
    with pytest.raises(BackendUnavailable, match="after the call took effect"):
        backend.ack([first])
    with pytest.raises(BackendUnavailable):
        backend.release([second], 0.0, ["boom"])
    with pytest.raises(BackendUnavailable):
        backend.dead_letter([third], "gave up")
    stats = inner.stats()
    assert (stats.ready, stats.leased, stats.dead) == (1, 0, 1)
    # the caller retries the same calls: idempotent, so nothing more changes
    assert backend.ack([first]) == {first: Outcome.LOST}
    assert backend.release([second], 0.0, ["boom"]) == {second: Outcome.LOST}
    assert backend.dead_letter([third], "gave up") == {third: Outcome.LOST}
    assert inner.stats() == stats


def test_half_failed_lease_comes_back_after_its_lease_expires() -> None:
    clock = FakeClock()
    backend, inner, _ = faulty(clock, half="lease@1")
    inner.enqueue([b"p"])
    with pytest.raises(BackendUnavailable):
        backend.lease(10, 5)
    assert backend.lease(10, 5) == []  # leased by nobody, for now
    clock.advance(5.01)
    (task,) = backend.lease(10, 5)
    assert task.payload == b"p" and task.attempt == 2


def test_slow_sleeps_then_succeeds() -> None:
    backend, inner, slept = faulty(delay_secs=0.25, slow="lease@1")
    inner.enqueue([b"p"])
    assert [t.payload for t in backend.lease(1, 30)] == [b"p"]
    assert slept == [0.25] and backend.injected == {("lease", "slow"): 1}


def test_retry_on_a_call_answers_retry_for_every_item_and_changes_nothing() -> None:
    backend, inner, _ = faulty(retry="ack@1")
    receipts = [leased_one(inner, p) for p in (b"a", b"b", b"c")]
    assert backend.ack(receipts) == dict.fromkeys(receipts, Outcome.RETRY)
    assert inner.stats().leased == 3  # not passed on: nothing happened to them
    assert backend.injected == {("ack", "retry"): 3}
    assert backend.ack(receipts) == dict.fromkeys(receipts, Outcome.OK)  # asked again: settled
    assert inner.stats().leased == 0


def test_retry_by_probability_picks_items_and_forwards_the_rest_with_their_own_values() -> None:
    backend, inner, _ = faulty(seed=4, retry="release:0.5")
    tasks = {leased_one(inner, str(i).encode()): f"error {i}" for i in range(40)}
    receipts = list(tasks)
    outcomes = backend.release(receipts, [float(i) for i in range(40)], [tasks[r] for r in receipts])
    retried = {r for r, o in outcomes.items() if o == Outcome.RETRY}
    assert set(outcomes) == set(receipts) and 0 < len(retried) < 40
    assert {o for r, o in outcomes.items() if r not in retried} == {Outcome.OK}
    for receipt in receipts:
        info = inner.get(receipt.split(".")[0])
        if receipt in retried:
            assert (info.state, info.last_error) == ("leased", "")
        else:  # each kept item got its own error and delay, not a neighbour's
            index = receipts.index(receipt)
            assert info.last_error == f"error {index}"
            assert info.visible_at == pytest.approx(inner._clock() + index)
    again, _, _ = faulty(seed=4, retry="release:0.5")
    other = [leased_one(again.inner, str(i).encode()) for i in range(40)]
    same = again.release(other, 0.0)
    assert [same[r] for r in other] == [outcomes[r] for r in receipts]  # seeded: the same items


def test_retry_rules_only_pick_per_item_calls() -> None:
    with pytest.raises(BackendConfigError, match="retry picks items of a per-item call"):
        Plan.of(retry="lease@1")
    assert {r.method for r in Plan.of(retry="*:0.1").rules} == set(PER_ITEM)


def test_retry_items_do_not_shift_the_call_level_faults() -> None:
    plain, _, _ = faulty(seed=9, fail="ack:0.3")
    mixed, _, _ = faulty(seed=9, fail="ack:0.3", retry="ack:0.5")
    assert _fault_pattern(plain, "ack", 300) == _fault_pattern(mixed, "ack", 300)


def test_reaper_keeps_retried_items_unsettled_and_settles_them_on_a_later_flush() -> None:
    """children/reaper.py: an item answered RETRY is not reported settled to the leaser and stays
    in the batch; a later flush sends it again, and only then is it acked and confirmed."""
    from children import protocol as p
    from children.reaper import Reaper

    key = f"retry-{uuid.uuid4().hex[:8]}"
    cfg = validate({"queue": {"url": f"faulty+memory://{key}?retry=ack@1,ack:0.5&seed=2"}}, CONFIG)
    reaper = Reaper(SimpleNamespace(path="root/reaper"), cfg)
    sent: list[p.Message] = []
    reaper.sock = SimpleNamespace(send=lambda frame, flags=0: sent.append(p.decode(frame)))
    queue = MemoryBackend(f"memory://{key}", cfg.queue.name)  # the same store, seen directly
    receipts = [leased_one(queue, str(i).encode()) for i in range(10)]
    for receipt in receipts:
        reaper.batch.add(receipt, [receipt.split(".")[0], receipt, True, "", 1], 0.0)

    reaper.flush(0.0, draining=True)  # ack call 1: every item RETRY
    assert sent == [] and len(reaper.batch) == 10 and queue.stats().leased == 10
    assert reaper.stats["acked_total"] == 0

    for _ in range(50):  # later ack calls: each item RETRY with probability 0.5
        if not len(reaper.batch):
            break
        unsettled, before = set(reaper.batch.items), len(sent)
        reaper.flush(reaper.batch.not_before, draining=True)
        confirmed_now = {r for m in sent[before:] for r in m.receipts}
        # what is still held is exactly what was not confirmed, and it is still leased
        assert set(reaper.batch.items) == unsettled - confirmed_now
        assert queue.stats().leased == len(reaper.batch)
    assert len(reaper.batch) == 0
    confirmed = [r for m in sent for r, o in zip(m.receipts, m.outcomes, strict=True) if o == p.ACKED]
    assert sorted(confirmed) == sorted(receipts) and len(confirmed) == len(set(confirmed))
    assert all(isinstance(m, p.Settled) for m in sent) and len(sent) > 1  # some waited a flush
    assert reaper.stats["acked_total"] == 10 and reaper.stats["lost_total"] == 0


# -- which calls ---------------------------------------------------------------------------

def test_nth_call_fires_on_that_call_only() -> None:
    backend, _, _ = faulty(fail="stats@2,stats@4")
    results = []
    for _ in range(5):
        try:
            backend.stats()
            results.append("ok")
        except BackendUnavailable:
            results.append("fail")
    assert results == ["ok", "fail", "ok", "fail", "ok"]
    assert backend.calls["stats"] == 5


def test_first_matching_rule_wins() -> None:
    backend, _, slept = faulty(fail="stats@1", timeout="stats:1.0")
    with pytest.raises(BackendUnavailable, match="injected failure"):
        backend.stats()
    with pytest.raises(BackendUnavailable, match="injected timeout"):
        backend.stats()
    assert slept == [1.0]


def test_star_means_the_data_path() -> None:
    backend, _, _ = faulty(fail="*:1.0")
    assert {r.method for r in backend.plan.rules} == set(DATA_PATH)
    for call in (lambda: backend.lease(1, 30), lambda: backend.ack(["1.1"]),
                 lambda: backend.extend(["1.1"], 5), lambda: backend.release(["1.1"]),
                 lambda: backend.dead_letter(["1.1"], "r")):
        with pytest.raises(BackendUnavailable):
            call()
    assert backend.enqueue([b"admin calls pass"]) == ["1"]


def _fault_pattern(backend: FaultyBackend, method: str, calls: int) -> list[bool]:
    pattern = []
    for _ in range(calls):
        try:
            getattr(backend, method)([])
            pattern.append(False)
        except BackendUnavailable:
            pattern.append(True)
    return pattern


def test_probability_is_seeded_and_close_to_the_rate() -> None:
    one, _, _ = faulty(seed=7, fail="ack:0.3")
    two, _, _ = faulty(seed=7, fail="ack:0.3")
    other, _, _ = faulty(seed=8, fail="ack:0.3")
    pattern = _fault_pattern(one, "ack", 4000)
    assert pattern == _fault_pattern(two, "ack", 4000)
    assert pattern != _fault_pattern(other, "ack", 4000)
    assert 0.27 < sum(pattern) / len(pattern) < 0.33  # seeded: a fixed number, not a flaky one


def test_a_methods_faults_do_not_depend_on_other_methods_calls() -> None:
    alone, _, _ = faulty(seed=3, fail="ack:0.5,lease:0.5")
    mixed, _, _ = faulty(seed=3, fail="ack:0.5,lease:0.5")
    expected = _fault_pattern(alone, "ack", 200)
    got = []
    for i in range(200):
        for _ in range(i % 3):
            try:
                mixed.lease(1, 30)
            except BackendUnavailable:
                pass
        got += _fault_pattern(mixed, "ack", 1)
    assert got == expected


# -- the property: retry every failed call and nothing is lost --------------------------------

def test_consumer_that_retries_loses_nothing_under_30_percent_faults() -> None:
    """Lease, 'run', ack; every call can fail or half-succeed. A failed call is retried; a lease
    that half-succeeded comes back after expiry. End: every task ran, all acked, queue empty."""
    clock = FakeClock()
    backend, inner, _ = faulty(clock, seed=11, fail="lease:0.15,ack:0.15,extend:0.15",
                               half="lease:0.15,ack:0.15,extend:0.15")
    inner.enqueue([str(i).encode() for i in range(500)])
    runs: Counter[bytes] = Counter()
    for _ in range(5000):
        stats = inner.stats()
        if stats.ready == stats.leased == 0:
            break
        try:
            tasks = backend.lease(10, 10)
        except BackendUnavailable:
            clock.advance(1)
            continue
        if not tasks:
            clock.advance(10)  # only tasks of half-failed leases are left: wait out their lease
            continue
        receipts = [t.receipt for t in tasks]
        runs.update(t.payload for t in tasks)
        while True:  # the reaper's way: the same batch again until the backend answers
            try:
                outcomes = backend.ack(receipts)
                break
            except BackendUnavailable:
                clock.advance(0.1)
        assert set(outcomes.values()) <= {Outcome.OK, Outcome.LOST}
    stats = inner.stats()
    assert (stats.ready, stats.leased, stats.delayed, stats.dead) == (0, 0, 0, 0)
    assert set(runs) == {str(i).encode() for i in range(500)}
    assert backend.injected[("ack", "half")] > 0 and backend.injected[("lease", "half")] > 0
    # a task runs twice only when a half-failed ack hid its success: never more than those acks
    assert sum(runs.values()) - 500 <= 10 * backend.injected[("ack", "half")]


# -- the URL form --------------------------------------------------------------------------

def test_url_form_opens_the_inner_backend_wrapped() -> None:
    backend = open_backend("faulty+memory://?fail=ack:0.3,lease@2&half=extend:0.1&seed=5&delay=0.5", "q")
    assert isinstance(backend, FaultyBackend) and isinstance(backend.inner, MemoryBackend)
    assert backend.name == "faulty+memory"
    assert backend.plan == Plan((Rule("ack", "fail", 0.3), Rule("lease", "fail", 0.0, 2),
                                 Rule("extend", "half", 0.1)), 5, 0.5)
    assert backend.limits == backend.inner.limits


def test_url_form_keeps_the_inner_query() -> None:
    inner, plan = split_url("faulty+redis://h:6379/0?socket_timeout=5&fail=ack:0.5&x=1")
    assert inner == "redis://h:6379/0?socket_timeout=5&x=1"
    assert plan.rules == (Rule("ack", "fail", 0.5),)
    assert split_url("FAULTY+sqlite:///t.db")[0] == "sqlite:///t.db"
    assert split_url("faulty+memory://?half=ack%3A0.5")[1].rules == (Rule("ack", "half", 0.5),)


def test_url_form_sqlite_relative_to_base_dir(tmp_path) -> None:
    with open_backend("faulty+sqlite:///tasks.db?fail=ack@1&seed=1", "q", tmp_path) as backend:
        backend.enqueue([b"p"])
        (task,) = backend.lease(1, 30)
        with pytest.raises(BackendUnavailable):
            backend.ack([task.receipt])
        assert backend.ack([task.receipt]) == {task.receipt: Outcome.OK}
    assert (tmp_path / "tasks.db").exists()


@pytest.mark.parametrize("url, message", [
    ("faulty+memory://?fail=ack", "'ack' is not METHOD:PROBABILITY"),
    ("faulty+memory://?fail=ack:lots", "'ack:lots' is not METHOD:PROBABILITY"),
    ("faulty+memory://?fail=ack@0", "'ack@0' is not METHOD:PROBABILITY"),
    ("faulty+memory://?fail=ack:1.5", "probability 1.5 is not in [0, 1]"),
    ("faulty+memory://?fail=ackk:0.1", "method 'ackk' is not one of lease, extend"),
    ("faulty+memory://?seed=x", "seed = 'x' is not an integer"),
    ("faulty+memory://?delay=-1", "delay = -1.0 is not between 0 and 3600"),
    ("faulty+tasks.db?fail=ack:0.1", "names no backend URL"),
    ("faulty+faulty+memory://", "nests"),
    ("faulty+mysql://u:secret@h/db", "unknown scheme"),
])
def test_bad_plans_are_one_line_config_errors(url: str, message: str) -> None:
    with pytest.raises(BackendConfigError) as info:
        open_backend(url, "q")
    text = str(info.value)
    assert message in text and "\n" not in text and "secret" not in text


def test_config_validation_accepts_faulty_urls_and_redacts_them() -> None:
    cfg = validate({"queue": {"url": "faulty+sqlite:///t.db?fail=ack:0.2"}}, CONFIG)
    assert cfg.queue.url == "faulty+sqlite:///t.db?fail=ack:0.2"
    assert "faulty+redis" in SCHEMES
    assert redact_url("faulty+redis://u:pw@h:6379/0?fail=ack:0.1") == "faulty+redis://u:***@h:6379/0?fail=ack:0.1"
    with pytest.raises(ConfigError):
        validate({"queue": {"url": "faulty://t.db"}}, CONFIG)
