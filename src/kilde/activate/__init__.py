"""Activation: destinations, retargeting audiences, partner exports."""
