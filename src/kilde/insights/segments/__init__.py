"""Segments (audiences): rules, their compilation to query expressions, memberships.

Kept free of heavy imports: the plan loader imports `rules` from here.
"""
