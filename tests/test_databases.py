"""Database URIs: bad ones fail at construction, passwords never show."""

from __future__ import annotations

import logging
import subprocess
import sys
import traceback
from urllib.parse import quote

import pytest
import transaction
from hypothesis import given
from hypothesis import strategies as st
from storm.database import create_database
from storm.exceptions import DisconnectionError

from middlestorm import (
    ConfigurationError,
    MiddleStorm,
    RetryPolicy,
    StoreRegistry,
    open_database,
    redact_uri,
)
from tests.conftest import POSTGRES_URI, require_postgres
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
    with pytest.raises(ConfigurationError, match="unknown database scheme 'pg'.*postgres, sqlite"):
        MiddleStorm(app, f"pg://app:{SECRET}@localhost/app")


@pytest.mark.postgres
def test_postgresql_is_another_spelling_of_postgres():
    require_postgres()
    registry = StoreRegistry({"main": POSTGRES_URI.replace("postgres://", "postgresql://", 1)})
    try:
        assert registry.get().execute("SELECT 1").get_one() == (1,)
        transaction.abort()
    finally:
        registry.close()

    assert repr(registry).startswith("<StoreRegistry main='postgresql://")


@pytest.mark.parametrize(
    ("uri", "written"),
    [
        (f"postgresql+psycopg2://app:{SECRET}@db/app", "'postgres://app:***@db/app'"),
        ("sqlite+pysqlite:app.db", "'sqlite:app.db'"),
    ],
)
def test_a_scheme_naming_a_driver_gets_the_uri_to_write_instead(uri, written):
    with pytest.raises(ConfigurationError) as raised:
        StoreRegistry({"main": uri})

    assert f"write {written}" in str(raised.value)
    assert SECRET not in str(raised.value)


def test_a_missing_driver_names_the_package_to_install(tmp_path):
    script = (
        "import sys; sys.modules['psycopg2'] = None\n"  # as if psycopg2 were not installed
        "from middlestorm import StoreRegistry\n"
        f"StoreRegistry({{'main': 'postgres://app:{SECRET}@localhost/app'}})\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == (
        "middlestorm.errors.ConfigurationError: the driver for 'postgres' databases is not "
        "installed ('postgres://app:***@localhost/app'): pip install psycopg2-binary"
    )


def test_an_sqlite_file_in_a_missing_directory_names_the_file_and_the_directory(tmp_path):
    path = tmp_path / "missing" / "app.db"
    registry = StoreRegistry({"main": f"sqlite:{path}"})

    with pytest.raises(DisconnectionError) as raised:
        registry.get()

    assert str(raised.value) == (
        f"cannot open the SQLite database '{path}' of the store 'main': unable to open "
        f"database file; the directory '{path.parent}' does not exist: create it, or give "
        "the path of a file in an existing directory"
    )


def test_a_relative_sqlite_path_is_shown_as_the_file_it_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    registry = StoreRegistry({"main": "sqlite:missing/app.db"})

    with pytest.raises(
        DisconnectionError, match=rf"'missing/app.db' \({tmp_path}/missing/app.db\)"
    ):
        registry.get()


def test_an_unreachable_postgresql_server_is_named_without_its_password():
    # Port 1 on the loopback interface: nothing listens there.
    registry = StoreRegistry({"main": f"postgres://app:{SECRET}@127.0.0.1:1/app"})

    with pytest.raises(DisconnectionError) as raised:
        registry.get()

    message = str(raised.value)
    assert message.startswith(
        "cannot connect to the database 'postgres://app:***@127.0.0.1:1/app' of the store "
        "'main': connection to server at \"127.0.0.1\", port 1 failed"
    )
    assert SECRET not in message


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


@pytest.mark.parametrize(
    "uri",
    [
        f"nope://app:{SECRET}@h/d",
        f"postgres://app:{SECRET}@h:x/d",
        f"nope://app:{SECRET}/{SECRET}@h/d",
        f"postgres://app:{SECRET}/{SECRET}@h/d",
        f"postgres://app:{SECRET}?{SECRET}@h/d",
        f"postgres://app:{SECRET}@{SECRET}@h/d",
        f"postgres://app:{SECRET}%20{SECRET}@h/d",
        f"postgres://h/d?password={SECRET}%20{SECRET}",
        f"postgres://app:{SECRET}@h/d?sslmod=require",
    ],
)
def test_errors_about_a_uri_never_show_its_password(uri):
    with pytest.raises(ConfigurationError) as caught:
        MiddleStorm(app, uri)

    printed = "".join(traceback.format_exception(caught.value))
    assert "***" in printed
    assert SECRET not in printed


def test_a_storm_database_is_used_as_given():
    database = create_database("sqlite:")

    assert open_database(database) == (database, "sqlite:")


