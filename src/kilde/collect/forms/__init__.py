"""Hosted forms and surveys: ask people, with consent done right."""
