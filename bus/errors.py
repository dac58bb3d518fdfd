"""The errors smsbus raises, as one short tree.

    SmsbusError
    ├── ConfigError         a setting is missing or wrong; start-up stops with its one line
    ├── StartupError        something the process needs at start cannot be had (NATS, a port)
    ├── PayloadError        input we will never accept (a malformed callback); never retried
    ├── PublishError        an event could not be made durable, not even in the spool
    │   └── EventTooLarge   larger than the NATS server takes (max_payload); never spooled
    ├── StoreError          state kept in NATS (cursors, run records) could not be read or
    │                       written: a NATS problem, never counted against a provider
    └── ProviderError       a provider call failed (pollers)
        ├── ProviderUnavailable
        ├── ProviderAuthError
        └── ProviderPayloadError
            └── ProviderRowError   one row of an answer: the rest of it may be read

Messages are one line and never carry a secret.
"""


class SmsbusError(Exception):
    """Base of every error smsbus raises on purpose."""


class ConfigError(SmsbusError):
    """A setting is wrong; the message names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


class StartupError(SmsbusError):
    """A resource needed at start-up is not there."""


class PayloadError(SmsbusError):
    """Input that will never be accepted; the message is the one-line reason."""


class PublishError(SmsbusError):
    """An event is neither acknowledged by JetStream nor stored in the spool."""


class EventTooLarge(PublishError):
    """An event larger than the NATS server takes (its `max_payload`): no publish or spool
    could ever store it, so it is not spooled, where it would hold back every event after it."""


class StoreError(SmsbusError):
    """A cursor or run record in NATS could not be read or written."""


class ProviderError(SmsbusError):
    """A provider call failed; `retry_after` is the least wait the provider demands, if any."""

    retry_after: float = 0.0


class ProviderUnavailable(ProviderError):
    """The provider could not be reached, answered 5xx or asked us to wait; retry later."""

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ProviderAuthError(ProviderError):
    """The provider refused our credentials."""


class ProviderPayloadError(ProviderError):
    """The provider answered something we cannot parse; `raw` keeps the answer for the dead
    letter. The XML parser raises it without `raw`; the poller attaches the answer."""

    def __init__(self, message: str, raw: bytes | None = None) -> None:
        super().__init__(message)
        self.raw = raw


class ProviderRowError(ProviderPayloadError):
    """One row of an answer cannot be read (a field missing, a date in no documented form),
    not the answer: of an answer about several ids, the poller asks about the ids again in
    parts rather than give up on all of them (pollers.engine); a row of a list whose rows stand
    on their own (a history, inbound SMS) is set aside, its raw form in `raw` (pollers.http)."""