@pytest.mark.parametrize("password", [SECRET, quote(f"{SECRET}/@:?#'{SECRET}", safe="")])
def test_a_failing_connection_shows_no_password_in_errors_logs_or_reprs(password, caplog):
    # Port 1 refuses connections: the request fails while connecting.
    uri = f"postgres://app:{password}@127.0.0.1:1/app?connect_timeout=5"
    once = MiddleStorm(app, uri, retry=None)
    retried = MiddleStorm(app, uri, retry=RetryPolicy(attempts=2, backoff=0.001))
    caplog.set_level(logging.DEBUG)

    with pytest.raises(Exception) as caught:
        call(once)
    busy = call(retried)  # transient: run again, then a 503 with the cause logged

    printed = "".join(traceback.format_exception(caught.value))
    shown = [repr(once), repr(once.registry), printed, caplog.text]
    assert all(SECRET not in text for text in shown)
    assert "127.0.0.1" in str(caught.value)
    assert busy.status == "503 Service Unavailable" and "127.0.0.1" in caplog.text


# -- Passwords of any characters ---------------------------------------------

#: Characters that mean something in a URI, or to libpq, or to neither.
AWKWARD = ["/", "@", ":", "?", "#", "%2F", "%40", "%25", " ", "%20", "&", "=", "'", '"', "\\"]


def with_password(uri: str, password: str) -> str:
    """``uri`` (``scheme://user@...``) with ``password`` after its user name, as written."""
    scheme, rest = uri.split("://", 1)
    user, place = rest.split("@", 1)
    return f"{scheme}://{user.split(':', 1)[0]}:{password}@{place}"


@pytest.mark.parametrize("inside", AWKWARD)
def test_redact_uri_hides_a_password_whatever_its_characters(inside):
    uri = f"postgres://app:{SECRET}{inside}{SECRET}@db.example:5432/app?sslmode=require"

    assert redact_uri(uri) == "postgres://app:***@db.example:5432/app?sslmode=require"


@pytest.mark.parametrize("inside", [c for c in AWKWARD if c != "&"])
def test_redact_uri_hides_a_password_option_whatever_its_characters(inside):
    uri = f"postgres://db.example/app?user=app&password={SECRET}{inside}{SECRET}"

    assert redact_uri(uri) == "postgres://db.example/app?user=app&password=***"


def test_redact_uri_hides_a_password_option_whose_name_is_percent_encoded():
    # Storm decodes option names: "pass%77ord" is "password".
    uri = f"postgres://db.example/app?pass%77ord={SECRET}"

    assert SECRET not in redact_uri(uri)


#: Any text, with the characters that mean something in a URI or to libpq
#: drawn often.
passwords = st.text(st.sampled_from("/@:?#%&= '\"\\+;") | st.characters(), min_size=1)


@given(password=passwords)
def test_redact_uri_hides_any_password_in_the_user_part(password):
    uri = f"postgres://app:{password}@db.example:5432/app?sslmode=require"

    assert redact_uri(uri) == "postgres://app:***@db.example:5432/app?sslmode=require"


@given(password=passwords.filter(lambda password: "&" not in password))
def test_redact_uri_hides_any_password_option(password):
    # "&" separates options: Storm reads a raw "&" as the start of the next one.
    uri = f"postgres://db.example/app?sslmode=require&password={password}"

    assert redact_uri(uri) == "postgres://db.example/app?sslmode=require&password=***"


@pytest.mark.parametrize("inside", ["/", "@", ":", "?", "%+1", "% 1"])
def test_a_password_storm_would_misread_fails_at_construction_with_a_hint(inside):
    # Storm cuts the URI at the first "/" and "@" and the last ":", and
    # decodes "%+1" to chr(1): the password must be percent-encoded.
    uri = f"postgres://app:{SECRET}{inside}{SECRET}@127.0.0.1/app"

    with pytest.raises(ConfigurationError, match="percent-encode"):
        MiddleStorm(app, uri)


@pytest.mark.parametrize(
    ("password", "problem"),
    [
        (f"{SECRET}%20{SECRET}", "whitespace"),
        (f"{SECRET}%09{SECRET}", "whitespace"),
        (f"{SECRET}%0A", "whitespace"),
        (f"%20{SECRET}", "whitespace"),
        (f"{SECRET}%5C{SECRET}", "backslash"),
        (f"%27{SECRET}", "quote"),
        (f"{SECRET}%00{SECRET}", "NUL"),
    ],
)
def test_a_password_libpq_would_misread_fails_at_construction(password, problem):
    # Storm pastes the decoded password unquoted into libpq's "key=value" string.
    with pytest.raises(ConfigurationError, match=f"the password .*{problem}"):
        MiddleStorm(app, f"postgres://app:{password}@127.0.0.1/app")


def test_refusing_a_password_libpq_would_misread_says_how_to_give_it_instead():
    with pytest.raises(ConfigurationError, match=r"PGPASSWORD.*\.pgpass"):
        MiddleStorm(app, f"postgres://app:{SECRET}%20{SECRET}@127.0.0.1/app")


def test_an_empty_password_followed_by_options_fails_at_construction():
    # libpq would take "connect_timeout=5" for the password.
    with pytest.raises(ConfigurationError, match="the password .*empty"):
        MiddleStorm(app, "postgres://app:@127.0.0.1/app?connect_timeout=5")


