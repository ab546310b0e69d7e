"""Integrations with other training frameworks (import the submodule you need)."""
