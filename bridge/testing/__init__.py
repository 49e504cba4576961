"""Test utilities, not a product feature: the protocol-faithful iii test engine, a test consumer worker, and
the pytest fixtures (loaded as a pytest plugin through the ``pytest11`` entry point) for real services."""
