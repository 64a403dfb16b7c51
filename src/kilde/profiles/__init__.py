"""Unified customer profiles: traits with provenance and precedence, computed traits."""
