"""Database URIs: bad ones fail at construction, passwords never show."""

from __future__ import annotations

import logging
import traceback

import pytest
from storm.database import create_database

from middlestorm import ConfigurationError, MiddleStorm, StoreRegistry, open_database, redact_uri
from tests.helpers import call

SECRET = "s3cr3t-Pa55"


def app(environ, start_response):
    environ["storm.store"].execute("SELECT 1")
    start_response("200 OK", [])
    return [b""]


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (f"postgres://app:{SECRET}@db.example:5432/app", "postgres://app:***@db.example:5432/app"),
        (
            f"postgres://app:{SECRET}@db.example/app?sslmode=require",
            "postgres://app:***@db.example/app?sslmode=require",
        ),
        (f"postgres://app:p@ss{SECRET}@db.example/app", "postgres://app:***@db.example/app"),
        (
            f"postgres://db.example/app?user=app&password={SECRET}",
            "postgres://db.example/app?user=app&password=***",
        ),
        ("postgres://app@db.example/app", "postgres://app@db.example/app"),
        ("sqlite:/var/lib/app.db", "sqlite:/var/lib/app.db"),
    ],
)
def test_redact_uri_hides_the_password_and_keeps_the_rest(uri, shown):
    assert redact_uri(uri) == shown


def test_an_unknown_scheme_fails_at_construction_and_names_the_known_ones():
    with pytest.raises(
        ConfigurationError, match="unknown database scheme 'postgresql'.*postgres, sqlite"
    ):
        MiddleStorm(app, f"postgresql://app:{SECRET}@localhost/app")


@pytest.mark.parametrize("uri", ["app.db", f"postgres://app:{SECRET}@localhost:port/app", ""])
def test_a_malformed_uri_fails_at_construction_with_a_hint(uri):
    with pytest.raises(ConfigurationError, match="malformed database URI.*for example"):
        MiddleStorm(app, uri)


def test_a_database_that_is_neither_uri_nor_database_is_refused():
    with pytest.raises(TypeError, match="not dict"):
        StoreRegistry({"main": {"uri": "sqlite:"}})


def test_an_empty_registry_is_refused():
    with pytest.raises(ConfigurationError, match="at least one database"):
        StoreRegistry({})


@pytest.mark.parametrize("uri", [f"nope://app:{SECRET}@h/d", f"postgres://app:{SECRET}@h:x/d"])
def test_errors_about_a_uri_never_show_its_password(uri):
    with pytest.raises(ConfigurationError) as caught:
        MiddleStorm(app, uri)

    printed = "".join(traceback.format_exception(caught.value))
    assert "***" in printed
    assert SECRET not in printed


def test_a_storm_database_is_used_as_given():
    database = create_database("sqlite:")

    assert open_database(database) == (database, "sqlite:")


def test_a_failing_connection_shows_no_password_in_errors_logs_or_reprs(caplog):
    # Port 1 refuses connections: the request fails while connecting.
    middleware = MiddleStorm(app, f"postgres://app:{SECRET}@127.0.0.1:1/app?connect_timeout=5")
    caplog.set_level(logging.DEBUG)

    with pytest.raises(Exception) as caught:
        call(middleware)

    printed = "".join(traceback.format_exception(caught.value))
    shown = [repr(middleware), repr(middleware.registry), printed, caplog.text]
    assert all(SECRET not in text for text in shown)
    assert "127.0.0.1" in str(caught.value)
