"""Client of the signing service's REST API (SignPath-compatible)."""

from .client import ApiError, ServiceClient, ServiceUnavailable, SigningPolicyInfo

__all__ = ["ApiError", "ServiceClient", "ServiceUnavailable", "SigningPolicyInfo"]
