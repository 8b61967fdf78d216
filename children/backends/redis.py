"""Redis Streams backend: ``redis://[user:password@]host:port/db`` (or ``rediss://`` for TLS), redis-py.

Layout, all keys under ``leasetree:{<queue>}:`` (one hash tag, so a cluster keeps a queue on one slot):

- ``t:<id>``   a hash per task: payload ``p``, tag ``g``, attempts ``n``, enqueued-at ms ``e``, state
  ``s`` (q = in its stream, l = leased, d = delayed, x = dead), stream entry ``x``, lease token ``k``,
  holder ``c``, lease deadline or due time in ms ``v``, last error ``r``, dead reason ``R``.
- ``s:<tag>``  a stream per tag with one consumer group; an entry ``{t: id}`` is a ready task, and a
  delivered entry sits in the group's pending list (PEL) until it is settled.
- ``l:<tag>``  a ZSET task id -> lease deadline (ms). Redis tracks idle time per *entry*, while our
  leases are per *call*, so XAUTOCLAIM's single min-idle cannot honour them: reclaim reads this index
  and XCLAIMs exactly the expired entries instead.
- ``delayed``  a ZSET id -> due ms (delayed enqueue and release with delay); the next lease moves the
  due ones into their streams. ``live`` / ``dead``: ZSETs id -> enqueue sequence, the admin index.
- ``seq``      the counter behind task ids and lease tokens; ``tags``: the set of tags with a stream;
  ``wake``     a one-entry stream that enqueue and release touch, so idle leasers block on XREAD.

Every state change is one Lua script (EVALSHA), so check-and-settle is atomic: a receipt is
``<id>:<token>`` and a settle whose token is not the task's current one answers LOST. Server time
(``TIME``) drives every deadline, so hosts with skewed clocks agree.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from children.backends import redact_url
from children.backends.base import (
    Backend,
    BackendConfigError,
    BackendUnavailable,
    Leased,
    Limits,
    Outcome,
    QueueStats,
    TaskInfo,
    TaskState,
)

GROUP = "leasetree"
# A blocking XREAD never outlasts the socket timeout: long waits are cut into chunks of this.
_BLOCK_CHUNK_SECS = 10.0
_SOCKET_TIMEOUT_SECS = 30.0

_LUA_PRELUDE = r"""
local P = ARGV[1]
local G = 'leasetree'
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function tkey(id) return P .. 't:' .. id end
local function skey(tag) return P .. 's:' .. tag end
local function lkey(tag) return P .. 'l:' .. tag end
local function wake() redis.call('XADD', P .. 'wake', 'MAXLEN', '1', '*', 'w', '1') end
-- append a task to its tag's stream: ready for the next lease
local function to_stream(id, tag)
  local s = skey(tag)
  if redis.call('EXISTS', s) == 0 then
    redis.call('XGROUP', 'CREATE', s, G, '0', 'MKSTREAM')
  end
  redis.call('SADD', P .. 'tags', tag)
  local e = redis.call('XADD', s, '*', 't', id)
  redis.call('HSET', tkey(id), 's', 'q', 'x', e)
  redis.call('HDEL', tkey(id), 'k', 'c', 'v')
end
-- take a delivered or queued entry out of its stream, its PEL and the lease index
local function from_stream(id, tag, entry)
  local s = skey(tag)
  redis.call('XACK', s, G, entry)
  redis.call('XDEL', s, entry)
  redis.call('ZREM', lkey(tag), id)
end
local function tags_of(any, tag)
  if any == '1' then return redis.call('SMEMBERS', P .. 'tags') end
  return {tag}
