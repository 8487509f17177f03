"""TLS for the forward proxy: Sluice's local CA and the leaves it mints for interception."""

from proxy.tls.ca import CAError, LocalCA

__all__ = ["CAError", "LocalCA"]
