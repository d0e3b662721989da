"""e2e tests (see tests/conftest.py for what each kind may start)."""
