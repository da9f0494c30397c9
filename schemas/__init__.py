"""The JSON Schemas of xo-webhooks, shipped in the wheel as ``xo_webhooks.schemas``.

Read them through :mod:`xo_webhooks.schema`; this file only makes the folder a package.
"""
