"""The exceptions of xo-webhooks: one hierarchy, rooted at :class:`WebhookError`."""

from __future__ import annotations


class WebhookError(Exception):
    """Base class of every exception this package raises on purpose."""


class ConfigError(WebhookError, ValueError):
    """The configuration is invalid.

    The message names where the bad value came from (an environment variable, a
    file, or a constructor argument) and the path of the field, for example
    ``XO_WEBHOOKS_HOOKS[2].type: 'pré' is not one of ['pre', 'post', 'pre/post']``.
    """


class SignatureError(WebhookError, ValueError):
    """A Standard Webhooks signature is missing, malformed, stale or wrong."""
