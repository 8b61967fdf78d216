"""The wire: every message round-trips, and nothing malformed gets past decode."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from children import protocol as p

SAMPLES = [
    p.Ready("leaser", 123),
    p.Heartbeat("executor.1", 99, {"tasks_total": 5, "running": 1}),
    p.Request("status", {}),
    p.Reply(True, {"children": []}, ""),
    p.Hello("executor.0", "executor", 42, 2, [["t1", "r1", 1, 0.5]], [["t2", "r2", True, "", 1, 0.01]]),
    p.Ping("reaper", 7),
    p.Sync(8),
    p.Tasks([["t1", "r1", b"\x00\xff payload", 1, ""], ["t2", "r2", b"", 3, "tag"]]),
    p.Done([["t1", "r1", False, "exit 3", 1, 0.25]]),
    p.Settle([["t1", "r1", True, "", 2]]),
    p.Settled(["r1", "r2"], ["acked", "lost"]),
    p.Forget(["r1"]),
    p.Abort([], "cold shutdown"),
    p.Return(["r7"]),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    assert p.decode(p.encode(message)) == message


def test_every_message_type_has_a_sample():
    assert {type(m) for m in SAMPLES} == set(p.MESSAGES.values())


@pytest.mark.parametrize("frame, needle", [
    (b"", "not msgpack"),
    (b"\xc1", "not msgpack"),
    (msgpack.packb({"a": 1}), "not a message array"),
    (msgpack.packb([2, 1, "x", 1]), "protocol version"),
    (msgpack.packb([1, 999]), "unknown message code"),
    (msgpack.packb([1, True, "x", 1]), "unknown message code"),
    (msgpack.packb([1, 1, "x"]), "1 fields, expected 2"),
    (msgpack.packb([1, 1, "x", "notint"]), "Ready.pid"),
    (msgpack.packb([1, 1, "x", True]), "Ready.pid"),
    (msgpack.packb([1, 23, [["t", "r", "str-not-bytes", 1, ""]]], use_bin_type=True), "Tasks.items[0][2]"),
    (msgpack.packb([1, 23, [["t", "r"]]]), "Tasks.items[0]: not a 5-item array"),
    (msgpack.packb([1, 23, "x"]), "Tasks.items: not a list"),
])
def test_malformed_frames_raise_protocol_error(frame, needle):
    with pytest.raises(p.ProtocolError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        p.decode(frame)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_protocol_error(frame):
    try:
        p.decode(frame)
    except p.ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_truncated_frames_are_rejected(message, data):
    frame = p.encode(message)
    cut = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
    with pytest.raises(p.ProtocolError):
        p.decode(frame[:cut])


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 30), st.lists(json_like, max_size=7))
def test_well_formed_arrays_with_random_fields_decode_or_raise_protocol_error(code, fields):
    frame = msgpack.packb([p.VERSION, code, *fields], use_bin_type=True)
    try:
        message = p.decode(frame)
    except p.ProtocolError:
        return
    assert isinstance(message, p.Message)
