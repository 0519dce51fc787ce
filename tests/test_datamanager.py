"""Savepoints of Storm stores: ``transaction.savepoint()`` with stores joined."""

from __future__ import annotations

import pytest
import transaction

from tests.models import Note


@pytest.fixture
def store(registry):
    transaction.begin()
    return registry.get()


def test_rolling_back_to_a_savepoint_undoes_what_came_after_it(store, db):
    store.add(Note("before"))
    point = transaction.savepoint()
    store.add(Note("after"))
    store.flush()

    point.rollback()
    transaction.commit()

    assert db.notes() == ["before"]


def test_changes_not_yet_flushed_are_dropped_too(store, db):
    point = transaction.savepoint()
    store.add(Note("never flushed"))

    point.rollback()
    transaction.commit()

    assert db.notes() == []


def test_an_object_changed_after_a_savepoint_has_its_earlier_values_again(store, db):
    note = Note("original")
    store.add(note)
    point = transaction.savepoint()
    note.body = "changed"
    store.flush()

    point.rollback()

    assert note.body == "original"
    transaction.commit()
    assert db.notes() == ["original"]


def test_an_object_added_after_a_savepoint_is_gone_after_rolling_back(store, db):
    point = transaction.savepoint()
    note = Note("added")
    store.add(note)
    store.flush()
    note_id = note.id

    point.rollback()

    assert store.get(Note, note_id) is None
    assert store.find(Note).count() == 0


def test_a_store_that_joined_after_the_savepoint_is_rolled_back_by_it(registry, db):
    transaction.begin()
    point = transaction.savepoint()  # no store has joined yet
    registry.get().add(Note("joined later"))
    registry.get().flush()

    point.rollback()
    registry.get().add(Note("kept"))
    transaction.commit()

    assert db.notes() == ["kept"]


def test_a_savepoint_can_be_rolled_back_to_twice(store, db):
    point = transaction.savepoint()
    store.add(Note("first try"))
    store.flush()
    point.rollback()
    store.add(Note("second try"))
    store.flush()
    point.rollback()
    store.add(Note("third try"))
    transaction.commit()

    assert db.notes() == ["third try"]
