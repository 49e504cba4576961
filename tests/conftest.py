"""Loads the suite's fixtures explicitly: the package ships no pytest plugin, so installing iii-bridge adds no
fixture to anyone else's test run."""

pytest_plugins = ("tests.support.fixtures",)
