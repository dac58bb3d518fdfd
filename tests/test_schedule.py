"""The schedule of tracked messages, on a clock of the test's own: first poll one interval after
registration, doubling gaps up to the cap, batches topped up, expiry at the TTL."""

from __future__ import annotations

from pollers.schedule import Schedule, next_poll

T0 = 1_000_000.0


class Messages(Schedule):
    """A schedule whose timing comes from a dict, as the engine's comes from the mirror."""

    def __init__(self, **overrides: float | bool) -> None:
        self.open: dict[str, tuple[float | None, float | None]] = {}
        settings: dict[str, float | bool] = dict(first=30.0, interval=30.0, cap=120.0, ttl=3600.0)
        super().__init__(**(settings | overrides), timing=self.open.get)  # type: ignore[arg-type]

    def register(self, message_id: str, *, registered: float, sent: float | None, after: float):
        self.open[message_id] = (registered, sent)
        assert self.push(message_id, after=after)


def schedule(**overrides: float | bool) -> Messages:
    return Messages(**overrides)


def test_next_poll_doubles_to_the_cap() -> None:
    polls = []
    after = T0
    for _ in range(6):
        after = next_poll(T0, after, 30, 30, 120)
        polls.append(after - T0)
    assert [30, 60, 120, 240, 360, 480] == polls


def test_a_message_is_due_one_interval_after_registration_then_at_doubling_gaps() -> None:
    s = schedule()
    s.register("1", registered=T0, sent=None, after=T0)
    assert ([], []) == _take(s, T0 + 29)
    assert (["1"], []) == _take(s, T0 + 30)
    assert ([], []) == _take(s, T0 + 31)  # taken: not due again until put back
    s.again("1", after=T0 + 30)
    assert ([], []) == _take(s, T0 + 59)
    assert (["1"], []) == _take(s, T0 + 60)


def test_an_id_left_taken_is_due_again_once_untaken_and_a_scheduled_one_stays_put() -> None:
    s = schedule()
    s.register("1", registered=T0, sent=None, after=T0)
    s.register("2", registered=T0 + 10, sent=None, after=T0)
    assert ["1"] == s.take(T0 + 30, batch=100, horizon=T0 + 30).poll
    for message_id in ("1", "2"):  # a new term: "1" was never put back, "2" was never taken
        s.untake(message_id, T0 + 35)
    assert (["1"], []) == _take(s, T0 + 35)
    assert ([], []) == _take(s, T0 + 39)
    assert (["2"], []) == _take(s, T0 + 40)


def test_a_partial_batch_is_topped_up_with_what_is_due_soon() -> None:
    s = schedule()
    for n in range(3):
        s.register(str(n), registered=T0 + n * 10, sent=None, after=T0)
    due = s.take(T0 + 30, batch=100, horizon=T0 + 45)
    assert ["0", "1"] == due.poll  # "2" is due at T0+50, past the horizon
    assert ["2"] == s.take(T0 + 50, batch=100, horizon=T0 + 50).poll


def test_take_tells_when_the_earliest_taken_was_due() -> None:
    s = schedule()
    s.register("late", registered=T0, sent=None, after=T0)  # due T0+30
    s.register("soon", registered=T0 + 12, sent=None, after=T0)  # due T0+42
    s.register("topped", registered=T0 + 20, sent=None, after=T0)  # due T0+50
    due = s.take(T0 + 45, batch=100, horizon=T0 + 60)
    assert ["late", "soon", "topped"] == due.poll
    assert T0 + 30 == due.since
    assert s.take(T0 + 100, batch=100, horizon=T0 + 100).since is None  # nothing due


def test_a_failed_poll_is_due_again_when_asked_and_expiry_wins() -> None:
    s = schedule(ttl=100.0)
    s.register("1", registered=T0, sent=T0 - 50, after=T0)  # the TTL counts from sent_at
    assert ["1"] == s.take(T0 + 30, batch=10, horizon=T0 + 30).poll
    s.retry("1", at=T0 + 31)
    assert ["1"] == s.take(T0 + 31, batch=10, horizon=T0 + 31).poll
    s.again("1", after=T0 + 31)  # next slot T0+60 is past the expiry at T0+50
    assert ([], ["1"]) == _take(s, T0 + 50)
    assert "1" not in s


def test_without_per_id_polls_only_the_expiry_is_scheduled() -> None:
    s = schedule(polled=False, ttl=100.0)
    s.register("1", registered=T0, sent=None, after=T0)
    assert ([], []) == _take(s, T0 + 99)
    assert ([], ["1"]) == _take(s, T0 + 100)


def test_a_dropped_message_is_never_due() -> None:
    s = schedule()
    s.register("1", registered=T0, sent=None, after=T0)
    s.drop("1")
    assert ([], []) == _take(s, T0 + 10_000)
    assert 0 == len(s)


def _take(s: Schedule, now: float) -> tuple[list[str], list[str]]:
    due = s.take(now, batch=100, horizon=now)
    return due.poll, due.expired


def test_a_message_no_longer_open_is_never_taken() -> None:
    s = schedule()
    s.register("1", registered=T0, sent=None, after=T0)
    s.register("2", registered=T0, sent=None, after=T0)
    del s.open["1"]  # final meanwhile (the mirror no longer has it open)
    assert (["2"], []) == _take(s, T0 + 30)
    assert "1" not in s
    assert not s.push("1", after=T0)


def test_due_in_a_second_not_before_it() -> None:
    s = schedule()
    s.register("1", registered=T0 + 0.25, sent=None, after=T0)  # due at T0 + 30.25
    assert ([], []) == _take(s, T0 + 30.2)
    assert (["1"], []) == _take(s, T0 + 31)


def test_take_stops_at_the_limit_and_the_rest_stays_due() -> None:
    s = schedule()
    for n in range(250):
        s.register(str(n), registered=T0, sent=None, after=T0)
    first = s.take(T0 + 30, batch=100, horizon=T0 + 30, limit=200).poll
    rest = s.take(T0 + 30, batch=100, horizon=T0 + 30, limit=200).poll
    assert (200, 50) == (len(first), len(rest))
    assert {str(n) for n in range(250)} == set(first) | set(rest)


def test_expiries_count_to_the_limit_where_each_is_polled_a_last_time() -> None:
    """Polled, each expiring message costs its share of a request (its last look): a round
    takes no more of them than of messages to poll. Without polls, expiries cost nothing."""
    for polled, counts in ((True, (200, 50)), (False, (250, 0))):
        s = schedule(ttl=100.0, polled=polled)
        for n in range(250):
            s.register(str(n), registered=T0, sent=T0 - 200, after=T0)  # its TTL long over
        first = s.take(T0 + 30, batch=100, horizon=T0 + 30, limit=200).expired
        rest = s.take(T0 + 30, batch=100, horizon=T0 + 30, limit=200).expired
        assert counts == (len(first), len(rest))
        assert {str(n) for n in range(250)} == set(first) | set(rest)


def test_many_messages_take_little_memory() -> None:
    import tracemalloc

    ids = [str(5_000_000_000 + n) for n in range(200_000)]
    s = schedule()
    for message_id in ids:
        s.open[message_id] = (T0, None)
    tracemalloc.start()
    for n, message_id in enumerate(ids):
        s.push(message_id, after=T0 + n / 2_000)
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert used / len(ids) < 80  # bytes a message: one dict entry and one list slot
