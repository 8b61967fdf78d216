"""The leaser's ledger, driven by hand with explicit times: no processes, no sockets, no sleeps."""

import random

import pytest

from children.backends.base import Leased
from children.ledger import FINISHED, MAX_RUN, RUNNING, Ledger, Policy


def make(lease=30.0, max_lease=7200.0, max_attempts=5, resend=2.0):
    return Ledger(Policy(lease, max_lease, max_attempts, resend), rng=random.Random(1))


def leased(n, start=0, attempt=1):
    return [Leased(f"t{i}", f"r{i}", f"p{i}".encode(), attempt) for i in range(start, start + n)]


def hello(ledger, name, slots=1, incarnation=100, running=(), finished=(), now=0.0):
    ledger.on_hello(name, "executor", incarnation, slots, list(running), list(finished), now)


def test_dispatch_gives_each_executor_only_its_free_slots():
    ledger = make()
    hello(ledger, "executor.0")
    hello(ledger, "executor.1")
    ledger.add_leased(leased(5), now=0.0)
    sent = dict(ledger.dispatch(now=0.0))
    assert sorted(len(items) for items in sent.values()) == [1, 1]
    assert len(ledger.held) == 3
    assert ledger.dispatch(now=0.0) == []  # no credit left


def test_done_returns_credit_and_next_task_goes_to_the_idle_executor():
    ledger = make()
    hello(ledger, "executor.0")
    hello(ledger, "executor.1")
    ledger.add_leased(leased(3), now=0.0)
    sent = dict(ledger.dispatch(now=0.0))
    receipt = sent["executor.1"][0][1]
    ledger.on_done("executor.1", [["t", receipt, True, "", 1, 5.0]], now=5.0)
    again = ledger.dispatch(now=5.0)
    # executor.0 still runs its long task: the held task goes to executor.1, never queued behind it
    assert [peer for peer, _ in again] == ["executor.1"]


def test_tiny_tasks_are_dispatched_in_runs_bounded_by_max_run():
    ledger = make()
    hello(ledger, "executor.0")
    ledger.add_leased(leased(1), now=0.0)
    (_, items), = ledger.dispatch(0.0)
    ledger.on_done("executor.0", [[items[0][0], items[0][1], True, "", 1, 0.000001]], now=0.0)
    assert ledger.run_length() == MAX_RUN
    ledger.add_leased(leased(1000, start=1), now=0.0)
    (_, items), = ledger.dispatch(0.0)
    assert len(items) == MAX_RUN


def test_slow_tasks_are_dispatched_one_per_slot():
    ledger = make()
    hello(ledger, "executor.0", slots=3)
    ledger.add_leased(leased(1), now=0.0)
    (_, items), = ledger.dispatch(0.0)
    ledger.on_done("executor.0", [[items[0][0], items[0][1], True, "", 1, 0.5]], now=0.5)
    ledger.add_leased(leased(10, start=1), now=0.5)
    (_, items), = ledger.dispatch(0.5)
    assert len(items) == 3


def test_new_executor_incarnation_fails_what_the_dead_one_held():
    ledger = make()
    hello(ledger, "executor.0", incarnation=100)
    ledger.add_leased(leased(1), now=0.0)
    ledger.dispatch(0.0)
    hello(ledger, "executor.0", incarnation=200, now=1.0)
    items = ledger.take_settles(now=1.0)
    assert len(items) == 1
    task_id, receipt, ok, error, attempt = items[0]
    assert (task_id, receipt, ok, attempt) == ("t0", "r0", False, 1)
    assert "executor died" in error and "pid 100" in error


def test_same_incarnation_hello_keeps_reported_tasks_running():
    ledger = make()
    hello(ledger, "executor.0", incarnation=100)
    ledger.add_leased(leased(1), now=0.0)
    ledger.dispatch(0.0)
    hello(ledger, "executor.0", incarnation=100, running=[["t0", "r0", 1, 1.0]], now=1.0)
    assert ledger.take_settles(now=1.0) == []
    assert ledger.entries["r0"].state == RUNNING


def test_released_task_leased_again_while_running_here_is_not_run_twice():
    ledger = make(lease=10.0)
    hello(ledger, "executor.0")
    ledger.add_leased([Leased("t0", "r0-a", b"x", 1)], now=0.0)
    ledger.dispatch(0.0)
    # our lease ran out (say the backend was unreachable) and we leased the same task again
    ledger.add_leased([Leased("t0", "r0-b", b"x", 2)], now=12.0)
    assert ledger.dispatch(12.0) == []
    assert ledger.counters["duplicates_skipped_total"] == 1
    # the executor reports with the receipt it was given; we settle with the fresh one
    ledger.on_done("executor.0", [["t0", "r0-a", True, "", 1, 12.0]], now=12.5)
    assert ledger.take_settles(12.5) == [["t0", "r0-b", True, "", 2]]


