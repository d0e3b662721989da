"""integration tests (see tests/conftest.py for what each kind may start)."""
