-- POST a 1 MiB body to the URL's path on every request.
wrk.method = "POST"
wrk.body = string.rep("x", 1048576)
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["X-User-Id"] = "1"
wrk.headers["X-Api-Key"] = "bench-key-0123456789"
