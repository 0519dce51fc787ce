"""``python -m example_app``: serve the notes application with werkzeug's dev server."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from storm.exceptions import DatabaseError, DisconnectionError
from werkzeug.serving import is_running_from_reloader, run_simple

from example_app import create_app
from example_app.config import DB_VARIABLE, DEFAULT_SQLITE, database_uri
from middlestorm import ConfigurationError, redact_uri


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m example_app",
        description=(
            "Serve the middlestorm notes example with werkzeug's development server "
            "(a thread per request, reloading when a source file changes)."
        ),
    )
    parser.add_argument(
        "--db",
        default=None,
        metavar="URI",
        help=(
            f"the database, e.g. postgres://user@localhost/notes (default: ${DB_VARIABLE}, "
            f"else the SQLite file {DEFAULT_SQLITE}, created on first run)"
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    parser.add_argument(
        "--port",
        type=int,
        default=os.environ.get("PORT", "5000"),
        help="the port (default: $PORT, else 5000)",
    )
    parser.add_argument(
        "--no-reload", action="store_true", help="do not restart when a source file changes"
    )
    parser.add_argument(
        "--production",
        action="store_true",
        help="leave out the Server-Timing header and the DEBUG log of each request's queries",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = parse_arguments(argv)
    db_uri = database_uri(options.db)
    dev_mode = not options.production
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if dev_mode:
        logging.getLogger("middlestorm.timing").setLevel(logging.DEBUG)
    try:
        app = create_app(db_uri, server_timing=dev_mode)
    except ConfigurationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DisconnectionError as error:  # it names the database
        print(f"error: {redact_uri(str(error)).strip()}", file=sys.stderr)
        return 1
    except DatabaseError as error:
        print(
            f"error: the database {redact_uri(db_uri)} refused the notes schema: "
            f"{redact_uri(str(error)).strip()}",
            file=sys.stderr,
        )
        return 1
    logging.getLogger("example_app").info("notes database: %s", redact_uri(db_uri))
    try:
        run_simple(
            options.host,
            options.port,
            app,
            use_reloader=not options.no_reload,
            threaded=True,
        )
    except SystemExit as exit:
        if exit.code == 3 and is_running_from_reloader():
            # The reloader's child asks for a restart with sys.exit(3) while
            # its server thread may be starting a request thread. A thread
            # started during interpreter finalization can crash CPython before
            # 3.11.6 (gh-108987) with SIGSEGV, and the parent then exits
            # instead of restarting. Leave without finalizing: the request
            # threads are daemons, cut off either way.
            app.registry.release()
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
