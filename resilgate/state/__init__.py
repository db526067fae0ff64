"""Shared state: forced modes, breaker verdicts, counters, record cache, write journal, audit.

One interface (:class:`StateStore`), three backends: ``sqlite`` (embedded default, one node),
``redis`` (many replicas) and ``memory`` (unit tests only). The request path never awaits the
store: it reads a :class:`~resilgate.state.view.StateView` that the store keeps fresh.
"""
