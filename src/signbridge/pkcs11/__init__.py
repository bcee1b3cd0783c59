"""PKCS#11 over p11-kit's RPC protocol: a token server for consumers and a pure-Python client.

Provider side: build :class:`Token` objects (:func:`objects_for_identity` turns a certificate into
its certificate/public-key/private-key objects) and :func:`serve` them on a Unix socket that
``p11-kit-client.so`` reaches through ``P11_KIT_SERVER_ADDRESS=unix:path=...``.
Tool side: :class:`Pkcs11Client` lists identities and signs digests over the same protocol.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Pkcs11Client, Pkcs11Object, TokenInfo
    from .constants import CKA, CKC, CKF, CKG, CKK, CKM, CKO, CKR, CKS, CKU
    from .errors import ConnectionLostError, Pkcs11Error, ProtocolError, SocketPathError
    from .identity import authority_object, objects_for_identity
    from .objects import TokenObject
    from .peer import CallerInfo
    from .server import Pkcs11Server, serve
    from .signing import pss_params
    from .token import Signer, Token
    from .wire import Mechanism, PssParams

# Name -> its module, imported on first use: the token process serves without the client, and a
# tool's client needs no server.
_MODULES = {
    "Pkcs11Client": "client", "Pkcs11Object": "client", "TokenInfo": "client",
    "CKA": "constants", "CKC": "constants", "CKF": "constants", "CKG": "constants", "CKK": "constants",
    "CKM": "constants", "CKO": "constants", "CKR": "constants", "CKS": "constants", "CKU": "constants",
    "ConnectionLostError": "errors", "Pkcs11Error": "errors", "ProtocolError": "errors", "SocketPathError": "errors",
    "authority_object": "identity", "objects_for_identity": "identity",
    "CallerInfo": "peer",
    "Pkcs11Server": "server", "serve": "server",
    "pss_params": "signing",
    "TokenObject": "objects",
    "Signer": "token", "Token": "token",
    "Mechanism": "wire", "PssParams": "wire",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "CKA",
    "CKC",
    "CKF",
    "CKG",
    "CKK",
    "CKM",
    "CKO",
    "CKR",
    "CKS",
    "CKU",
    "CallerInfo",
    "ConnectionLostError",
    "Mechanism",
    "Pkcs11Client",
    "Pkcs11Error",
    "Pkcs11Object",
    "Pkcs11Server",
    "PssParams",
    "ProtocolError",
    "Signer",
    "SocketPathError",
    "Token",
    "TokenInfo",
    "TokenObject",
    "authority_object",
    "objects_for_identity",
    "pss_params",
    "serve",
]
