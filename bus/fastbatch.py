"""JetStream fast batches (nats-server 2.14+, a stream with `allow_batched`): many messages, one
answer.

Each message's reply subject carries the batch: `<inbox>.<batch id>.<ack interval>.<gap mode>.
<sequence in the batch>.<operation>.$FI` (0 starts the batch, 1 appends, 3 commits and ends it).
The commit is an empty message to a subject of the stream, never stored. The server answers the
first message with its flow-control interval (our batches are shorter, so it asks for nothing
more) and the batch as a whole with `{"stream", "seq", "batch", "count"}` once its messages are
stored: a single server on the commit's reply subject, a clustered stream on the last message's.

A batch is not atomic: a message the stream refuses (a compare-and-set that fails) ends it. The
messages before it are stored, and the server says how many, on one of their reply subjects or
the refused one's; the refused message gets its error (`{"type": "err", ...}`, or a plain error
when it is the first). A single server then answers every later message and the commit with
"batch publish ID unknown"; a cluster says nothing more. So the answer is complete when the
count covers the whole batch, or a message was refused and the count of those before it has
come, or the first was refused, or the commit is answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.nuid import NUID

from bus import wire
from bus.replies import Replies, ReplyError, time_out

FLOW = 500  # the ack interval we allow; a batch is at most MAX_BATCH
MAX_BATCH = 256
OP_START, OP_APPEND, OP_COMMIT_EOB = 0, 1, 3
UNKNOWN_BATCH = 10208  # JSAtomicPublishUnknownBatchIDErr: the batch had ended before this message

Message = tuple[str, bytes, dict[str, str] | None]  # subject, payload, headers


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a fast batch ended: the first `stored` messages are stored; when that is not all of
    them, `error` is why the next one was refused (the ones after it were not tried)."""

    stored: int
    error: ReplyError | None = None


class _Answers:
    """The replies to one batch, read as they arrive; `done` resolves once they say how it
    ended."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.count: int | None = None  # messages stored, as the server counted them
        self.error: tuple[int, ReplyError] | None = None  # batch sequence, why refused
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_reply(self, msg: Msg) -> None:
        tokens = msg.subject.rsplit(".", 4)
        try:
            seq = int(tokens[-3])
            answer = orjson.loads(msg.data) if msg.data else {}
        except (ValueError, IndexError, orjson.JSONDecodeError):
            answer, seq = {}, 0
        if not isinstance(answer, dict):
            answer = {}
        if msg.headers and msg.headers.get("Status") == "503":
            answer = {"error": {"code": 503, "err_code": 0, "description": "no stream answers"}}
        if answer.get("type") == "err":  # a message refused in the middle of the batch
            self._refused(int(answer.get("seq") or seq), answer.get("error"))
        elif "error" in answer:
            self._refused(seq, answer["error"])
        elif "count" in answer:
            self.count = int(answer["count"])
        if self._complete(seq) and not self.done.done():
            self.done.set_result(None)

    def _complete(self, seq: int) -> bool:
        if seq == self.size + 1 or self.count == self.size:
            return True
        if self.error is None:
            return False
        refused = self.error[0]
        return refused == 1 or self.count == refused - 1

    def _refused(self, seq: int, error: object) -> None:
        detail = error if isinstance(error, dict) else {}
        err_code = int(detail.get("err_code", 0))
        if err_code == UNKNOWN_BATCH and seq != self.size + 1:
            return  # a message after the one refused: its error is the one that counts
        if self.error is None or seq < self.error[0]:
            reason = str(detail.get("description", ""))[:200]
            self.error = (seq, ReplyError(int(detail.get("code", 0)), err_code, reason))

    def outcome(self) -> Outcome:
        if self.count == self.size:
            return Outcome(self.size)
        if self.error is not None and self.error[0] <= self.size:
            seq, error = self.error
            return Outcome(seq - 1 if self.count is None else min(self.count, seq - 1), error)
        # The commit was refused with no message refused before it: nothing is known stored.
        error = self.error[1] if self.error else ReplyError(0, 0, f"batch count {self.count}")
        return Outcome(0, error)


async def send(
    nc: NATS,
    replies: Replies,
    messages: Sequence[Message],
    commit_subject: str,
    timeout: float,
    nuid: NUID,
) -> Outcome:
    """Publish `messages` as one fast batch and wait for its answer. TimeoutError when the
    commit is not answered in time: then any number of them may be stored."""
    batch = nuid.next().decode()
    answers = _Answers(len(messages))
    replies.route(batch, answers.on_reply)
    expiry = asyncio.get_running_loop().call_later(
        timeout, time_out, answers.done, "no answer to the batch in time"
    )
    try:
        prefix = f"{replies.prefix}{batch}.{FLOW}.fail."
        commit = f"{prefix}{len(messages) + 1}.{OP_COMMIT_EOB}.$FI"
        await wire.publish_many(
            nc,
            [*((subject, payload, f"{prefix}{seq}.{OP_APPEND if seq > 1 else OP_START}.$FI",
                headers) for seq, (subject, payload, headers) in enumerate(messages, start=1)),
             (commit_subject, b"", commit, None)],
        )  # fmt: skip
        await answers.done
    finally:
        expiry.cancel()
        replies.unroute(batch)
    return answers.outcome()
