"""Test helpers (importable because pytest puts tests/ on sys.path)."""