@pytest.mark.parametrize(
    ("uri", "part"),
    [
        ("postgres://my%20app@127.0.0.1/app", "the user name"),
        ("postgres://app@127.0.0.1/my%5Capp", "the database name"),
        ("postgres://app@127.0.0.1/app?options=-c%20search_path%3Dx", "the option 'options'"),
    ],
)
def test_a_user_database_or_option_libpq_would_misread_fails_at_construction(uri, part):
    with pytest.raises(ConfigurationError, match=f"{part} .*(whitespace|backslash)"):
        MiddleStorm(app, uri)


def test_an_unknown_postgres_option_fails_at_construction():
    with pytest.raises(ConfigurationError, match="no connection option 'sslmod'"):
        MiddleStorm(app, "postgres://app@127.0.0.1/app?sslmod=require")


@pytest.mark.postgres
@pytest.mark.parametrize(
    "password",
    ["a/b@c:d?e#f%g&h=i;j", "mid'quote", "end'", '"dquote"', "=starts", "pässwörd", "x" * 200],
)
def test_a_password_libpq_reads_intact_is_accepted_and_reaches_postgres(password):
    require_postgres()
    # Percent-encoded as Storm decodes it: non-ASCII characters as they are.
    written = "".join(c if ord(c) > 127 else quote(c, safe="") for c in password)
    registry = StoreRegistry({"main": with_password(POSTGRES_URI, written)})

    store = registry.get()
    try:
        assert store.execute("SELECT 1").get_one() == (1,)
        assert store._connection._raw_connection.info.password == password
    finally:
        transaction.abort()
        registry.release()


def test_a_percent_encoded_utf8_password_fails_at_construction():
    # Storm decodes %C3%A4 to "Ã¤", not "ä": the server would get another password.
    with pytest.raises(ConfigurationError, match="UTF-8.*as they are"):
        MiddleStorm(app, f"postgres://app:{quote('pässwörd')}@127.0.0.1/app")


@pytest.mark.postgres
# Not a raw "@": Storm would take what follows it for a host name and look it up.
@pytest.mark.parametrize("inside", [*(c for c in AWKWARD if c != "@"), "%5C", "%00", "%27", "%0A"])
def test_a_password_never_shows_from_construction_to_the_first_request(inside, caplog):
    require_postgres()
    caplog.set_level(logging.DEBUG)
    uri = with_password(POSTGRES_URI, f"{SECRET}{inside}{SECRET}")
    shown = []
    try:
        middleware = MiddleStorm(app, uri)
        shown.append(repr(middleware))
        try:
            call(middleware)
        finally:
            middleware.registry.release()
    except Exception as error:  # refused, or the request failed: either may say why
        shown.append("".join(traceback.format_exception(error)))

    assert [text for text in [*shown, caplog.text] if SECRET in text] == []


def test_set_default_uri_keeps_only_the_redacted_uri():
    registry = StoreRegistry({"main": "sqlite:"})

    registry.set_default_uri("other", f"postgres://app:{SECRET}@127.0.0.1:1/app")

    assert registry.get_default_uris()["other"] == "postgres://app:***@127.0.0.1:1/app"
    assert SECRET not in repr(registry)


@pytest.mark.parametrize(
    "uri", ["app.db", f"postgres://app:{SECRET}%20x@127.0.0.1/app", f"postgres://app:{SECRET}@@h/d"]
)
def test_set_default_uri_refuses_what_the_constructor_refuses(uri):
    registry = StoreRegistry({"main": "sqlite:"})

    with pytest.raises(ConfigurationError) as caught:
        registry.set_default_uri("other", uri)

    assert SECRET not in str(caught.value)
    assert "other" not in registry.get_default_uris()


def test_set_default_uri_adds_a_store_the_registry_hands_out():
    registry = StoreRegistry({"main": "sqlite:"})

    registry.set_default_uri("other", "sqlite:")

    assert registry.get("other").execute("SELECT 1").get_one() == (1,)
    assert registry.names == ["main", "other"]
    transaction.abort()
    registry.release()


def test_a_storm_database_given_directly_is_named_without_its_password():
    database = create_database(f"postgres://app:{quote(SECRET + '/@:', safe='')}@127.0.0.1:1/app")

    assert open_database(database) == (database, "postgres://app:***@127.0.0.1:1/app")


def test_a_storm_database_libpq_would_misread_is_refused():
    database = create_database(f"postgres://app:{SECRET}%20x@127.0.0.1:1/app")

    with pytest.raises(ConfigurationError, match="the password .*whitespace"):
        StoreRegistry({"main": database})


@pytest.mark.parametrize(
    "uri",
    [
        f"postgres://app#ops:{SECRET}@db.example/app",
        f"postgres://app?ops:{SECRET}@db.example/app",
        f"postgres://app/ops:{SECRET}@db.example/app",
    ],
    ids=["#", "?", "/"],
)
def test_a_user_name_holding_a_delimiter_never_shows_the_password(uri):
    assert SECRET not in redact_uri(uri)
    with pytest.raises(ConfigurationError) as caught:
        StoreRegistry({"main": uri})

    assert SECRET not in "".join(traceback.format_exception(caught.value))
