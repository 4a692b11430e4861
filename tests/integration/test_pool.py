"""The high-priority reserve's gate on a real Redis channel, as the worker's consumer drives it.

The consumer sends BRPOP and reads its reply from its event loop; here the test sends and reads
it by hand, so it can look at what each BRPOP takes and how long it blocks.
"""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from queue import Empty
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import OperationalError

from workers.pool import GENERAL_QUEUES, HIGH_QUEUE, RedisQueueGate

pytestmark = pytest.mark.integration

#: Longer than any wait below: a BRPOP that returns sooner returned for a reason.
BRPOP_TIMEOUT = 10


@pytest.fixture
def channel(redis_url: str) -> Iterator[Any]:
    with Connection(redis_url, transport_options={"queue_order_strategy": "priority"}) as conn:
        try:
            conn.ensure_connection(max_retries=1)
        except OperationalError as exc:
            pytest.fail(f"Redis is not reachable: {exc}")
        yield conn.default_channel


def _readable(channel: Any, within: float) -> bool:
    sock = channel.client.connection._sock
    ready, _, _ = select.select([sock], [], [], within)
    return bool(ready)


def test_the_redis_gate_leaves_general_queues_out_of_brpop_and_opening_interrupts_it(
    channel: Any, redis_url: str
) -> None:
    exchange = Exchange("agentq", type="direct")
    queues = [Queue(name, exchange, routing_key=name) for name in (HIGH_QUEUE, *GENERAL_QUEUES)]
    received: list[str] = []
    consumer = Consumer(
        channel, queues, callbacks=[lambda body, message: received.append(body)], no_ack=True
    )
    consumer.consume()
    with Connection(redis_url) as producing:
        Producer(producing.default_channel).publish(
            "normal run", exchange=exchange, routing_key=GENERAL_QUEUES[0], declare=queues
        )

    closed = True
    channel.brpop_timeout = BRPOP_TIMEOUT
    gate = RedisQueueGate(consumer, channel, lambda: closed)
    channel.connection.cycle._client_registered(channel, channel.client, "BRPOP")
    gate.close()
    assert gate._client_id() is not None, "the BRPOP connection was not found in CLIENT LIST"
    assert channel.brpop_timeout == BRPOP_TIMEOUT, "an interruptible gate needs no short poll"

    # Closed: a general message is waiting, but the BRPOP names only the high queue.
    channel._brpop_start()
    assert not _readable(channel, 0.5)

    # Opening ends the BRPOP in flight at once, as if it had timed out...
    closed = False
    opened_at = time.monotonic()
    gate.open()
    assert _readable(channel, BRPOP_TIMEOUT / 2)
    assert time.monotonic() - opened_at < BRPOP_TIMEOUT / 2
    with pytest.raises(Empty):
        channel._brpop_read()
    assert received == []

    # ...and the next BRPOP names every queue again.
    channel._brpop_start()
    assert _readable(channel, BRPOP_TIMEOUT / 2)
    assert channel._brpop_read() is True
    assert received == ["normal run"]


def test_a_gate_that_cannot_find_its_connection_polls_briefly_instead(channel: Any) -> None:
    queues = [Queue(name) for name in (HIGH_QUEUE, *GENERAL_QUEUES)]
    consumer = Consumer(channel, queues, callbacks=[lambda body, message: None], no_ack=True)
    consumer.consume()
    channel.brpop_timeout = BRPOP_TIMEOUT
    gate = RedisQueueGate(consumer, channel, lambda: True)
    channel.connection.cycle._client_registered(channel, channel.client, "BRPOP")
    gate._blocked = (channel.client.connection._sock, None)

    gate.close()
    assert channel.brpop_timeout < 0.1
    assert channel._queue_cycle.consume(len(channel.active_queues)) == [HIGH_QUEUE]

    gate.open()
    assert channel.brpop_timeout == BRPOP_TIMEOUT
