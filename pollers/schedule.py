"""When a tracked message is polled: one interval after registration, then at doubling intervals
up to the cap (CONTRACT.md section 2). Pure functions of the registration time, so every replica
and every restart agrees without storing a schedule."""

from __future__ import annotations


def next_poll(base: float, after: float, first: float, interval: float, cap: float) -> float:
    """The first poll time strictly after `after`, for a message registered at `base`.

    Polls fall at base+first, then each gap doubles from `interval` until it reaches `cap`.
    """
    t = base + first
    gap = interval
    while t <= after and gap < cap:
        t += gap
        gap = min(gap * 2, cap)
    if t <= after:  # in the capped phase: jump whole gaps at once
        steps = int((after - t) // cap) + 1
        t += steps * cap
    return t
