"""Security at the edge: request hardening, authentication, scopes and rate limits.

`gate.build_gate` turns the rule file's `consumers`, `auth`, route `auth`,
`require` and `rate_limit` keys into the request gate the proxy calls after
routing; `paths` and `request_head` hold the checks every request passes
before it is routed.
"""
