"""Who is calling: JWT verification (local issuer or OIDC) and the sessions it defines.

Plain Python: key fetching is injected by the server layer, so everything here is tested
without sockets.
"""

from proxy.identity.tokens import (
    ANONYMOUS,
    Identity,
    IdentityError,
    KeysUnavailable,
    TokenVerifier,
    extract_token,
)

__all__ = [
    "ANONYMOUS",
    "Identity",
    "IdentityError",
    "KeysUnavailable",
    "TokenVerifier",
    "extract_token",
]