def test_extensions_come_before_nine_tenths_of_the_lease_and_batch_together():
    ledger = make(lease=10.0)
    ledger.add_leased(leased(20), now=0.0)
    first = ledger.next_extension_at()
    assert 6.0 <= first <= 8.5
    due = ledger.due_extensions(first)
    assert due  # everything due within a tenth of a lease goes in one call
    ledger.extended({r: "ok" for r in due}, now=first)
    for receipt in due:
        assert ledger.entries[receipt].deadline == first + 10.0
        assert first + 6.0 <= ledger.entries[receipt].next_extend <= first + 8.5


def test_lost_extension_of_a_running_task_asks_to_abort_it():
    ledger = make()
    hello(ledger, "executor.0")
    ledger.add_leased(leased(2), now=0.0)
    ledger.dispatch(0.0)
    lost = ledger.extended({"r0": "lost", "r1": "lost"}, now=20.0)
    assert lost == [("executor.0", "r0")]  # r1 was only held: just dropped
    assert ledger.entries == {}


def test_extension_stops_after_max_lease_secs_from_dispatch():
    ledger = make(lease=10.0, max_lease=25.0)
    hello(ledger, "executor.0")
    ledger.add_leased(leased(1), now=0.0)
    ledger.dispatch(now=0.0)
    times = []
    while (at := ledger.next_extension_at()) is not None and len(times) < 10:
        times.append(at)
        ledger.extended({"r0": "ok"}, now=at)
    assert 2 <= len(times) <= 4
    assert all(t < 25.0 for t in times)
    assert ledger.due_extensions(26.0) == []


def test_settled_receipts_are_forgotten_by_their_executor():
    ledger = make()
    hello(ledger, "executor.0")
    ledger.add_leased(leased(2), now=0.0)
    hello(ledger, "executor.0", slots=2)
    ledger.dispatch(0.0)
    ledger.on_done("executor.0", [["t0", "r0", True, "", 1, 0.1], ["t1", "r1", False, "boom", 1, 0.1]], 0.1)
    assert [i[1] for i in ledger.take_settles(0.1)] == ["r0", "r1"]
    forget = ledger.on_settled(["r0", "r1"], ["acked", "released"])
    assert forget == {"executor.0": ["r0", "r1"]}
    assert ledger.entries == {} and ledger.by_task == {}


def test_unconfirmed_settles_are_sent_again_after_resend_secs_or_a_reaper_restart():
    ledger = make(resend=2.0)
    hello(ledger, "executor.0")
    ledger.add_leased(leased(1), now=0.0)
    ledger.dispatch(0.0)
    ledger.on_done("executor.0", [["t0", "r0", True, "", 1, 0.1]], 0.1)
    assert len(ledger.take_settles(0.1)) == 1
    assert ledger.take_settles(1.0) == []
    assert len(ledger.take_settles(2.2)) == 1
    assert len(ledger.take_settles(2.3, reaper_restarted=True)) == 1


def test_leaser_restart_adopts_running_and_finished_tasks_from_hello():
    ledger = make()  # a fresh leaser: it knows nothing
    hello(ledger, "executor.0", slots=2, running=[["t0", "r0", 2, 40.0]],
          finished=[["t1", "r1", True, "", 1, 0.3]], now=100.0)
    assert ledger.entries["r0"].state == RUNNING
    # their deadlines are unknown: extend both at once (a finished task still needs its lease until acked)
    assert ledger.due_extensions(100.0) == ["r0", "r1"]
    assert ledger.entries["r1"].state == FINISHED
    assert ledger.take_settles(100.0) == [["t1", "r1", True, "", 1]]


def test_done_for_an_unknown_receipt_is_forgotten():
    ledger = make()
    hello(ledger, "executor.0")
    assert ledger.on_done("executor.0", [["tx", "rx", True, "", 1, 0.1]], 0.0) == ["rx"]


def test_tasks_past_max_attempts_are_returned_for_the_dead_letter():
    ledger = make(max_attempts=3)
    too_many = ledger.add_leased(leased(1, attempt=4) + leased(1, start=1, attempt=3), now=0.0)
    assert [t.task_id for t in too_many] == ["t0"]
    assert list(ledger.held) == ["r1"]


