"""Kilde: a self-hostable, privacy-first customer data platform."""

__version__ = "0.1.0"
