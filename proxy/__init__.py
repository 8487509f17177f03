"""Sluice proxy: the enforcing gateway between an AI agent and the services it reaches."""

__version__ = "0.1.0"
