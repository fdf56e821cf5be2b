"""A sink's state and rate as the console derives them from the queue's figures (pure code:
the states over a real outage are in tests/test_console_browser.py)."""

from __future__ import annotations

from registry_trio.console.csrf import form_token, is_valid, new_nonce
from registry_trio.console.health import DeliveryRates, SinkState, sink_state

NOW = 1_000_000.0


def status(pending: int, oldest_age: float | None, failed_at: float | None) -> dict:
    return {"pending": pending, "oldestPendingAge": oldest_age, "lastErrorAt": failed_at}


def test_a_sink_is_delivering_until_something_owed_has_failed():
    assert sink_state(status(0, None, NOW - 1), NOW, False) is SinkState.DELIVERING
    assert sink_state(status(5, 2.0, None), NOW, False) is SinkState.DELIVERING
    # Every pending event came after the last failure: none of them has failed.
    assert sink_state(status(5, 2.0, NOW - 10), NOW, False) is SinkState.DELIVERING


def test_an_event_owed_since_a_failure_makes_it_failing_or_retrying():
    stuck = status(5, 30.0, NOW - 1)
    assert sink_state(stuck, NOW, delivered_since_failure=False) is SinkState.FAILING
    assert sink_state(stuck, NOW, delivered_since_failure=True) is SinkState.RETRYING


def test_rates_are_per_minute_over_the_readings_of_the_last_minute():
    rates = DeliveryRates()
    assert rates.observe("s", 100, NOW) is None  # one reading: no rate yet
    assert rates.observe("s", 110, NOW + 0.5) is None  # under a second apart
    assert rates.observe("s", 130, NOW + 10) == 180.0  # 30 in 10 s
    for second in range(11, 200):
        rate = rates.observe("s", 130 + 2 * (second - 10), NOW + second)
    assert rate == 120.0  # 2 a second, over the last minute only
    assert len(rates._samples["s"]) <= 121  # bounded whatever the refresh rate
    assert rates.observe("s", 0, NOW + 201) is None  # a new queue: counts start over


def test_delivered_since_compares_with_the_reading_before_the_failure():
    rates = DeliveryRates()
    rates.observe("s", 10, NOW)
    rates.observe("s", 10, NOW + 2)
    assert not rates.delivered_since("s", NOW + 1, 10)
    assert rates.delivered_since("s", NOW + 1, 11)
    # A failure before the first reading: the first reading is the baseline.
    assert rates.delivered_since("s", NOW - 50, 11)
    assert not rates.delivered_since("other", NOW, 11)  # no reading: no evidence


def test_a_form_token_is_good_for_its_nonce_and_login_only():
    nonce = new_nonce()
    token = form_token(nonce, "Basic Y2Fyb2w6c2VjcmV0")
    assert is_valid(nonce, "Basic Y2Fyb2w6c2VjcmV0", token)
    assert not is_valid(nonce, "Basic ZGF2ZTpzZWNyZXQ=", token)  # another login
    assert not is_valid(new_nonce(), "Basic Y2Fyb2w6c2VjcmV0", token)  # another cookie
    assert not is_valid(None, "Basic Y2Fyb2w6c2VjcmV0", token)
    assert not is_valid(nonce, "Basic Y2Fyb2w6c2VjcmV0", None)
    assert not is_valid("x" * 100, "", form_token("x" * 100, ""))  # not a nonce we issue
