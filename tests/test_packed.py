"""The mirror's packed state gives back exactly the state that was packed, whatever its fields
hold (the bucket's copy is written from it), and its header answers the schedule's questions
without unpacking."""

from __future__ import annotations

from datetime import UTC

from hypothesis import given, settings
from hypothesis import strategies as st

from bus.events import rfc3339
from bus.messages import MessageState, TrackItem, fact_of, register
from bus.packed import is_open, pack, revision_of, times, unpack

text = st.one_of(st.none(), st.text(max_size=40))
moment = st.one_of(
    st.none(),
    st.datetimes(timezones=st.just(UTC)).map(rfc3339),
    st.text(max_size=30),  # not a time at all: kept as it is
    st.sampled_from(["2026-11-22T10:00:00.123456+03:00", "2026-11-22T10:00:00Z"]),
)
fact = st.one_of(
    st.text(alphabet="0123456789abcdef", min_size=16, max_size=16),
    st.text(max_size=20),  # an odd fact (a state written by hand): kept as text
)
numbers = st.one_of(
    st.none(),
    st.dictionaries(
        st.text(alphabet="0123456789", min_size=5, max_size=12),
        st.fixed_dictionaries(
            {"status": st.sampled_from(["sent", "delivered"]), "final": st.booleans()}
        ),  # fmt: skip
        max_size=4,
    ),
)
states = st.builds(
    MessageState,
    provider=st.sampled_from(["smspilot", "smspager", "smsc"]),
    message_id=st.text(min_size=1, max_size=30),
    tracked=st.booleans(),
    registered_at=moment,
    phone=text,
    client_ref=text,
    sent_at=moment,
    status=text,
    final=st.booleans(),
    provider_status=text,
    updated_at=moment,
    numbers=numbers,
    facts=st.lists(fact, max_size=5).map(tuple),
    traceparent=st.one_of(st.none(), st.just("00-" + "ab" * 16 + "-" + "cd" * 8 + "-01")),
)


@settings(max_examples=400, deadline=None)
@given(states, st.integers(min_value=0, max_value=2**64 - 1))
def test_unpack_gives_back_what_was_packed(state: MessageState, revision: int) -> None:
    blob = pack(state, revision)
    assert unpack(blob, state.provider, state.message_id) == (state, revision)
    assert revision_of(blob) == revision
    assert is_open(blob) == (state.tracked and not state.final)


def test_a_registration_is_small_and_its_times_are_in_the_header() -> None:
    item = TrackItem("smstower", "123456789", "79131437355", "order-42", "2026-11-22T07:00:00.000Z")
    state = register(None, item, "2026-11-22T07:00:01.250Z")
    blob = pack(state, 7)
    assert len(blob) < 100
    registered, sent, updated = times(blob)
    assert (registered - sent, updated) == (1250, registered)
    done = MessageState("smstower", "1", facts=(fact_of("0123456789abcdef" * 4),))
    assert len(pack(done, 1)) == 34 + 8  # the header and one fact's 8 bytes
