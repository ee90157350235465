"""strangler: a Strangler-Fig migration gateway on Twisted.

The public surface is small: load a rule file, build a gateway server, and
the error types a caller may want to catch.
"""

from strangler.errors import (
    ConfigError,
    RuleProblem,
    StranglerError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "RuleProblem",
    "StranglerError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamTimeout",
    "__version__",
]
