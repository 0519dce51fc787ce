"""The notes app's HTML: the list, a note's edit and delete pages, and their footer."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from html import escape

from example_app.models import MAX_LENGTH, Note
from middlestorm import timing

#: What a change's redirect (``/?done=...``) says, once its transaction committed.
DONE = {
    "added": "Note added",
    "saved": "Note saved",
    "deleted": "Note deleted",
}


def notes_page(
    notes: Iterable[Note], *, error: str | None = None, draft: str = "", done: str | None = None
) -> str:
    items = "\n".join(_note_item(note) for note in notes)
    listing = (
        f'<ol class="notes">\n{items}\n</ol>' if items else '<p class="empty">No notes yet.</p>'
    )
    flash = (
        f'<p class="flash" role="status">{DONE[done]}: committed before this page was '
        "asked for.</p>"
        if done in DONE
        else ""
    )
    form = f"""<form method="post" action="/" class="new">
  <label for="new-body">New note</label>
  <textarea id="new-body" name="body" rows="3" maxlength="{MAX_LENGTH}" required
    placeholder="Write something…" autofocus>{escape(draft)}</textarea>
  <div class="row"><button type="submit">Add note</button></div>
</form>"""
    return _layout("Notes", f"{flash}{_error(error)}{form}\n{listing}", error)


def edit_page(note: Note, *, error: str | None = None, draft: str | None = None) -> str:
    text = note.body if draft is None else draft
    form = f"""<form method="post" action="/notes/{note.id}">
  <label for="body">Note {note.id}</label>
  <textarea id="body" name="body" rows="6" maxlength="{MAX_LENGTH}" required
    autofocus>{escape(text)}</textarea>
  <p class="meta">{_dates(note)}</p>
  <div class="row"><button type="submit">Save</button>
    <a class="button plain" href="/#note-{note.id}">Cancel</a></div>
</form>"""
    return _layout(f"Edit note {note.id}", f"{_error(error)}{form}", error)


def delete_page(note: Note) -> str:
    form = f"""<p>Delete this note? It cannot be undone.</p>
<blockquote>{escape(note.body)}</blockquote>
<form method="post" action="/notes/{note.id}/delete">
  <div class="row"><button type="submit" class="danger">Delete</button>
    <a class="button plain" href="/#note-{note.id}">Cancel</a></div>
</form>"""
    return _layout(f"Delete note {note.id}", form, None)


def _note_item(note: Note) -> str:
    return f"""<li class="note" id="note-{note.id}">
  <p class="body">{escape(note.body)}</p>
  <p class="meta">{_dates(note)}
    <span class="actions"><a href="/notes/{note.id}">Edit</a>
    <a class="danger" href="/notes/{note.id}/delete">Delete</a></span></p>
</li>"""


def _dates(note: Note) -> str:
    dates = f"<span>Written {_time(note.created)}</span>"
    if note.updated is not None:
        dates += f"<span>edited {_time(note.updated)}</span>"
    return dates


def _time(moment: datetime) -> str:
    return f'<time datetime="{moment.isoformat()}Z">{moment:%Y-%m-%d %H:%M} UTC</time>'


def _error(error: str | None) -> str:
    return f'<p class="error" role="alert">{escape(error)}</p>' if error else ""


def _layout(title: str, content: str, error: str | None) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><link rel="stylesheet" href="/style.css"></head>
<body><main>
<header><h1><a href="/">Notes</a></h1>
<p class="tagline">Every change is one transaction, committed before you see its page.</p>
</header>
{content}
{_footer(error)}
</main></body></html>"""


def _footer(error: str | None) -> str:
    """What middlestorm did for this request, as far as the page can know it."""
    stats = timing.current()
    ran = (
        f"ran {stats.statements} statement{'s' if stats.statements != 1 else ''} "
        f"({stats.seconds * 1000:.1f} ms) "
        if stats is not None
        else "ran "
    )
    ending = (
        "in a transaction rolled back when the page is sent, as the form had a mistake"
        if error
        else "in a read-only transaction, rolled back when the page is sent"
    )
    return (
        f'<footer><p id="middlestorm">middlestorm: this page {ran}{ending}.</p>'
        '<p>The same notes as JSON: <a href="/api/notes">/api/notes</a></p></footer>'
    )
