"""Notes remember when they were last edited."""


def apply(store):
    store.execute("ALTER TABLE note ADD COLUMN updated TIMESTAMP")
