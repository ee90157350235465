"""The admin API: its web resource, OpenAPI document and CLI client."""
