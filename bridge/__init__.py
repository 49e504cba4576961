"""iii-bridge: turn Kafka topics, Postgres notifications and dropped files into iii function calls."""

__version__ = "0.1.0"
