"""Pure parts of the receiver: the callback parameter parser and the peer resolution."""

from __future__ import annotations

import ipaddress
import re

import pytest

from bus.errors import PayloadError
from receiver.openapi import openapi
from receiver.peers import allowed, client_address
from receiver.smspilot import PATH, CallbackParams, parse_callback, parse_pairs

TRUSTED = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("192.168.0.0/16"))


def test_documented_example_parses() -> None:
    # smspilot.txt: http://ya.ru/status.php?server_id=1233211233&status=2&error=0
    pairs = parse_pairs(b"server_id=1233211233&status=2&error=0", "query string")
    assert CallbackParams("1233211233", "2", "0", {}) == parse_callback(pairs)


def test_numbers_are_canonical_and_extras_kept() -> None:
    pairs = parse_pairs(b"server_id=007&status=-01&error=&ref=a%20b", "query string")
    assert CallbackParams("7", "-1", None, {"ref": "a b"}) == parse_callback(pairs)


def test_same_value_twice_is_fine_different_values_are_not() -> None:
    assert (
        "5" == parse_callback([("server_id", "5"), ("server_id", "5"), ("status", "1")]).server_id
    )
    with pytest.raises(PayloadError, match="status is given twice"):
        parse_callback([("server_id", "5"), ("status", "1"), ("status", "2")])


@pytest.mark.parametrize(
    "around", [" ", "\t", "\r\n", "\v\f", "\x1e", "\x1c", "\x85", "\xa0", "\u2003", "\ufeff"]
)
def test_the_parser_and_the_description_agree_on_what_may_surround_a_field(around: str) -> None:
    """Python's str.strip() takes \x1c-\x1f and Unicode spaces that an ECMA-262 or ASCII
    reading of `\\s` does not: a field surrounded by one is accepted exactly when the
    description allows it, under Python's reading of its patterns and under an ASCII one."""
    [parameters] = [
        operation["parameters"]
        for path, item in openapi(receive=True, version="0")["paths"].items()
        if path == PATH
        for method, operation in item.items()
        if method == "get"
    ]
    patterns = {p["name"]: p["schema"]["pattern"] for p in parameters}
    for field, value in (("server_id", "7"), ("status", "2"), ("error", "0")):
        fields = {"server_id": "7", "status": "2", field: around + value + around}
        described = {
            bool(re.fullmatch(patterns[field], fields[field], flags))
            for flags in (re.NOFLAG, re.ASCII)
        }
        try:
            parse_callback(list(fields.items()))
        except PayloadError:
            parsed = False
        else:
            parsed = True
        assert {parsed} == described, (field, around)


@pytest.mark.parametrize(
    "raw", [b"server_id=1&status=2&" + b"&".join(b"k%d=v" % i for i in range(200)), b"\xff\xfe"]
)
def test_hostile_query_strings_are_payload_errors(raw: bytes) -> None:
    with pytest.raises(PayloadError):
        parse_callback(parse_pairs(raw, "query string"))


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.9", "10.0.0.1", "203.0.113.9"),  # untrusted peer: the header is ignored
        ("127.0.0.1", None, "127.0.0.1"),
        ("127.0.0.1", "10.0.0.1", "10.0.0.1"),
        ("127.0.0.1", "10.0.0.1, 192.168.1.1", "10.0.0.1"),
        ("127.0.0.1", "10.0.0.1, 8.8.8.8", "8.8.8.8"),  # the nearest untrusted hop
        ("127.0.0.1", "192.168.1.2", "192.168.1.2"),  # all trusted: the farthest
        ("127.0.0.1", "garbage", "garbage"),
    ],
)
def test_client_address(peer: str, forwarded: str | None, expected: str) -> None:
    assert expected == client_address(peer, forwarded, TRUSTED)


def test_allowlist() -> None:
    net = (ipaddress.ip_network("10.0.0.0/8"),)
    assert allowed("8.8.8.8", ())
    assert allowed("10.2.3.4", net)
    assert not allowed("8.8.8.8", net)
    assert not allowed("garbage", net)
    assert not allowed(None, net)
