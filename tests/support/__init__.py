"""What the tests (and the benchmarks) share but the package does not ship: real services (Tansu, Postgres),
the pytest fixtures, `bridge up` as a child process, config builders and file helpers."""
