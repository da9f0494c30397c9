"""``python -m xo_webhooks``: the ``xo-webhooks`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
