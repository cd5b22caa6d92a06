"""When the sidecar renews its certificate: half lifetime, backoff, never past expiry."""

from __future__ import annotations

from sidecar.security.rotation import RenewalSchedule


def test_renews_at_half_the_remaining_lifetime() -> None:
    schedule = RenewalSchedule()
    assert schedule.issued(received_at=1000.0, not_after=1000.0 + 86400) == 1000.0 + 43200
    assert schedule.issued(received_at=50.0, not_after=54.0) == 52.0


def test_failures_back_off_exponentially_up_to_the_cap() -> None:
    schedule = RenewalSchedule(min_backoff=1.0, max_backoff=8.0)
    delays = [schedule.failed(100.0, None) - 100.0 for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    schedule.issued(200.0, 300.0)
    assert schedule.failures == 0
    assert schedule.failed(250.0, None) == 251.0


def test_retries_before_the_current_certificate_expires() -> None:
    schedule = RenewalSchedule(min_backoff=1.0, max_backoff=60.0)
    for _ in range(10):
        schedule.failed(100.0, None)
    # 60 s of backoff would outlive a certificate with 20 s left; a quarter of that is tried.
    assert schedule.failed(100.0, not_after=120.0) == 105.0
    assert schedule.failed(100.0, not_after=100.5) == 101.0  # never busier than min_backoff
