"""Fakes for tests: trial functions that train nothing."""
