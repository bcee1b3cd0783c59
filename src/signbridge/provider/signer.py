"""Signing through the service: one ``SignHash`` per PKCS#11 signature, and the Cryptoki login.

The login PIN chooses the credentials, as SignPath's Cryptoki library does: ``CONFIG`` signs with
the provider's own settings, ``$OrganizationId:$ApiToken`` with that token (the organization must
be the token's own; the token is checked with the service once and remembered for a while), and
any other PIN is ``CKR_PIN_INCORRECT``.

The pkcs11 server drives each consumer connection from its own thread, and calls ``check_pin``
and the signer from it, so the credentials a connection logged in with are kept per thread.

Service failures map to return values as SignPath documents:
transient (timeouts, 503 after every retry) -> CKR_FUNCTION_FAILED, other 5xx -> CKR_DEVICE_ERROR,
4xx -> CKR_ARGUMENTS_BAD, anything else -> CKR_GENERAL_ERROR.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..api.client import ApiError, Failure, ServiceClient, classify
from ..crypto.signatures import SignatureRequest
from ..errors import ConfigError
from ..pkcs11 import CKR, CallerInfo, Pkcs11Error, TokenObject
from .logs import redact, register_secret
from .settings import ProviderSettings, parse_pin

log = logging.getLogger("signbridge.token")

_CKR_FOR_FAILURE = {
    Failure.TRANSIENT: CKR.FUNCTION_FAILED,
    Failure.SERVER: CKR.DEVICE_ERROR,
    Failure.CLIENT: CKR.ARGUMENTS_BAD,
    Failure.OTHER: CKR.GENERAL_ERROR,
}
_MAX_COMMAND_LINE = 4096
_PIN_MEMORY_SECONDS = 300.0
_MAX_CLIENTS = 16
_SECRET_MIN_LENGTH = 8


def ckr_for(error: BaseException) -> int:
    """The CK_RV a consumer sees for a failed service call."""
    return int(_CKR_FOR_FAILURE[classify(error)])


def caller_metadata(caller: CallerInfo, token_name: str) -> dict[str, Any]:
    """What the audit log learns about the signing process (PINs and passwords hidden)."""
    process: dict[str, Any] = {}
    if caller.pid is not None:
        process["pid"] = caller.pid
    if caller.command_line:
        process["commandLine"] = redact(" ".join(caller.redacted_command_line))[:_MAX_COMMAND_LINE]
    if caller.user is not None or caller.uid is not None:
        process["user"] = caller.user if caller.user is not None else str(caller.uid)
    return {
        "sourceProcess": process,
        "cryptoProvider": {"name": "signbridge", "version": __version__, "interface": "Cryptoki", "token": token_name},
    }


def key_reference(key: TokenObject) -> tuple[str, str]:
    """``(project slug, policy slug)`` from the key's CKA_ID ``$ProjectSlug/$SigningPolicySlug``."""
    project, slash, policy = key.id.decode("utf-8", errors="replace").partition("/")
    if not slash or not project or not policy:
        raise Pkcs11Error(CKR.KEY_HANDLE_INVALID, f"key {key.label!r} has no $ProjectSlug/$SigningPolicySlug id")
    return project, policy


class ServiceSigner:
    """The token's ``signer`` and ``check_pin``: both thread-safe."""

    def __init__(self, settings: ProviderSettings, client: ServiceClient, token_name: str) -> None:
        self.settings = settings
        self.client = client
        self.token_name = token_name
        self.probe: tuple[str | None, str | None] = (settings.project_slug, settings.signing_policy_slug)
        self._session = threading.local()
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, ServiceClient] = OrderedDict()
        self._verified: dict[str, float] = {}  # PIN digest -> when the service accepted it

    # --- login ------------------------------------------------------------------------------

    def check_pin(self, pin: bytes) -> bool:
        text = pin.decode("utf-8", errors="replace")
        if text != "CONFIG" and len(text) >= _SECRET_MIN_LENGTH:
            register_secret(text)  # a mistyped token is still a secret; "1234" would only blot out logs
        try:
            parsed = parse_pin(text)
        except ConfigError:
            return False
        if parsed is None:
            self._session.credentials = None
            return True
        organization, token = parsed
        register_secret(token)
        if organization != (self.settings.organization_id or "").lower():
            log.info("refused a PIN for organization %s: this token serves %s", organization, self.settings.organization_id)
            return False
        if self.settings.api_token is not None and hmac.compare_digest(token, self.settings.api_token):
            self._session.credentials = None
            return True
        if not self._token_accepted(organization, token, pin):
            return False
        self._session.credentials = (organization, token)
        return True

    def _token_accepted(self, organization: str, token: str, pin: bytes) -> bool:
        digest = hashlib.sha256(pin).hexdigest()
        with self._lock:
            when = self._verified.get(digest)
        if when is not None and time.monotonic() - when < _PIN_MEMORY_SECONDS:
            return True
        project, policy = self.probe
        try:
            self._client(organization, token).my_signing_policies(project, policy)
        except ApiError as exc:
            if exc.status in (401, 403):
                log.info("the service refused the API token given as PIN: %s", exc.detail)
                return False
            if exc.status != 404:  # a 404 comes after authentication: the filter is what is missing
                raise Pkcs11Error(ckr_for(exc), f"the PIN could not be checked: {exc}") from None
        with self._lock:
            self._verified[digest] = time.monotonic()
        return True

    def _client(self, organization: str, token: str) -> ServiceClient:
        key = hashlib.sha256(f"{organization}:{token}".encode()).hexdigest()
        with self._lock:
            client = self._clients.get(key)
            if client is not None:
                self._clients.move_to_end(key)
                return client
            client = service_client(self.settings, organization_id=organization, api_token=token)
            self._clients[key] = client
            if len(self._clients) > _MAX_CLIENTS:
                _, oldest = self._clients.popitem(last=False)
                oldest.close()
            return client

    # --- signing ----------------------------------------------------------------------------

    def __call__(self, key: TokenObject, request: SignatureRequest, caller: CallerInfo) -> bytes:
        project, policy = key_reference(key)
        credentials = getattr(self._session, "credentials", None)
        client = self.client if credentials is None else self._client(*credentials)
        try:
            return client.sign_hash(project, policy, request, caller_metadata(caller, self.token_name))
        except ApiError as exc:
            raise Pkcs11Error(ckr_for(exc), str(exc)) from None

    def close(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()


def service_client(
    settings: ProviderSettings,
    *,
    organization_id: str | None = None,
    api_token: str | None = None,
    on_retry: Callable[[str, float], None] | None = None,
) -> ServiceClient:
    """A client of the signing service with the provider's settings; ``organization_id`` and
    ``api_token`` replace its credentials."""
    organization = organization_id or settings.organization_id
    token = api_token or settings.api_token
    if not organization or not token:
        raise ConfigError("the signing service needs an organization id and an API token")
    return ServiceClient(
        settings.api_url,
        organization,
        token,
        http_timeout=settings.http_request_timeout,
        service_unavailable_timeout=settings.service_unavailable_timeout,
        proxy=settings.http_proxy,
        ca_bundle=settings.ca_bundle,
        on_retry=on_retry,
    )
