"""Sluice console: the terminal UI that watches a proxy through its admin API.

It never imports the proxy's server layer; it talks to a proxy over HTTP, local or remote.
"""
