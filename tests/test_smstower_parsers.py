"""SMSTOWER's parsers on the document's own examples, every documented code, and hostile XML."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from bus.errors import ProviderAuthError, ProviderPayloadError, ProviderUnavailable
from pollers.smstower import parse_balance, parse_inbound, parse_status
from pollers.types import InboundSms, StatusReport
from tests.fakes import hostile

MSK = ZoneInfo("Europe/Moscow")

# smstower.txt, "Получение отчёта о доставке SMS", "Пример ответа".
STATUS_EXAMPLE = b"""<?xml version="1.0" encoding="UTF-8"?>
<response>
  <code>1</code>
  <messageList>
    <message>
      <dateFinalStatus>2009-11-06 03:18:01</dateFinalStatus>
      <deliveryStatus>delivered</deliveryStatus>
      <idMessage>14056812</idMessage>
    </message>
  </messageList>
</response>"""

# "Получение информации о входящих SMS", "Пример ответа".
INBOUND_EXAMPLE = """<?xml version="1.0" encoding="UTF-8"?>
<response>
  <code>1</code>
  <messageList>
    <message>
      <sourceAddress>79030001122</sourceAddress>
      <destinationAddress>79030001133</destinationAddress>
      <smsText>Текст смс сообщения</smsText>
      <createdDate>2011-12-01 05:45:20</createdDate>
      <idMessage>20035</idMessage>
    </message>
  </messageList>
</response>""".encode()

# "Получение информации о балансе", "Пример ответа".
BALANCE_EXAMPLE = b"""<?xml version="1.0" encoding="UTF-8"?>
<response>
  <code>1</code>
  <balance>10654</balance>
</response>"""


def code(n: str) -> bytes:
    return f'<?xml version="1.0" encoding="UTF-8"?><response><code>{n}</code></response>'.encode()


def test_status_example() -> None:
    assert [
        StatusReport("14056812", "delivered", datetime(2009, 11, 6, 0, 18, 1, tzinfo=UTC))
    ] == parse_status(STATUS_EXAMPLE, MSK)


def test_processing_without_a_final_date() -> None:
    body = STATUS_EXAMPLE.replace(b"2009-11-06 03:18:01", b"").replace(b"delivered", b"processing")
    assert [StatusReport("14056812", "processing", None)] == parse_status(body, MSK)


def test_inbound_example() -> None:
    assert (
        [
            InboundSms(
                "20035",
                "79030001122",
                "79030001133",
                "Текст смс сообщения",
                datetime(2011, 12, 1, 1, 45, 20, tzinfo=UTC),  # Moscow kept UTC+4 in 2011-2014
            )
        ],
        [],
    ) == parse_inbound(INBOUND_EXAMPLE, MSK)


def test_balance_example() -> None:
    assert Decimal("10654") == parse_balance(BALANCE_EXAMPLE)


def test_status_code_9_means_not_known_yet() -> None:
    assert [] == parse_status(code("9"), MSK)


@pytest.mark.parametrize(
    ("parser", "number", "error"),
    [
        (parse_status, "2", ProviderPayloadError),
        (parse_status, "3", ProviderPayloadError),
        (parse_status, "4", ProviderAuthError),
        (parse_status, "7", ProviderAuthError),
        (parse_status, "8", ProviderPayloadError),
        (parse_status, "10", ProviderUnavailable),
        (parse_inbound, "4", ProviderAuthError),
        (parse_inbound, "7", ProviderAuthError),
        (parse_inbound, "8", ProviderPayloadError),
        (parse_inbound, "9", ProviderPayloadError),
        (parse_inbound, "10", ProviderUnavailable),
        (lambda body, tz: parse_balance(body), "4", ProviderAuthError),
        (lambda body, tz: parse_balance(body), "7", ProviderAuthError),
        (lambda body, tz: parse_balance(body), "10", ProviderUnavailable),
        (parse_status, "77", ProviderPayloadError),
    ],
)
def test_every_documented_code(parser, number: str, error: type[Exception]) -> None:  # noqa: ANN001
    with pytest.raises(error, match=f"code {number}"):
        parser(code(number), MSK)


@pytest.mark.parametrize(
    "body",
    [hostile.GARBAGE, hostile.TRUNCATED, hostile.XXE, hostile.BILLION_LAUGHS, b"", b"<response/>"],
    ids=["garbage", "truncated", "xxe", "billion-laughs", "empty", "no-code"],
)
def test_hostile_answers_are_payload_errors(body: bytes) -> None:
    for parse in (parse_status, parse_inbound):
        with pytest.raises(ProviderPayloadError):
            parse(body, MSK)
    with pytest.raises(ProviderPayloadError):
        parse_balance(body)


def test_a_message_without_an_id_is_refused() -> None:
    with pytest.raises(ProviderPayloadError, match="lacks idMessage"):
        parse_status(STATUS_EXAMPLE.replace(b"<idMessage>14056812</idMessage>", b""), MSK)


def test_a_malformed_date_is_refused() -> None:
    with pytest.raises(ProviderPayloadError, match="documented form"):
        parse_status(STATUS_EXAMPLE.replace(b"2009-11-06 03:18:01", b"06.11.2009"), MSK)
