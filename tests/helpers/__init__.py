"""Shared test helpers (not tests): importable as `helpers.*` because tests/conftest.py puts tests/ on sys.path."""
