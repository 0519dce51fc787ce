"""middlestorm.testing: what a test's code commits stays in the test."""

from __future__ import annotations

import textwrap

import pytest
import transaction
from storm.exceptions import DisconnectionError

from middlestorm import (
    ConfigurationError,
    MiddleStorm,
    MiddleStormError,
    RetryPolicy,
    StoreRegistry,
    Timeouts,
    run_in_transaction,
)
from middlestorm.testing import rolled_back
from tests.helpers import call
from tests.models import Note


def bodies(registry) -> list[str]:
    return [note.body for note in registry.get().find(Note).order_by(Note.id)]


def add(registry, body: str) -> None:
    registry.get().add(Note(body))


def test_what_the_code_commits_is_rolled_back_at_the_end(db, registry):
    with rolled_back(registry):
        run_in_transaction(registry, lambda: add(registry, "committed"))

    assert db.notes() == []


def test_the_code_sees_what_it_committed_while_the_block_runs(db, registry):
    with rolled_back(registry):
        run_in_transaction(registry, lambda: add(registry, "first"))
        run_in_transaction(registry, lambda: add(registry, "second"))

        assert run_in_transaction(registry, lambda: bodies(registry)) == ["first", "second"]


def test_a_rollback_by_the_code_undoes_only_what_followed_its_last_commit(db, registry):
    with rolled_back(registry):
        run_in_transaction(registry, lambda: add(registry, "kept"))
        add(registry, "undone")
        transaction.abort()

        assert run_in_transaction(registry, lambda: bodies(registry)) == ["kept"]


@pytest.mark.postgres
def test_a_failed_statement_leaves_the_store_usable_once_the_code_rolls_back(pg):
    from middlestorm import StoreRegistry

    registry = StoreRegistry({"main": pg.uri})
    try:
        with rolled_back(registry):
            with pytest.raises(Exception, match="no_such_table"):
                run_in_transaction(
                    registry, lambda: registry.get().execute("SELECT * FROM no_such_table")
                )
            run_in_transaction(registry, lambda: add(registry, "after the error"))

            assert run_in_transaction(registry, lambda: bodies(registry)) == ["after the error"]
        assert pg.notes() == []
    finally:
        registry.release()


def test_after_the_block_commits_reach_the_database_again(db, registry):
    with rolled_back(registry):
        run_in_transaction(registry, lambda: add(registry, "rolled back"))
    run_in_transaction(registry, lambda: add(registry, "kept"))

    assert db.notes() == ["kept"]


def test_a_transaction_under_way_is_aborted_before_the_block(db, registry):
    add(registry, "pending")
    with rolled_back(registry):
        assert bodies(registry) == []
    transaction.commit()

    assert db.notes() == []


CONFTEST = """
    import pytest
    from storm.locals import Int, Unicode
    from werkzeug.wrappers import Request, Response

    from middlestorm import MiddleStorm, current_store

    pytest_plugins = ["middlestorm.testing"]


    class Note:
        __storm_table__ = "note"
        id = Int(primary=True)
        body = Unicode()


    @Request.application
    def notes(request):
        if request.method == "POST":
            note = Note()
            note.body = request.form["body"]
            current_store.add(note)
            return Response("saved", 201)
        return Response(", ".join(n.body for n in current_store.find(Note).order_by(Note.id)))


    @pytest.fixture
    def storm_app():
        app = MiddleStorm(notes, {uri!r})
        yield app
        app.registry.release()
"""

TESTS = """
    def test_a_posted_note_is_listed(storm_client):
        assert storm_client.post("/", data={"body": "first"}).status_code == 201
        assert storm_client.post("/", data={"body": "second"}).status_code == 201
        assert storm_client.get("/").text == "first, second"

    def test_the_next_test_starts_from_an_empty_table(storm_client):
        assert storm_client.get("/").text == ""
"""


def test_the_plugin_gives_each_test_a_client_whose_work_is_rolled_back(db, pytester):
    pytester.makeconftest(textwrap.dedent(CONFTEST.format(uri=db.uri)))
    pytester.makepyfile(textwrap.dedent(TESTS))

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    result.assert_outcomes(passed=2)
    assert db.notes() == []


def test_the_plugin_is_not_registered_unless_a_conftest_asks_for_it(pytester):
    pytester.makepyfile("def test_uses_it(storm_client):\n    pass\n")

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'storm_client' not found*"])


def test_a_two_phase_registry_is_refused_naming_what_to_use_instead():
    registry = StoreRegistry({"main": "sqlite:"})
    registry.two_phase = True  # as StoreRegistry(two_phase=True) on PostgreSQL databases

    with pytest.raises(ConfigurationError, match="without two_phase=True"), rolled_back(registry):
        pass


def test_blocks_do_not_nest(db, registry):
    with (
        rolled_back(registry),
        pytest.raises(MiddleStormError, match="do not nest"),
        rolled_back(registry),
    ):
        pass


def test_a_request_that_committed_itself_is_not_run_again_as_in_production(db, registry):
    runs = []

    def app(environ, start_response):
        runs.append(1)
        environ["storm.store"].add(Note(f"run {len(runs)}"))
        environ["storm.store"].commit()  # the app commits itself, then fails transiently
        raise DisconnectionError("the connection went away after the app's own commit")

    middleware = MiddleStorm(app, registry, retry=RetryPolicy(attempts=3, backoff=0))
    with rolled_back(registry), pytest.raises(DisconnectionError):
        call(middleware)

    assert len(runs) == 1


@pytest.mark.postgres
def test_a_requests_statement_limit_ends_with_its_transaction(pg):
    registry = StoreRegistry({"main": pg.uri})
    middleware = MiddleStorm(
        lambda environ, start_response: (start_response("200 OK", []), [b""])[1],
        registry,
        timeouts=Timeouts(statement=5),
    )

    def limit() -> str:
        return registry.get().execute("SHOW statement_timeout").get_one()[0]

    def touching(environ, start_response):
        environ["storm.store"].execute("SELECT 1")
        start_response("200 OK", [])
        return [b""]

    middleware.app = touching
    try:
        with rolled_back(registry):
            call(middleware)
            after = run_in_transaction(registry, limit)
    finally:
        registry.release()

    assert after == "0"  # the request's 5 s limit went with its (savepoint) commit
