"""The default commit veto, as in repoze.tm2: abort 4xx and 5xx unless X-Tm says."""

from __future__ import annotations

import pytest

from middlestorm import default_commit_veto


@pytest.mark.parametrize(
    "status", ["200 OK", "201 Created", "204 No Content", "302 Found", "200", "399 Odd", "99", "5"]
)
def test_success_and_redirects_are_not_vetoed(status):
    assert default_commit_veto({}, status, []) is False


@pytest.mark.parametrize(
    "status", ["400 Bad Request", "404 Not Found", "500 Internal Server Error", "500", "1000 Odd"]
)
def test_client_and_server_errors_are_vetoed(status):
    assert default_commit_veto({}, status, []) is True


def test_x_tm_commit_overrides_an_error_status():
    assert default_commit_veto({}, "409 Conflict", [("x-tm", "Commit")]) is False


def test_x_tm_with_any_other_value_vetoes():
    assert default_commit_veto({}, "200 OK", [("X-Tm", "abort")]) is True
    assert default_commit_veto({}, "200 OK", [("X-TM", "maybe")]) is True


def test_a_status_without_a_code_is_vetoed():
    assert default_commit_veto({}, "OK", []) is True


@pytest.mark.parametrize("status", ["", "   ", "2xx OK"])
def test_an_empty_or_malformed_status_is_vetoed(status):
    assert default_commit_veto({}, status, []) is True