end
-- the entries nobody has read yet (after the group's last-delivered-id), at most n, as
-- {ms, task id, tag}: entry ids are per stream, so across streams the order is (ms, task id)
local function undelivered(tag, n)
  local s = skey(tag)
  if redis.call('EXISTS', s) == 0 then return {} end
  local last = '0-0'
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', s)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == G then last = info['last-delivered-id'] end
  end
  local out = {}
  for _, e in ipairs(redis.call('XRANGE', s, '(' .. last, '+', 'COUNT', n)) do
    out[#out + 1] = {tonumber(string.match(e[1], '^(%d+)')), tonumber(e[2][2]), tag}
  end
  return out
end
local function older(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[2] < b[2]
end
"""

# lease: ARGV = P, consumer, max_tasks, lease_ms, any ('1' = every tag), tag.
# Returns {flat deliveries (id, token, payload, attempt, tag)..., wake id, ms until the next delayed task
# is due or lease expires (-1: none), ready 0/1 (work is ready now; meaningful when nothing was leased)}.
_LUA_LEASE = _LUA_PRELUDE + r"""
local consumer, want, lease, any, tag = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]
local now = now_ms()
local deadline = now + lease
-- 1. delayed tasks that are due join their streams (whoever leases next does this)
local due = redis.call('ZRANGEBYSCORE', P .. 'delayed', '-inf', now, 'LIMIT', 0, 1000)
for _, id in ipairs(due) do
  redis.call('ZREM', P .. 'delayed', id)
  local g = redis.call('HGET', tkey(id), 'g')
  if g then to_stream(id, g) end
end
if #due > 0 then wake() end
local tags = tags_of(any, tag)
local out, got = {}, 0
local function deliver(id, g, entry)
  local k = tkey(id)
  local tok = redis.call('INCR', P .. 'seq')
  local n = redis.call('HINCRBY', k, 'n', 1)
  redis.call('HSET', k, 's', 'l', 'x', entry, 'k', tok, 'c', consumer, 'v', deadline)
  redis.call('ZADD', lkey(g), deadline, id)
  for _, v in ipairs({id, tok, redis.call('HGET', k, 'p'), n, g}) do out[#out + 1] = v end
  got = got + 1
end
-- 2. expired leases first (they are the oldest work); XCLAIM resets the entry's idle time
for _, g in ipairs(tags) do
  if got >= want then break end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', lkey(g), '-inf', now, 'LIMIT', 0, want - got)) do
    local entry = redis.call('HGET', tkey(id), 'x')
    local claimed = {}
    if entry then claimed = redis.call('XCLAIM', skey(g), G, consumer, 0, entry, 'JUSTID') end
    if #claimed == 1 then deliver(id, g, entry)
    elseif entry then
      -- the entry left the PEL behind our back (XGROUP DELCONSUMER, XDEL): queue the task afresh
      from_stream(id, g, entry)
      to_stream(id, g)
    else redis.call('ZREM', lkey(g), id) end
  end
end
-- 3. new entries, oldest first across the tags' streams
if got < want then
  local per_tag = {}
  if #tags == 1 then
    per_tag[tags[1]] = want - got
  else
    local cands = {}
    for _, g in ipairs(tags) do
      for _, c in ipairs(undelivered(g, want - got)) do cands[#cands + 1] = c end
    end
    table.sort(cands, older)
    for i = 1, math.min(#cands, want - got) do per_tag[cands[i][3]] = (per_tag[cands[i][3]] or 0) + 1 end
  end
  local read = {}
  for g, count in pairs(per_tag) do
    local r = false
    if redis.call('EXISTS', skey(g)) == 1 then
      r = redis.call('XREADGROUP', 'GROUP', G, consumer, 'COUNT', count, 'STREAMS', skey(g), '>')
    end
    if r then
      for _, e in ipairs(r[1][2]) do
        read[#read + 1] = {tonumber(string.match(e[1], '^(%d+)')), tonumber(e[2][2]), g, e[1], e[2][2]}
      end
    end
  end
  table.sort(read, older)
  for _, e in ipairs(read) do
    if redis.call('EXISTS', tkey(e[5])) == 1 then deliver(e[5], e[3], e[4])
    else from_stream(e[5], e[3], e[4]) end
  end
end
if got > 0 then return {out, '', -1, 1} end
-- nothing leased: tell a blocking caller what to wait on and until when
local last = redis.call('XREVRANGE', P .. 'wake', '+', '-', 'COUNT', 1)
local wid = '0-0'
if #last > 0 then wid = last[1][1] end
local next_due = -1
local ready = 0
local function consider(key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #first > 0 then
    local at = math.max(0, tonumber(first[2]) - now)
    if next_due < 0 or at < next_due then next_due = at end
    if at == 0 then ready = 1 end
  end
end
consider(P .. 'delayed')
for _, g in ipairs(tags) do
  consider(lkey(g))
  if #undelivered(g, 1) > 0 then ready = 1 end
end
return {out, wid, next_due, ready}
"""

# settle: ARGV = P, op (ack|extend|release|dead), lease_ms, then per receipt 5 values:
# id, token, number (release delay ms), '1' when a string follows / '0', string (error or reason).
# Returns 1 (ok) or 0 (lost) per receipt, in order.
_LUA_SETTLE = _LUA_PRELUDE + r"""
local op, lease = ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local res, woke = {}, false
for i = 4, #ARGV, 5 do
  local id, tok = ARGV[i], ARGV[i + 1]
  local k = tkey(id)
  local h = redis.call('HMGET', k, 's', 'k', 'g', 'x', 'c')
  if h[1] ~= 'l' or h[2] ~= tok then
    res[#res + 1] = 0
  else
    local g, entry = h[3], h[4]
    if op == 'extend' then
      redis.call('HSET', k, 'v', now + lease)
      redis.call('ZADD', lkey(g), now + lease, id)
      -- same consumer, IDLE 0: keeps XPENDING truthful for an operator looking at the stream
      redis.call('XCLAIM', skey(g), G, h[5], 0, entry, 'JUSTID')
    else
      from_stream(id, g, entry)
      if op == 'ack' then
        redis.call('DEL', k)
        redis.call('ZREM', P .. 'live', id)
      elseif op == 'release' then
        if ARGV[i + 3] == '1' then redis.call('HSET', k, 'r', ARGV[i + 4]) end
        -- lease_ms < 0 on a release: the delivery never started the task, take it back
        if lease < 0 and tonumber(redis.call('HGET', k, 'n') or '0') > 0 then
          redis.call('HINCRBY', k, 'n', -1)
        end
        local delay = tonumber(ARGV[i + 2])
        if delay > 0 then
          redis.call('HSET', k, 's', 'd', 'v', now + delay)
          redis.call('HDEL', k, 'k', 'c')
          redis.call('ZADD', P .. 'delayed', now + delay, id)
        else
          to_stream(id, g)
        end
        woke = true
      else -- dead
        local seq = redis.call('ZSCORE', P .. 'live', id) or 0
        redis.call('ZREM', P .. 'live', id)
        redis.call('ZADD', P .. 'dead', seq, id)
        redis.call('HSET', k, 's', 'x', 'R', ARGV[i + 4])
        redis.call('HDEL', k, 'k', 'c', 'v')
      end
    end
    res[#res + 1] = 1
  end
end
if woke then wake() end
return res
"""

# enqueue: ARGV = P, delay_ms, tag, payloads... Returns {enqueued-at ms, first id}; ids are consecutive.
_LUA_ENQUEUE = _LUA_PRELUDE + r"""
local delay, tag = tonumber(ARGV[2]), ARGV[3]
local now = now_ms()
local n = #ARGV - 3
local last = redis.call('INCRBY', P .. 'seq', n)
for i = 1, n do
  local seq = last - n + i
  local id = tostring(seq)
  redis.call('HSET', tkey(id), 'p', ARGV[3 + i], 'g', tag, 'n', 0, 'e', now)
  redis.call('ZADD', P .. 'live', seq, id)
  if delay > 0 then
    redis.call('HSET', tkey(id), 's', 'd', 'v', now + delay)
    redis.call('ZADD', P .. 'delayed', now + delay, id)
  else
    to_stream(id, tag)
  end
end
-- a delayed task wakes waiters too: one blocked until a later due time must wait less now
if n > 0 then wake() end
return {now, last - n + 1}
"""

# admin: ARGV = P, op (delete|requeue), ids... Returns how many tasks it changed.
_LUA_ADMIN = _LUA_PRELUDE + r"""
local op = ARGV[2]
local count = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local k = tkey(id)
  local h = redis.call('HMGET', k, 's', 'g', 'x')
  if op == 'delete' and h[1] then
    if h[1] == 'q' or h[1] == 'l' then from_stream(id, h[2], h[3]) end
    redis.call('ZREM', P .. 'delayed', id)
    redis.call('ZREM', P .. 'live', id)
    redis.call('ZREM', P .. 'dead', id)
    redis.call('DEL', k)
    count = count + 1
  elseif op == 'requeue' and h[1] == 'x' then
    local seq = redis.call('ZSCORE', P .. 'dead', id)
    redis.call('ZREM', P .. 'dead', id)
    redis.call('ZADD', P .. 'live', seq, id)
    redis.call('HSET', k, 'n', 0)
    redis.call('HDEL', k, 'R')
    to_stream(id, h[2])
    count = count + 1
  end
end
if op == 'requeue' and count > 0 then wake() end
return count
"""

# stats: ARGV = P. Returns {ready, leased, delayed, dead, oldest enqueued-at ms or -1, now ms}.
_LUA_STATS = _LUA_PRELUDE + r"""
local now = now_ms()
local ready, leased = 0, 0
for _, g in ipairs(redis.call('SMEMBERS', P .. 'tags')) do
  local inflight = redis.call('ZCARD', lkey(g))
  local expired = redis.call('ZCOUNT', lkey(g), '-inf', now)
  ready = ready + redis.call('XLEN', skey(g)) - inflight + expired
  leased = leased + inflight - expired
end
local due = redis.call('ZCOUNT', P .. 'delayed', '-inf', now)
local delayed = redis.call('ZCARD', P .. 'delayed') - due
local oldest = -1
local first = redis.call('ZRANGE', P .. 'live', 0, 0)
if #first > 0 then oldest = tonumber(redis.call('HGET', tkey(first[1]), 'e')) end
return {ready + due, leased, delayed, redis.call('ZCARD', P .. 'dead'), oldest, now}
"""

# close: ARGV = P, consumer, idle ms. Forgets this consumer and long-idle ones that hold nothing, so
# the group does not collect one consumer per process ever started.
_LUA_FORGET = _LUA_PRELUDE + r"""
local me, idle_max = ARGV[2], tonumber(ARGV[3])
for _, g in ipairs(redis.call('SMEMBERS', P .. 'tags')) do
  local s = skey(g)
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', s, G)
  if ok then
    for _, c in ipairs(consumers) do
      local info = {}
      for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
      if info['pending'] == 0 and (info['name'] == me or info['idle'] > idle_max) then
        redis.call('XGROUP', 'DELCONSUMER', s, G, info['name'])
      end
    end
  end
end
return 0
"""


def _ms(secs: float) -> int:
    return max(0, round(secs * 1000))


class RedisBackend(Backend):
    """A queue on Redis Streams; one instance per process (its consumer name is unique to it)."""

    name = "redis"

    def __init__(self, url: str, name: str, base_dir: Path) -> None:
        if not name:
            raise BackendConfigError("queue.name = '': a queue name must not be empty")
        self._where = redact_url(url)
        self._consumer = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        try:
            # No client-side retry: a retried script could run twice (enqueue twice, lease a batch
            # nobody holds). A fault surfaces as BackendUnavailable; the caller retries the call.
            self._redis = redis.Redis.from_url(
                url, socket_timeout=_SOCKET_TIMEOUT_SECS, socket_connect_timeout=5.0,
                retry=Retry(NoBackoff(), 0), retry_on_error=[], client_name=self.client_name)
        except ValueError as exc:
            raise BackendConfigError(f"queue.url = {self._where!r}: {exc}") from None
        self._prefix = f"leasetree:{{{name}}}:"
        self._lease = self._redis.register_script(_LUA_LEASE)
        self._settle = self._redis.register_script(_LUA_SETTLE)
        self._enqueue = self._redis.register_script(_LUA_ENQUEUE)
        self._admin = self._redis.register_script(_LUA_ADMIN)
        self._stats = self._redis.register_script(_LUA_STATS)
        self._forget = self._redis.register_script(_LUA_FORGET)
        self._limits = Limits(min_lease_secs=0.01)
        self._closed = False

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def consumer(self) -> str:
        """This instance's consumer name in the group: ``host:pid:random``."""
        return self._consumer

    @property
    def client_name(self) -> str:
        """The name its connections carry (CLIENT LIST), so an operator can tell who is who."""
        return "leasetree:" + self._consumer

    def _run(self, script, *args: object):
        """Run one script; map driver faults onto the backend's two error kinds."""
        return self._call(lambda: script(args=[self._prefix, *args]))

    def _call(self, fn):
        try:
            return fn()
        except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
            raise BackendConfigError(f"queue.url = {self._where!r}: {exc}") from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise BackendUnavailable(f"redis at {self._where} unavailable: {exc}") from None
        except redis.ResponseError as exc:
            text = str(exc)
            if text.startswith(("LOADING", "READONLY", "OOM", "MASTERDOWN", "TRYAGAIN", "BUSY")):
                raise BackendUnavailable(f"redis at {self._where}: {text}") from None
            if "WRONGTYPE" in text or "NOPERM" in text:
                raise BackendConfigError(
                    f"queue.url = {self._where!r}: keys {self._prefix}* are not usable: {text}") from None
            raise

    # -- the data path -------------------------------------------------------------------------
    def lease(self, max_tasks: int, lease_secs: float, wait_secs: float = 0.0,
              tag: str | None = None) -> list[Leased]:
        """See ``Backend.lease``. With ``wait_secs`` it blocks on XREAD of the wake-up stream, cut
        short when a delayed task falls due or a lease expires, so a wake-up costs one round-trip."""
        want = min(max_tasks, self._limits.max_lease_batch)
        if want <= 0:
            return []
        lease_ms = max(1, _ms(lease_secs))
        until = time.monotonic() + max(0.0, wait_secs)
        while True:
            flat, wake_id, next_due_ms, _ready = self._run(
                self._lease, self._consumer, want, lease_ms, "1" if tag is None else "0", tag or "")
            if flat:
                return [
                    Leased(task_id=flat[i].decode(), receipt=f"{flat[i].decode()}:{flat[i + 1]}",
                           payload=flat[i + 2], attempt=int(flat[i + 3]), tag=flat[i + 4].decode())
                    for i in range(0, len(flat), 5)]
            if self._wait(until, wake_id, next_due_ms) is None:
                return []

    def _wait(self, until: float, wake_id: bytes, next_due_ms: int) -> bool | None:
        """Block on the wake-up stream, at most until ``until`` (monotonic) and the next due time.

        Returns None when ``until`` has already passed, else whether the stream moved (an enqueue or
        a release happened since ``wake_id`` was read)."""
        remaining = until - time.monotonic()
        if remaining <= 0:
            return None
        block = min(remaining, _BLOCK_CHUNK_SECS)
        if next_due_ms >= 0:
            block = min(block, next_due_ms / 1000)
        # BLOCK 0 would mean forever: a due time already reached still blocks 1 ms at least
        moved = self._call(lambda: self._redis.xread(
            {self._prefix + "wake": wake_id}, count=1, block=max(1, _ms(block))))
        return bool(moved)

    def wait_for_work(self, timeout_secs: float) -> bool:
        """Block up to ``timeout_secs`` on the wake-up stream; True as soon as a task is leasable.
        A wake-up for work that is not leasable yet (a delayed enqueue) only shortens the wait."""
        until = time.monotonic() + max(0.0, timeout_secs)
        while True:
            _flat, wake_id, next_due_ms, ready = self._run(self._lease, self._consumer, 0, 1, "1", "")
            if ready:
                return True
            if self._wait(until, wake_id, next_due_ms) is None:
                return False

    def _settle_call(self, op: str, receipts: Sequence[str], lease_ms: int = 0,
                     numbers: Sequence[int] | None = None,
                     strings: Sequence[str] | None = None) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        args: list[object] = []
        order: list[str] = []
        seen: set[str] = set()
        for i, receipt in enumerate(receipts):
            if receipt in seen:
                continue  # a duplicate in the batch settles once; the first one's values win
            seen.add(receipt)
            task_id, sep, token = receipt.rpartition(":")
            if not sep or not task_id or not token.isdigit():
                outcomes[receipt] = Outcome.LOST
                continue
            order.append(receipt)
            text = None if strings is None else strings[i]
            args += [task_id, token, numbers[i] if numbers else 0,
                     "0" if text is None else "1", text or ""]
        if order:
            results = self._run(self._settle, op, lease_ms, *args)
            for receipt, ok in zip(order, results, strict=True):
                outcomes[receipt] = Outcome.OK if ok else Outcome.LOST
        return outcomes

    def extend(self, receipts: Sequence[str], lease_secs: float) -> dict[str, Outcome]:
        return self._settle_call("extend", receipts, lease_ms=max(1, _ms(lease_secs)))

    def ack(self, receipts: Sequence[str]) -> dict[str, Outcome]:
        return self._settle_call("ack", receipts)

    def release(self, receipts: Sequence[str], delay_secs: float | Sequence[float] = 0.0,
                errors: Sequence[str] | None = None, count_attempt: bool = True) -> dict[str, Outcome]:
        delays = ([delay_secs] * len(receipts) if isinstance(delay_secs, int | float)
                  else list(delay_secs))
        return self._settle_call("release", receipts, lease_ms=0 if count_attempt else -1,
                                 numbers=[_ms(d) for d in delays],
                                 strings=list(errors) if errors is not None else None)

    def dead_letter(self, receipts: Sequence[str], reason: str | Sequence[str]) -> dict[str, Outcome]:
        reasons = [reason] * len(receipts) if isinstance(reason, str) else list(reason)
        return self._settle_call("dead", receipts, strings=reasons)

    def enqueue(self, payloads: Sequence[bytes], delay_secs: float = 0.0, tag: str = "") -> list[str]:
        """See ``Backend.enqueue``; one script, so the batch lands atomically."""
        if not payloads:
            return []
        for payload in payloads:
            if len(payload) > self._limits.max_payload_bytes:
                raise ValueError(f"payload of {len(payload)} bytes exceeds the redis backend's "
                                 f"max_payload_bytes = {self._limits.max_payload_bytes}")
        _now, first = self._run(self._enqueue, _ms(delay_secs), tag, *payloads)
        return [str(first + i) for i in range(len(payloads))]

    def stats(self) -> QueueStats:
        ready, leased, delayed, dead, oldest_ms, now_ms = self._run(self._stats)
        return QueueStats(ready=ready, leased=leased, delayed=delayed, dead=dead,
                          oldest_age_secs=None if oldest_ms < 0 else max(0.0, (now_ms - oldest_ms) / 1000))

    # -- admin ---------------------------------------------------------------------------------
    def _infos(self, ids: Sequence[bytes | str]) -> list[TaskInfo]:
        def fetch():
            pipe = self._redis.pipeline(transaction=False)
            pipe.time()
            for task_id in ids:
                pipe.hgetall(self._prefix + "t:" + _text(task_id))
            return pipe.execute()

        (seconds, micros), *hashes = self._call(fetch)
        now_ms = seconds * 1000 + micros // 1000
        return [_info(_text(task_id), h, now_ms) for task_id, h in zip(ids, hashes, strict=True) if h]

    def list_tasks(self, state: TaskState | None = None, limit: int = 100) -> list[TaskInfo]:
        """Oldest first. Ready, leased and delayed tasks share one index, so a state filter walks
        it in chunks: an admin call, not for the data path."""
        indexes = ["dead"] if state is TaskState.DEAD else (
            ["live"] if state is not None else ["live", "dead"])
        out: list[TaskInfo] = []
        for index in indexes:
            found: list[TaskInfo] = []
            start = 0
            while len(found) < limit:
                ids = self._call(lambda s=start, i=index: self._redis.zrange(self._prefix + i, s, s + 499))
                if not ids:
                    break
                start += len(ids)
                found += [t for t in self._infos(ids) if state is None or t.state is state]
            out += found[:limit]
        out.sort(key=lambda t: int(t.task_id))  # ids are the enqueue sequence: oldest first
        return out[:limit]

    def get(self, task_id: str) -> TaskInfo | None:
        found = self._infos([task_id])
        return found[0] if found else None

    def delete(self, task_ids: Sequence[str]) -> int:
        return self._run(self._admin, "delete", *task_ids) if task_ids else 0

    def requeue_dead(self, task_ids: Sequence[str] | None = None) -> int:
        if task_ids is not None:
            return self._run(self._admin, "requeue", *task_ids) if task_ids else 0
        moved = 0
        while ids := self._call(lambda: self._redis.zrange(self._prefix + "dead", 0, 999)):
            moved += self._run(self._admin, "requeue", *ids)
        return moved

    def purge(self) -> int:
        """Delete every task, chunk by chunk (one huge script would stall the server)."""
        purged = 0
        for index in ("live", "dead"):
            while ids := self._call(lambda i=index: self._redis.zrange(self._prefix + i, 0, 999)):
                purged += self._run(self._admin, "delete", *ids)
        return purged

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._forget(args=[self._prefix, self._consumer, 3600 * 1000])
        except redis.RedisError:
            pass  # best effort: a consumer left behind holds nothing and is pruned by a later close
        self._redis.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _info(task_id: str, h: dict[bytes, bytes], now_ms: int) -> TaskInfo:
    """The admin view of one task hash; an expired lease or a due delay reads as READY."""
    code = h.get(b"s", b"q")
    visible_ms = int(h[b"v"]) if b"v" in h else None
    if code == b"x":
        state = TaskState.DEAD
    elif code in (b"l", b"d") and visible_ms is not None and visible_ms > now_ms:
        state = TaskState.LEASED if code == b"l" else TaskState.DELAYED
    else:
        state = TaskState.READY
    return TaskInfo(
        task_id=task_id, state=state, payload=h.get(b"p", b""), attempt=int(h.get(b"n", 0)),
        tag=h.get(b"g", b"").decode(), enqueued_at=int(h.get(b"e", 0)) / 1000,
        visible_at=visible_ms / 1000 if state in (TaskState.LEASED, TaskState.DELAYED) else None,
        last_error=h.get(b"r", b"").decode(), dead_reason=h.get(b"R", b"").decode())
