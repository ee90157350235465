"""The HTTP/1.1 relay: client connections, upstream connections, and one exchange."""
