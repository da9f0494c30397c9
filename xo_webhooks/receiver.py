"""The safe receiver of web hooks, as documented in the README: verifies, validates and
runs a hook script per method, without a shell::

    from xo_webhooks.receiver import make_receiver
    app = make_receiver("./hook-scripts", secret="whsec_...")   # any WSGI server

This module is its public name; it lives in :mod:`xo_webhooks.receiving.receiver`,
with the script runner beside it.
"""

from .receiving.receiver import HookReceiver, make_receiver, serve

__all__ = ["HookReceiver", "make_receiver", "serve"]
