"""The console's parts on their own: a sink's state and rate from the queue's figures, the
forms' token, the pages that show the delivery history (its JSON as the admin API serves it).
The states over a real outage are in tests/test_console_browser.py."""

from __future__ import annotations

from registry_trio.console.csrf import form_token, is_valid, new_nonce
from registry_trio.console.health import DeliveryRates, SinkState, sink_state
from registry_trio.events.status import iso_time

NOW = 1_000_000.0


def status(
    pending: int, oldest_age: float | None, failed_at: float | None, recovered: bool | None = None
) -> dict:
    return {
        "pending": pending,
        "oldestPendingAge": oldest_age,
        "lastErrorAt": iso_time(failed_at),
        "recovered": recovered,
    }


def test_a_sink_is_delivering_until_something_owed_has_failed():
    assert sink_state(status(0, None, NOW - 1, False), NOW) is SinkState.DELIVERING
    assert sink_state(status(5, 2.0, None), NOW) is SinkState.DELIVERING
    # Every pending event came after the last failure: none of them has failed.
    assert sink_state(status(5, 2.0, NOW - 10, False), NOW) is SinkState.DELIVERING


def test_an_event_owed_since_a_failure_makes_it_failing_or_retrying():
    assert sink_state(status(5, 30.0, NOW - 1, recovered=False), NOW) is SinkState.FAILING
    # A delivery acknowledged since the last failure: it gets through now and then.
    assert sink_state(status(5, 30.0, NOW - 1, recovered=True), NOW) is SinkState.RETRYING


def test_rates_are_per_minute_over_the_readings_of_the_last_minute():
    rates = DeliveryRates()
    assert rates.observe("s", 100, NOW) is None  # one reading: no rate yet
    assert rates.observe("s", 110, NOW + 0.5) is None  # under a second apart
    assert rates.observe("s", 130, NOW + 10) == 180.0  # 30 in 10 s
    for second in range(11, 200):
        rate = rates.observe("s", 130 + 2 * (second - 10), NOW + second)
    assert rate == 120.0  # 2 a second, over the last minute only
    assert len(rates._samples["s"]) <= 61  # bounded whatever the refresh rate
    assert rates.observe("s", 0, NOW + 201) is None  # a new queue: counts start over


def test_a_form_token_is_good_for_its_nonce_and_login_only():
    nonce = new_nonce()
    token = form_token(nonce, "Basic Y2Fyb2w6c2VjcmV0")
    assert is_valid(nonce, "Basic Y2Fyb2w6c2VjcmV0", token)
    assert not is_valid(nonce, "Basic ZGF2ZTpzZWNyZXQ=", token)  # another login
    assert not is_valid(new_nonce(), "Basic Y2Fyb2w6c2VjcmV0", token)  # another cookie
    assert not is_valid(None, "Basic Y2Fyb2w6c2VjcmV0", token)
    assert not is_valid(nonce, "Basic Y2Fyb2w6c2VjcmV0", None)
    assert not is_valid("x" * 100, "", form_token("x" * 100, ""))  # not a nonce we issue


# The delivery history as GET /_registry/events/history and /trace/{id} answer it (the
# record and trace shapes of issue #17 part 1), with a receiver's hostile error text.
HOSTILE = "<img src=x onerror=alert(1)>"
RECORD = {
    "id": 7,
    "time": "2026-12-02T11:30:00.000001Z",
    "sink": "audit",
    "event": "0f8e-1",
    "seq": 3,
    "outcome": "failed",
    "attempt": 2,
    "status": 502,
    "error": HOSTILE,
    "latencyMs": 12.5,
    "batch": 1,
    "retryAt": None,
    "by": None,
    "action": "manifest.pushed",
    "repository": "team/app",
    "digest": None,
}
TRACE = {
    "event": "0f8e-1",
    "payload": {"action": "manifest.pushed", "request": {"useragent": HOSTILE}},
    "sinks": [{"sink": "audit", "state": "retrying", "attempts": 2}],
    "steps": [{"outcome": "committed", "time": None, "seq": 3}, RECORD],
    "truncated": False,
}


async def test_the_history_pages_render_the_history_json_escaped():
    from registry_trio.console.render import page

    sink_status = {
        "name": "audit",
        "type": "http",
        "address": "http://receiver/",
        "format": "cloudevents",
        "state": "retrying",
        "pending": 1,
        "oldestPendingAge": 3.0,
        "delivered": 5,
        "failedAttempts": 2,
        "dead": 0,
        "lastError": None,
        "lastErrorAt": None,
        "lastDeliveredAt": None,
    }
    sink = await page(
        "sink.html",
        sink=sink_status,
        attempts=[RECORD],
        letters=[],
        next=None,
        replayed=None,
        csrf_token="t",
    ).get_data(as_text=True)
    event = await page(
        "event.html",
        event_id="0f8e-1",
        payload="{}",
        trace=TRACE,
        letter=None,
        sink_name=None,
        csrf_token="t",
    ).get_data(as_text=True)
    assert '<tr class="attempt outcome-failed">' in sink and "12.5 ms" in sink
    assert "History not available" not in sink + event
    assert '<tr class="step outcome-committed">' in event and "retrying" in event
    for text in (sink, event):
        assert "&lt;img src=x onerror=alert(1)&gt;" in text and HOSTILE not in text
