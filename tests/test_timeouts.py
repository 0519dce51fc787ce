"""Per-request limits PostgreSQL enforces: statement and idle-in-transaction timeouts."""

from __future__ import annotations

import contextvars
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import transaction
from werkzeug.wrappers import Request, Response

from middlestorm import (
    ConfigurationError,
    MiddleStorm,
    StoreRegistry,
    Timeouts,
    current_store,
    run_in_transaction,
)
from middlestorm import timeouts as limits
from tests.conftest import IN_CI, POSTGRES_URI, SESSION_DATABASE
from tests.helpers import call, start
from tests.models import Note
from tests.servers import free_port
from tests.test_stores import wait_for


def sleeping(seconds: float):
    """An app whose one query takes ``seconds``."""

    @Request.application
    def app(request):
        current_store.execute(f"SELECT pg_sleep({seconds})")
        return Response("done")

    return app


def test_a_statement_over_its_limit_is_cancelled_and_answered_503(pg_middleware, caplog):
    app = pg_middleware(sleeping(30), timeouts=Timeouts(statement=0.5))

    started = time.monotonic()
    response = call(app)
    took = time.monotonic() - started

    assert response.status == "503 Service Unavailable"
    assert "Retry-After" in dict(response.headers)
    assert took < 10  # cancelled, not waited out
    assert "had a statement cancelled (SQLSTATE 57014" in caplog.text


def test_the_thread_serves_the_next_request_on_the_same_connection_after_a_cancel(
    pg, pg_middleware
):
    @Request.application
    def app(request):
        pid = current_store.execute("SELECT pg_backend_pid()").get_one()[0]
        if "slow" in request.args:
            current_store.execute("SELECT pg_sleep(30)")
        current_store.add(Note("after"))
        return Response(str(pid))

    app = pg_middleware(app, timeouts=Timeouts(statement=0.3))
    first = call(app).data
    assert call(app, "/?slow=1").status == "503 Service Unavailable"

    assert call(app).data == first
    assert pg.notes() == ["after", "after"] and pg.idle_in_transaction() == 0


def test_no_limit_sends_nothing(pg, pg_middleware, tracer):
    app = pg_middleware(sleeping(0))
    call(app)
    tracer.clear()

    call(app)

    assert tracer.statements == ["SELECT"]


def test_a_limit_is_one_statement_in_the_transaction_it_limits(pg, pg_middleware, tracer):
    seen = []

    @Request.application
    def app(request):
        seen.append(current_store.execute("SHOW statement_timeout").get_one()[0])
        return Response("")

    app = pg_middleware(app, timeouts=Timeouts(statement=2, idle_in_transaction=5))
    call(app)
    tracer.clear()
    call(app)

    assert tracer.statements == ["SET", "SHOW"]  # both limits in one statement
    assert seen == ["2s", "2s"]
    assert pg.query("SHOW statement_timeout") == [("0",)]  # other sessions unaffected


def test_a_request_may_set_its_own_limit_through_environ(pg_middleware):
    inner = pg_middleware(sleeping(30), timeouts=Timeouts(statement=60))

    def routing(environ, start_response):  # picks this request's limits before middlestorm
        environ["middlestorm.timeouts"] = Timeouts(statement=0.2)
        return inner(environ, start_response)

    assert call(routing).status == "503 Service Unavailable"


def test_the_app_may_lift_its_limit_before_a_slow_statement(pg_middleware):
    @Request.application
    def report(request):
        current_store.execute("SELECT 1")  # the limit is already set on this store
        limits.override(statement=None)  # this report may take its time
        current_store.execute("SELECT pg_sleep(0.5)")
        return Response("report")

    response = call(pg_middleware(report, timeouts=Timeouts(statement=0.2)))

    assert (response.status, response.data) == ("200 OK", b"report")


def test_a_stream_the_server_never_closes_loses_its_session_at_the_idle_limit(pg):
    def app(environ, start_response):
        store = environ["storm.store"]
        start_response("200 OK", [])

        def body():
            store.execute("UPDATE counter SET value = 1 WHERE id = 1")  # takes a row lock
            yield b"one"
            yield b"two"

        return body()

    middleware = MiddleStorm(app, pg.uri, timeouts=Timeouts(idle_in_transaction=0.5))
    _, body = start(middleware)
    assert next(iter(body)) == b"one"  # and the server never closes it

    assert wait_for(lambda: pg.idle_in_transaction() == 0, timeout=15)
    pg.run("SET lock_timeout = '5s'", "UPDATE counter SET value = 2 WHERE id = 1")
    assert pg.counters()[0] == 2
    transaction.abort()
    middleware.registry.release()


