"""``cbart serve``: the runtime behind an HTTP server, with in-flight batching, metrics and backpressure, and
the same server and offline generation on Ray when one machine is not enough."""
