"""Test utilities, not a product feature: the protocol-faithful iii test engine, a test consumer worker, an
in-memory Sink for testing sources without the runtime (:mod:`bridge.testing.sink`), and the pytest fixtures
(loaded as a pytest plugin through the ``pytest11`` entry point) for real services."""
