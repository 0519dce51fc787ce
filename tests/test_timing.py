"""What each request did: statements, database time, logged and optionally in Server-Timing."""

from __future__ import annotations

import logging
import re

from tests.helpers import call
from tests.models import Note

TIMING = re.compile(r'^db;dur=(\d+\.\d\d);desc="(\d+) statements", commit;dur=(\d+\.\d\d)$')


def counting_app(reads: int):
    def app(environ, start_response):
        for _ in range(reads):
            environ["storm.store"].find(Note).count()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return app


def server_timing(response) -> str | None:
    values = [value for name, value in response.headers if name == "Server-Timing"]
    assert len(values) <= 1
    return values[0] if values else None


def test_server_timing_counts_the_requests_statements(middleware, tracer):
    app = middleware(counting_app(reads=3), server_timing=True)
    call(app)
    tracer.clear()

    response = call(app)

    match = TIMING.match(server_timing(response))
    assert match, server_timing(response)
    assert tracer.statements == ["SELECT"] * 3
    assert int(match.group(2)) == tracer.raw  # with SQLite's BEGIN and COMMIT


def test_a_request_that_uses_no_store_reports_no_statements(middleware):
    response = call(middleware(counting_app(reads=0), server_timing=True))

    assert TIMING.match(server_timing(response)).group(2) == "0"


def test_server_timing_is_off_by_default(middleware):
    assert server_timing(call(middleware(counting_app(reads=1)))) is None


def test_a_streamed_response_gets_no_server_timing(middleware):
    def app(environ, start_response):
        start_response("200 OK", [])
        yield b"streamed"

    assert server_timing(call(middleware(app, server_timing=True))) is None


def test_each_request_is_logged_at_debug_with_its_outcome(middleware, caplog):
    caplog.set_level(logging.DEBUG, logger="middlestorm.timing")

    call(middleware(counting_app(reads=2)), "/report")

    (record,) = [r for r in caplog.records if r.name == "middlestorm.timing"]
    assert re.match(
        r"GET /report -> 200 OK, committed: \d+ statements in \d+\.\d\d ms", record.getMessage()
    )


def test_nothing_is_measured_or_logged_when_debug_is_off(middleware, caplog):
    caplog.set_level(logging.INFO, logger="middlestorm.timing")

    call(middleware(counting_app(reads=2)))

    assert not [r for r in caplog.records if r.name == "middlestorm.timing"]
