"""Property-based: whatever bytes a provider or a caller sends, a parser yields its results or the
project's own payload error, never another exception (and never expands an entity)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bus.errors import PayloadError, ProviderError, ProviderPayloadError, ProviderRowError
from bus.messages import parse_track_batch
from pollers import epochta, smsc, smspager, smspilot, smstower
from pollers.xml import fields, parse_xml, text
from receiver.smspilot import parse_callback, parse_pairs

MSK = ZoneInfo("Europe/Moscow")
# `make test` runs about 150 examples a parser and input kind; `make fuzz` sets
# SMSBUS_FUZZ_EXAMPLES (a third of 100,000 per kind: each parser gets at least 100,000 inputs).
EXAMPLES = int(os.environ.get("SMSBUS_FUZZ_EXAMPLES", "150"))
FAST = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

PARSERS: dict[str, Callable[[bytes], Any]] = {
    "smstower.status": lambda b: smstower.parse_status(b, MSK),
    "smstower.inbound": lambda b: smstower.parse_inbound(b, MSK),
    "smstower.balance": smstower.parse_balance,
    "smspager.general": smspager.parse_general,
    "smspager.detail": lambda b: smspager.parse_detail(b, "m1"),
    "smspager.balance": smspager.parse_balance,
    "smsc.history": lambda b: smsc.parse_history(b, MSK),
    "smsc.answers": lambda b: smsc.parse_answers(b, MSK),
    "epochta.status": lambda b: epochta.parse_status(b, MSK),
    "epochta.balance": epochta.parse_balance,
    "smspilot.check": lambda b: smspilot.parse_check(b, MSK),
    "smspilot.inbound": lambda b: smspilot.parse_inbound(b, MSK),
    "smspilot.balance": smspilot.parse_balance,
}

TAGS = ["response", "code", "messageList", "message", "idMessage", "deliveryStatus", "data",
        "detail", "delivered", "number", "sms", "smsid", "account", "RESPONSE", "status",
        "credits", "deliveryreport", "balance", "dateFinalStatus", "createdDate"]  # fmt: skip


def xml_tree(depth: int = 4) -> st.SearchStrategy[str]:
    """Random XML made of the tags the providers use, nested and with hostile text."""
    text = st.one_of(
        st.text(max_size=20),
        st.sampled_from(
            [
                "1",
                "9",
                "-1",
                "501",
                "0000-00-00 00:00:00",
                "2009-11-06 03:18:01",
                "9" * 400,
                "NaN",
                "1e999",
                "+7 (903) 000-11-22",
            ]
        ),  # fmt: skip
    )
    leaf = text.map(lambda t: t.replace("&", "&amp;").replace("<", "&lt;"))
    return st.recursive(
        leaf,
        lambda children: st.builds(
            lambda tag, attrs, kids: (
                f"<{tag}{''.join(f' {k}={chr(34)}{v}{chr(34)}' for k, v in attrs)}>"
                + "".join(kids)
                + f"</{tag}>"
            ),
            st.sampled_from(TAGS),
            st.lists(
                st.tuples(
                    st.sampled_from(["id", "status", "donedate"]),
                    st.from_regex(r"[A-Za-z0-9 :_-]{0,12}", fullmatch=True),
                ),
                max_size=2,
            ),
            st.lists(children, max_size=4),
        ),
        max_leaves=20,
    )


def json_value() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(allow_nan=False), st.text(max_size=20),
    )  # fmt: skip
    keys = st.sampled_from(
        ["id", "status", "error", "error_code", "check", "inbound", "balance", "server_id",
         "last_timestamp", "last_date", "phone", "err", "code"]
    )  # fmt: skip
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=5)
        ),
        max_leaves=15,
    )


def smsc_rows() -> st.SearchStrategy[Any]:
    """History and inbound rows of the shape smsc.txt gives, with values the document does not
    promise: sends to several numbers (one id), huge or negative stamps, Cyrillic texts."""
    row = st.fixed_dictionaries(
        {
            "id": st.one_of(st.integers(-5, 10**20), st.text(max_size=8)),
            "status": st.one_of(st.integers(-5, 30), st.text(max_size=4), st.none()),
            "phone": st.one_of(st.from_regex(r"\+?[0-9 ()-]{0,16}", fullmatch=True), st.none()),
        },
        optional={
            "int_id": st.one_of(st.integers(-5, 10**20), st.text(max_size=8)),
            "last_timestamp": st.one_of(
                st.integers(-(10**20), 10**20), st.floats(allow_nan=True), st.text(max_size=5)
            ),
            "last_date": st.sampled_from(["22.11.2026 12:00:05", "31.02.2026 25:00:00", "", "x"]),
            "err": st.one_of(st.integers(-1, 999), st.text(max_size=3)),
            "status_name": st.text(alphabet="абвгґдеєжзиіїйклмнопрстуфхцчшщьюяАБВ ", max_size=30),
            "message": st.text(max_size=40),
            "received": st.sampled_from(["22.11.2026 12:00:09", "", "нет"]),
            "to_phone": st.text(max_size=12),
        },
    )
    return st.lists(row, max_size=6).flatmap(
        lambda rows: st.just(rows + [dict(r, phone="380509999999") for r in rows[:1]])
    )


def survives(parse: Callable[[bytes], Any], body: bytes) -> None:
    try:
        parse(body)
    except ProviderError:
        pass  # the project's own error: a dead letter and a back-off, never a crash


@pytest.mark.parametrize("name", sorted(PARSERS))
@FAST
@given(body=st.binary(max_size=300))
def test_random_bytes(name: str, body: bytes) -> None:
    survives(PARSERS[name], body)


@pytest.mark.parametrize("name", sorted(PARSERS))
@FAST
@given(tree=xml_tree(), encoding=st.sampled_from(["utf-8", "utf-16", "cp1251", "latin-1"]))
def test_random_nested_xml_in_any_encoding(name: str, tree: str, encoding: str) -> None:
    declaration = f'<?xml version="1.0" encoding="{encoding}"?>'
    survives(PARSERS[name], (declaration + tree).encode(encoding, errors="replace"))


@pytest.mark.parametrize("name", sorted(PARSERS))
@FAST
@given(value=json_value())
def test_random_json(name: str, value: Any) -> None:
    survives(PARSERS[name], json.dumps(value).encode())  # the stdlib: integers of any size


# Answers about several ids, each with one row that cannot be read, and with an envelope that
# cannot: the first is that row's fault (the poller asks about the ids again in parts), the
# second the whole answer's.
ROWS_AND_ENVELOPES = {
    "smstower.status": (
        b"<response><code>1</code><messageList><message><deliveryStatus>delivered"
        b"</deliveryStatus><idMessage>1</idMessage></message><message><dateFinalStatus>"
        b"yesterday</dateFinalStatus><deliveryStatus>delivered</deliveryStatus><idMessage>2"
        b"</idMessage></message></messageList></response>",
        b"<response><code>3</code></response>",
    ),
    "epochta.status": (
        b'<deliveryreport><message id="m1" status="SENT"/><message id="m2"/></deliveryreport>',
        b"<RESPONSE><status>-2</status></RESPONSE>",
    ),
    "smspilot.check": (
        b'{"check": [{"server_id": "1", "status": "2"}, {"server_id": "2", "status": "two"}]}',
        b'{"check": "none"}',
    ),
    "smspager.detail": (
        b"<data><code>1</code><detail><delivered><number>79010000001</number>"
        b"<number>n/a</number></delivered></detail></data>",
        b"<data><code>500</code></data>",
    ),
}


@pytest.mark.parametrize("name", sorted(ROWS_AND_ENVELOPES))
def test_a_row_that_cannot_be_read_is_told_from_an_answer_that_cannot(name: str) -> None:
    row, envelope = ROWS_AND_ENVELOPES[name]
    with pytest.raises(ProviderRowError):
        PARSERS[name](row)
    with pytest.raises(ProviderPayloadError) as raised:
        PARSERS[name](envelope)
    assert not isinstance(raised.value, ProviderRowError)


# Lists whose rows stand on their own (no id to ask about again): one readable row and one not.
LISTS = {
    "smstower.inbound": b"<response><code>1</code><messageList><message><smsText>a</smsText>"
    b"<idMessage>1</idMessage></message><message><smsText>b</smsText></message></messageList>"
    b"</response>",
    "smspilot.inbound": b'{"inbound": [{"id": 1, "text": "a"}, {"text": "b"}]}',
    "smsc.answers": b'[{"id": 1, "message": "a"}, {"message": "b"}]',
    "smsc.history": b'[{"id": 1, "status": 1}, {"id": 2, "status": 1, "last_date": "b"}]',
}


def listed(name: str, body: bytes) -> tuple[list[Any], list[ProviderRowError]]:
    if name == "smsc.history":
        page = smsc.parse_page(body, MSK)
        return page.reports, page.unreadable
    return PARSERS[name](body)


@pytest.mark.parametrize("name", sorted(LISTS))
def test_a_listed_row_that_cannot_be_read_is_set_aside_also_when_none_can(name: str) -> None:
    read, unreadable = listed(name, LISTS[name])
    assert 1 == len(read) and 1 == len(unreadable)
    assert b"b" in (unreadable[0].raw or b"")
    only_bad = LISTS[name].replace(b'"id": 1, ', b"").replace(b"<idMessage>1</idMessage>", b"")
    # Each row set aside: an inbound cursor held (Window.take), the history read again at the
    # next poll; more than the engine's UNREADABLE_LISTED fail the poll (test_smsc).
    read, unreadable = listed(name, only_bad)
    assert [] == read and 2 == len(unreadable)
    if name == "smsc.history":  # a probe (`smsbus check`) that can read no row fails
        with pytest.raises(ProviderPayloadError, match="no row can be read"):
            smsc.parse_history(only_bad, MSK)


@pytest.mark.parametrize("name", ["smsc.history", "smsc.answers"])
@FAST
@given(rows=smsc_rows(), encoding=st.sampled_from(["utf-8", "cp1251"]))
def test_smsc_rows_in_either_charset(name: str, rows: Any, encoding: str) -> None:
    survives(PARSERS[name], json.dumps(rows, ensure_ascii=False).encode(encoding, "replace"))


@FAST
@given(
    value=st.binary(max_size=40),
    server_id=st.one_of(st.from_regex(r"[0-9]{1,20}", fullmatch=True), st.binary(max_size=5)),
)
def test_callback_queries_with_windows_1251_escapes(value: bytes, server_id: Any) -> None:
    """Any bytes escaped in an extra parameter: the callback is judged on SMSPilot's own fields
    alone, and the value comes back as text."""
    sid = server_id if isinstance(server_id, str) else "".join(f"%{b:02X}" for b in server_id)
    raw = f"server_id={sid}&status=2&ref=" + "".join(f"%{b:02X}" for b in value)
    try:
        params = parse_callback(parse_pairs(raw.encode(), "query string"))
    except PayloadError:
        assert not isinstance(server_id, str)
        return
    assert isinstance(params.extra["ref"], str)


@FAST
@given(raw=st.binary(max_size=400))
def test_callback_parameters_from_random_bytes(raw: bytes) -> None:
    try:
        parse_callback(parse_pairs(raw, "query string"))
    except PayloadError:
        pass


@FAST
@given(
    pairs=st.lists(
        st.tuples(
            st.sampled_from(["server_id", "status", "error", "ref", ""]),
            st.one_of(st.text(max_size=30), st.integers().map(str), st.just("9" * 5000)),
        ),
        max_size=8,
    )
)
def test_callback_parameters_from_random_pairs(pairs: list[tuple[str, str]]) -> None:
    try:
        params = parse_callback(pairs)
    except PayloadError:
        return
    assert params.server_id.isdigit() and len(params.server_id) <= 20
    assert params.status.lstrip("-").isdigit()


@FAST
@given(value=json_value())
def test_registrations_from_random_json(value: Any) -> None:
    try:
        items = parse_track_batch(json.dumps(value).encode())
    except PayloadError:
        return
    assert 1 <= len(items) <= 1000


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_deeply_nested_xml_is_refused_not_recursed(name: str) -> None:
    body = b"<response>" * 20000 + b"<code>1</code>" + b"</response>" * 20000
    with pytest.raises(ProviderError):
        PARSERS[name](body)


@FAST
@given(tree=xml_tree())
def test_reading_an_elements_fields_at_once_reads_what_text_reads(tree: str) -> None:
    """pollers.xml.fields (one pass over the children) agrees with `text` (a look-up per field)
    on every tag, including repeated, empty and nested ones."""
    try:
        root = parse_xml(f"<response>{tree}</response>".encode())
    except ProviderError:
        assume(False)  # not well-formed (a control character): nothing to read
    found = fields(root)
    for tag in TAGS:
        assert text(root, tag) == found.get(tag), tag
