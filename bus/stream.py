"""The JetStream stream holding every subject under the prefix, made or updated at start."""

from __future__ import annotations

import dataclasses

import nats.js.errors
from nats.js.api import StorageType, StreamConfig
from nats.js.client import JetStreamContext

from bus.errors import StartupError

# How long JetStream remembers a Nats-Msg-Id: a fact reported again within this window is stored
# once. Ten minutes covers SMSPilot's callback retries and a spool drained after a short outage,
# at the cost of the server keeping that many ids in memory.
DUPLICATE_WINDOW = 600.0


async def ensure_stream(js: JetStreamContext, name: str, prefix: str, replicas: int) -> None:
    subjects = f"{prefix}.>"
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=name,
                subjects=[subjects],
                storage=StorageType.FILE,
                num_replicas=replicas,
                duplicate_window=DUPLICATE_WINDOW,
            )
        )
        return
    current = info.config
    if current.storage not in (None, StorageType.FILE):
        raise StartupError(
            f"SMSBUS_STREAM: stream {name} exists with {current.storage.value} storage; "
            "smsbus needs file storage (delete or rename that stream)"
        )
    wanted = dataclasses.replace(
        current,
        subjects=sorted({*(current.subjects or []), subjects}),
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW,
    )
    if wanted != current:
        try:
            await js.update_stream(wanted)
        except nats.js.errors.APIError as exc:
            raise StartupError(
                f"SMSBUS_STREAM: cannot update stream {name}: {exc.description}"
            ) from None


async def stream_exists(js: JetStreamContext, name: str) -> bool:
    try:
        await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        return False
    return True
