"""Shared pytest configuration. Fixtures live in tests/support/ modules, imported explicitly."""
