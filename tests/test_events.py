from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from bus.events import deadletter_event, rfc3339, status_event

NOW = datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC)


def test_the_same_fact_has_the_same_id_whenever_and_however_it_arrives() -> None:
    by_callback = status_event("sms", "smspilot", "10005", "2", via="callback", received_at=NOW)
    by_poll = status_event(
        "sms", "smspilot", "10005", "2", via="poll", received_at=NOW + timedelta(minutes=5)
    )
    assert by_callback.id == by_poll.id
    assert by_callback.payload != by_poll.payload


def test_status_error_provider_and_message_each_change_the_id() -> None:
    base = status_event("sms", "smspilot", "1", "-1", via="poll", received_at=NOW).id
    others = [
        status_event("sms", "smspilot", "1", "2", via="poll", received_at=NOW).id,
        status_event(
            "sms", "smspilot", "1", "-1", via="poll", received_at=NOW, error_code="600"
        ).id,
        status_event("sms", "smspilot", "2", "-1", via="poll", received_at=NOW).id,
        status_event("sms", "smsc", "1", "-1", via="poll", received_at=NOW).id,
    ]
    assert len({base, *others}) == 5


def test_error_code_zero_is_the_same_fact_as_no_error() -> None:
    with_zero = status_event(
        "sms", "smspilot", "1", "2", via="poll", received_at=NOW, error_code="0"
    )
    without = status_event("sms", "smspilot", "1", "2", via="poll", received_at=NOW)
    assert with_zero.id == without.id
    assert json.loads(with_zero.payload)["data"]["error_code"] is None


def test_smspager_key_includes_the_phone() -> None:
    a = status_event(
        "sms", "smspager", "abcde123", "delivered", via="poll", received_at=NOW, phone="79019011234"
    )
    b = status_event(
        "sms", "smspager", "abcde123", "delivered", via="poll", received_at=NOW, phone="79029021234"
    )
    assert a.id != b.id
    assert "abcde123" == json.loads(a.payload)["subject"]


def test_expiry_is_a_final_unknown_with_empty_provider_status() -> None:
    event = status_event("sms", "smstower", "7", "processing", via="expiry", received_at=NOW)
    data = json.loads(event.payload)["data"]
    assert ("unknown", True, "", "expiry") == (
        data["status"],
        data["final"],
        data["provider_status"],
        data["via"],
    )
    assert "sms.status.smstower.unknown" == event.subject
    assert "callback_params" not in data


def test_time_is_when_it_happened_in_utc_with_z() -> None:
    moscow = timezone(timedelta(hours=3))
    happened = datetime(2011, 8, 11, 14, 35, tzinfo=moscow)
    event = status_event(
        "sms", "smspilot", "1", "2", via="poll", received_at=NOW, occurred_at=happened
    )
    envelope = json.loads(event.payload)
    assert "2011-08-11T11:35:00.000Z" == envelope["time"] == envelope["data"]["occurred_at"]
    assert rfc3339(NOW) == envelope["data"]["received_at"] == "2026-11-22T10:00:00.123Z"


_ZONES = st.sampled_from(
    [
        UTC,
        ZoneInfo("Europe/Moscow"),
        ZoneInfo("Europe/Kyiv"),
        timezone(timedelta(hours=-9, minutes=-30)),
    ]
)


_DATETIMES = st.datetimes(min_value=datetime(1900, 1, 2), max_value=datetime(2200, 1, 1))


@given(st.lists(st.tuples(_DATETIMES, _ZONES), min_size=1, max_size=200))
def test_rfc3339_is_the_utc_instant_to_the_millisecond_whatever_was_formatted_before(
    moments: list[tuple[datetime, tzinfo]],
) -> None:
    for naive, zone in moments:  # seconds formatted before are kept; none may leak into another
        moment = naive.replace(tzinfo=zone)
        utc = moment.astimezone(UTC)
        assert rfc3339(moment) == utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_headers_carry_the_id_and_the_cloudevents_content_type() -> None:
    event = status_event("sms", "smspilot", "1", "2", via="callback", received_at=NOW)
    assert {"Nats-Msg-Id": event.id, "Content-Type": "application/cloudevents+json"} == (
        event.headers
    )


def test_dead_letter_body_is_cut_at_16_kib_and_ids_are_unique() -> None:
    def letter(body: bytes):  # noqa: ANN202
        return deadletter_event(
            "sms",
            "smspilot",
            "bad",
            received_at=NOW,
            method="POST",
            path="/callbacks/smspilot",
            query={},
            body=body,
            peer="127.0.0.1",
        )

    first, second = letter(b"x" * 20000), letter(b"x" * 20000)
    data = json.loads(first.payload)["data"]
    assert 16 * 1024 == len(data["raw"]["body"])
    assert first.id != second.id
    assert "sms.deadletter.smspilot" == first.subject
    assert "subject" not in json.loads(first.payload)