def test_sqlite_stores_get_no_limits(tmp_path):
    from tests.conftest import make_database

    db = make_database("sqlite", tmp_path)

    def app(environ, start_response):
        environ["storm.store"].add(Note("on sqlite"))
        start_response("200 OK", [])
        return [b""]

    middleware = MiddleStorm(app, db.uri, timeouts=Timeouts(statement=1))
    try:
        assert call(middleware).status == "200 OK"
    finally:
        middleware.registry.release()
    assert db.notes() == ["on sqlite"]


def test_a_unit_of_work_outside_wsgi_gets_its_limits(pg):
    registry = StoreRegistry({"main": pg.uri})
    try:
        shown = run_in_transaction(
            registry,
            lambda: registry.get().execute("SHOW statement_timeout").get_one()[0],
            timeouts=Timeouts(statement=3),
        )
    finally:
        registry.release()

    assert shown == "3s"


@pytest.mark.parametrize(
    "options", [{"statement": 0}, {"statement": -1}, {"idle_in_transaction": "5"}]
)
def test_a_bad_limit_is_refused_with_a_message_naming_it(options):
    with pytest.raises(ConfigurationError, match="timeout must be a number of seconds > 0"):
        Timeouts(**options)


# -- behind PgBouncer in transaction pooling mode --------------------------------------


@pytest.fixture
def pgbouncer(pg):
    """PgBouncer in transaction pooling mode on a free port, in front of the test database."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(binary):
        message = "pgbouncer is not installed (apt-get install pgbouncer)"
        if IN_CI:
            pytest.fail(message + "; CI must run the PgBouncer tests")
        pytest.skip(message)
    port = free_port()
    # It runs as postgres, which cannot enter pytest's own (root-only) temporary folders.
    folder = Path(tempfile.mkdtemp(prefix="middlestorm-pgbouncer-"))
    folder.chmod(0o755)
    (folder / "users.txt").write_text('"postgres" ""\n')
    (folder / "pgbouncer.ini").write_text(
        f"""[databases]
{SESSION_DATABASE} = host=127.0.0.1 port=5432 dbname={SESSION_DATABASE}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {folder}/users.txt
pool_mode = transaction
default_pool_size = 2
max_client_conn = 50
logfile = {folder}/pgbouncer.log
pidfile = {folder}/pgbouncer.pid
ignore_startup_parameters = extra_float_digits,application_name
"""
    )
    for path in (folder, *folder.iterdir()):
        shutil.chown(path, "postgres")
    process = subprocess.Popen(
        [binary, "-u", "postgres", str(folder / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    uri = POSTGRES_URI.replace(":5432/", f":{port}/") + f"?application_name={pg.name}"
    import psycopg2

    def answers() -> bool:
        try:
            psycopg2.connect(uri.replace("postgres://", "postgresql://", 1)).close()
            return True
        except psycopg2.Error:
            return False

    assert wait_for(answers, timeout=15), (folder / "pgbouncer.log").read_text()[-2000:]
    yield uri
    process.terminate()
    process.wait(15)
    shutil.rmtree(folder, ignore_errors=True)


def test_limits_hold_per_transaction_behind_pgbouncer_in_transaction_pooling(pgbouncer):
    seen: list[str] = []

    @Request.application
    def app(request):
        if "limited" in request.args:
            seen.append(current_store.execute("SHOW statement_timeout").get_one()[0])
            current_store.execute("SELECT pg_sleep(30)")
        else:
            seen.append(current_store.execute("SHOW statement_timeout").get_one()[0])
        return Response("")

    limited = MiddleStorm(app, pgbouncer, timeouts=Timeouts(statement=0.3))
    unlimited = MiddleStorm(app, pgbouncer)
    results: dict[str, str] = {}

    def client(name: str, middleware: MiddleStorm, path: str) -> None:
        results[name] = call(middleware, path).status
        middleware.registry.release()

    threads = [threading.Thread(target=client, args=("limited", limited, "/?limited=1"))]
    threads += [
        threading.Thread(target=client, args=(f"other {n}", unlimited, "/")) for n in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert results["limited"] == "503 Service Unavailable"
    assert all(results[f"other {n}"] == "200 OK" for n in range(4))
    assert seen.count("300ms") == 1 and seen.count("0") == 4  # no limit leaked to a server session


def test_override_reaches_a_store_already_in_the_transaction_with_no_limits_configured(
    pg_middleware,
):
    @Request.application
    def report(request):
        current_store.execute("SELECT 1")  # joined, with no limit
        limits.override(statement=0.3)
        current_store.execute("SELECT pg_sleep(30)")
        return Response("never")

    assert call(pg_middleware(report)).status == "503 Service Unavailable"


def test_override_outside_a_request_is_refused():
    from middlestorm import NoRequestError

    outside = contextvars.Context()  # no request of an earlier test left bound
    with pytest.raises(NoRequestError, match="inside a request"):
        outside.run(limits.override, statement=5)
