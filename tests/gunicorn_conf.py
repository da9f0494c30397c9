"""gunicorn configuration of the server tests: the README's flush-on-exit snippet, plus
a line that leaves the worker's delivery counters where the test can read them."""

import json
import os


def worker_exit(server, worker):
    from tests.server_app import app

    app.wsgi_app.close()  # flush, then dead-letter what is left (the README snippet)
    stats_dir = os.environ.get("XO_TEST_STATS_DIR")
    if stats_dir:
        with open(os.path.join(stats_dir, f"{os.getpid()}.json"), "w") as f:
            json.dump(app.wsgi_app.stats(), f)
