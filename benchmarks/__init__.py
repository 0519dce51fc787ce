"""middlestorm's benchmark suite: ``python -m benchmarks <command> [options]``.

How we measured: one application with four routes (``/nodb``, no database;
``/read``, one row by primary key; ``/update``, one UPDATE of one row;
``/list``, 50 rows) runs four ways: **bare** (no middleware, no store;
``/nodb`` only), **by hand** (a ``threading.local`` Storm store per thread,
the app commits or rolls back itself: the baseline), **repoze.tm2 + ZStorm**
(``repoze.tm.TM`` with a ``storm.zope.zstorm.ZStorm`` whose stores join
``transaction.manager``) and **middlestorm** (``MiddleStorm(app, uri)``).
The databases are SQLite (a file in a temporary folder, Storm's defaults but
``timeout=30``) and PostgreSQL on the same host (a role and database of their
own, ``middlestorm_bench``); each contender has 10,000 rows of its own. Contenders
run interleaved, rotating each round (A B C D, B C D A, …), so that drift on a
shared machine hits all alike; tables give medians over the rounds, with
same-round ratios to *by hand* and their min-max. ``inprocess`` calls the
WSGI callable on long-lived, warmed-up threads (no HTTP); own cost is the
same-round difference in wall-clock µs per request over bare on ``/nodb``
and over *by hand* elsewhere. ``statements`` counts with a Storm tracer and a
counter on the drivers' ``connect``. ``servers`` and ``threads`` start real
servers on 127.0.0.1 only (waitress, gunicorn ``gthread``, werkzeug
``threaded=True``), load them with ``wrk`` or client threads, and stop them
by pid at the end, even on error. Every command prints the command line
that repeats it and writes JSON to ``benchmarks/results/``; ``plot`` draws
PNGs under ``docs/`` from it. Sizes are options: small ones take seconds,
the defaults minutes.
"""
