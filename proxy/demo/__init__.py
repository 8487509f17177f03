"""Scripted demo pieces: a sample repo, stand-in upstream services and a scripted agent."""
