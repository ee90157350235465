"""Body transforms: XML to JSON and back, and JSON field mapping.

The functions live in `strangler.transforms.xml_json` (the XML/JSON mapping)
and `strangler.transforms.body_map` (renaming, moving, dropping and setting
JSON fields). Both are pure: bytes or objects in, bytes or objects out, and
every refusal is a `TransformError`, so the proxy has one exception to turn
into a status code.
"""

from __future__ import annotations

from strangler.errors import StranglerError

__all__ = ["TransformError"]


class TransformError(StranglerError):
    """A body that a transform cannot or will not convert.

    `status` is what the body's sender deserves: 400 for a malformed or
    refused body, 413 for one that is too large. For a response body the
    client is not to blame, so the proxy answers 502 whatever `status` says.
    `reason` is a short stable word for logs and metrics; `message` says what
    was wrong in words a person can act on.
    """

    def __init__(self, message: str, status: int = 400, reason: str = "bad_body"):
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason
