"""The event queue on NATS JetStream, shared by every registry instance serving one storage.

Layout, for ``queue.stream: S`` (created when missing, checked when found: see
:func:`compare_streams`; names from a hash of each sink name)::

    stream S          subjects S.sink.<sink>   file storage, interest retention: a message
                                               stays until its sink's consumer acknowledged it
    consumer sink_<sink>                       durable, explicit acks, shared by all instances
    stream S_DEAD     subjects S.dead.<sink>   dead letters, kept until replayed
    KV bucket S_COUNTERS  <sink>.<instance>    delivered / failed attempts / last error, one
                                               key per instance (no two writers per key)

**Append**: one message per (event, sink that wants it), published with ``Nats-Msg-Id`` =
``<event id>.<sink>`` and the stream's acknowledgement awaited before the request gets its
2xx. A publish retried after a lost ack is dropped by the stream's duplicate window.

**Delivery**, in order (``concurrency: 1``): one instance at a time delivers a sink, the one
holding the sink's *lease* (a KV entry changed only by compare-and-set, renewed every
``ackWait``/3). It pulls from the sink's durable consumer; a failed run is *held* by it and
retried with backoff (``in_progress`` keeps JetStream from handing it out meanwhile), and
nothing is pulled past a held event. An instance that dies stops renewing; once the lease
went ``queue.ackWait`` unrenewed by another instance's own clock (wall clocks of two hosts are
never compared), that one takes it, and first sends the *orphans* — what the dead one
was handed and never acknowledged, read from the stream in order — so fresh events cannot
overtake them (the dead one may have delivered some already: same ids, at least once).
With ``concurrency`` above 1 every instance pulls, and order is not promised.

Everything NATS happens on one asyncio thread (:class:`AsyncioThread`); the Trio side holds
nats-py messages only as opaque handles it passes back.

One module per part: :mod:`.stream` checks a stream found against what the queue needs,
:mod:`.operations` makes every NATS call (on the asyncio thread), :mod:`.queue` is the
:class:`JetStreamQueue` (opening, appends, one sink queue per delivery worker), and
:mod:`.lease` is one sink's deliveries on this instance (the lease and the ordering).
"""

from .lease import JetStreamSinkQueue
from .operations import JetStreamOperations, sink_token
from .queue import JetStreamQueue
from .stream import compare_streams, subject_covers

__all__ = [
    "JetStreamOperations",
    "JetStreamQueue",
    "JetStreamSinkQueue",
    "compare_streams",
    "sink_token",
    "subject_covers",
]
