"""What to do with a finished task: ack it, release it for another try after a backoff, or
dead-letter it. Pure."""

from __future__ import annotations

ACK, RELEASE, DEAD = "ack", "release", "dead"


def settle_action(ok: bool, attempt: int, max_attempts: int) -> str:
    """ACK a success; a failure is RELEASEd while attempts remain, else sent to the DEAD letter.
    ``attempt`` is the delivery that just failed (1 on the first)."""
    if ok:
        return ACK
    return RELEASE if attempt < max_attempts else DEAD


def backoff_delay(attempt: int, base_secs: float, max_secs: float, jitter: float) -> float:
    """Seconds before a failed task may run again: ``min(max, base * 2^(attempt-1)) * jitter``,
    with ``jitter`` drawn from U(1, 2) by the caller (so many failures do not return in lock-step)."""
    exponent = min(max(attempt, 1) - 1, 62)  # past 2^62 the cap decides anyway
    return min(max_secs, base_secs * (2.0 ** exponent)) * jitter


def dead_reason(attempt: int, error: str) -> str:
    return f"failed {attempt} attempt{'s' if attempt != 1 else ''}; last error: {error or 'unknown'}"