def test_take_held_returns_undispatched_tasks_only():
    ledger = make()
    hello(ledger, "executor.0")
    ledger.add_leased(leased(3), now=0.0)
    ledger.dispatch(0.0)
    assert ledger.take_held() == ["r1", "r2"]
    assert set(ledger.entries) == {"r0"}


@pytest.mark.parametrize("max_in_flight, expected", [(0, 6), (3, 3)])
def test_want_fills_capacity_or_the_configured_cap(max_in_flight, expected):
    ledger = make()
    hello(ledger, "executor.0", slots=2)  # 2 slots x (the running task + 2 dispatch runs of 1)
    assert ledger.want(max_in_flight) == expected


def finish(ledger, count, now):
    """The first ``count`` running tasks of executor.0 finish (0.5 s each: runs of one task)."""
    receipts = sorted(ledger.peers["executor.0"].running)[:count]
    ledger.on_done("executor.0", [[ledger.entries[r].task_id, r, True, "", 1, 0.5] for r in receipts], now)
    ledger.dispatch(now)


def test_lease_calls_wait_for_room_for_half_the_limit():
    ledger = make()
    hello(ledger, "executor.0", slots=2)  # limit 6
    assert ledger.lease_now(0)  # nothing in flight
    ledger.add_leased(leased(6), now=0.0)
    ledger.dispatch(0.0)  # 2 running, 4 held
    assert not ledger.lease_now(0)
    finish(ledger, 1, now=0.5)
    assert ledger.want(0) == 1 and not ledger.lease_now(0)
    finish(ledger, 1, now=1.0)
    assert ledger.want(0) == 2 and not ledger.lease_now(0)
    finish(ledger, 1, now=1.5)
    assert ledger.want(0) == 3 and ledger.lease_now(0)  # room for half: one call brings three


def test_a_configured_max_in_flight_leases_into_any_room():
    ledger = make()
    hello(ledger, "executor.0", slots=2)
    ledger.add_leased(leased(7), now=0.0)
    ledger.dispatch(0.0)
    assert not ledger.lease_now(7)
    finish(ledger, 1, now=0.5)
    assert ledger.want(7) == 1 and ledger.lease_now(7)


def test_retiring_executor_gets_no_work():
    ledger = make()
    hello(ledger, "executor.0", slots=0)
    ledger.add_leased(leased(1), now=0.0)
    assert ledger.dispatch(0.0) == []


def test_executor_death_blames_only_the_task_it_was_running_and_returns_the_rest_unstarted():
    ledger = make()
    hello(ledger, "executor.0", incarnation=100)
    ledger.add_leased(leased(1), now=0.0)
    (_, items), = ledger.dispatch(0.0)
    ledger.on_done("executor.0", [[items[0][0], items[0][1], True, "", 1, 0.00001]], now=0.0)
    ledger.add_leased(leased(5, start=1), now=0.0)
    (_, run), = ledger.dispatch(0.0)  # a run of five tiny tasks, executed in this order
    assert [i[1] for i in run] == ["r1", "r2", "r3", "r4", "r5"]
    ledger.on_done("executor.0", [["t1", "r1", True, "", 1, 0.00001]], now=0.1)  # r1 finished
    never_started = ledger.on_hello("executor.0", "executor", 200, 1, [], [], now=0.2)
    assert never_started == ["r3", "r4", "r5"]
    blamed = [i for i in ledger.take_settles(0.2) if not i[2]]
    assert [i[1] for i in blamed] == ["r2"] and "executor died while running it" in blamed[0][3]
    assert set(ledger.entries) == {"r0", "r1", "r2"}


def test_an_executor_is_never_given_more_than_its_max_tasks_per_child():
    ledger = Ledger(Policy(30.0, 7200.0, 5, 2.0, max_tasks_per_child=3), rng=random.Random(1))
    hello(ledger, "executor.0", slots=2)
    ledger.add_leased(leased(10), now=0.0)
    (_, first), = ledger.dispatch(0.0)
    assert len(first) == 2
    ledger.on_done("executor.0", [[i[0], i[1], True, "", 1, 0.5] for i in first], now=0.5)
    (_, second), = ledger.dispatch(0.5)
    assert len(second) == 1  # the third and last before it retires
    ledger.on_done("executor.0", [[i[0], i[1], True, "", 1, 0.5] for i in second], now=1.0)
    assert ledger.dispatch(1.0) == []
    hello(ledger, "executor.0", slots=2, incarnation=200, now=2.0)  # its replacement starts afresh
    (_, third), = ledger.dispatch(2.0)
    assert len(third) == 2
