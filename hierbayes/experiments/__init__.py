"""Runnable experiments behind ``python -m hierbayes``."""
