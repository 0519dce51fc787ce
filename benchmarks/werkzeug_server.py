"""``python -m benchmarks.werkzeug_server HOST PORT``: werkzeug's server, a thread per connection.

Serves :func:`benchmarks.contenders.served` with ``make_server(..., threaded=True)``,
without the request log (it would cost more than some of the apps).
"""

from __future__ import annotations

import logging
import sys

from werkzeug.serving import make_server

from benchmarks.contenders import served


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    make_server(host, port, served, threaded=True).serve_forever()


if __name__ == "__main__":
    main()
