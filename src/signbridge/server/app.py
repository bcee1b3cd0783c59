"""The HTTP API (Starlette): SignPath's crypto-provider routes under ``/Api``, plus the timestamp authority."""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from ..errors import SignbridgeError
from .audit import AuditEntry, AuditLog
from .database import open_engine
from .directory import load_chain, load_x509
from .keystores import KeyRef
from .keystores.factory import open_keystore
from .models import Certificate
from .openapi import openapi_document
from .problems import PROBLEM_CONTENT_TYPE, Problem, bad_request
from .requests import get, parse_fast_signing_payload, parse_sign_hash
from .service import Caller, SigningService
from .settings import ServerSettings
from .tsa import TimestampAuthority

log = logging.getLogger("signbridge.server")

MAX_TIMESTAMP_QUERY = 64 * 1024

Parse = Callable[[], tuple[Any, Callable[[Any], dict]]]
"""Turns a request read off the wire into (HashSigningRequest, echo); raises Problem."""


def problem_response(problem: Problem) -> JSONResponse:
    return JSONResponse(
        problem.body(), status_code=problem.status, media_type=PROBLEM_CONTENT_TYPE, headers=problem.headers
    )


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, f"The request body is larger than the service accepts ({limit} bytes).")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, f"The request body is larger than the service accepts ({limit} bytes).")
        chunks.append(chunk)
    return b"".join(chunks)


def _audit_entry(request: Request, organization_id: str) -> AuditEntry:
    return AuditEntry(
        outcome="rejected",
        status=400,
        organization_id=organization_id.lower(),
        remote_address=request.client.host if request.client else None,
    )


def _describe(entry: AuditEntry, caller: Caller | None, parsed) -> None:  # noqa: ANN001
    if caller is not None:
        entry.user_id, entry.user_name, entry.token_id = caller.user_id, caller.user_name, caller.token_id
    if parsed is not None:
        signature = parsed.signature
        entry.project_slug, entry.policy_slug = parsed.project_slug, parsed.policy_slug
        entry.algorithm = f"{signature.scheme.value}/{signature.hash_algorithm.title}"
        if signature.scheme.value == "Ecdsa":
            entry.algorithm += f"/{signature.ecdsa_format.value}"
        entry.digest = signature.digest.hex()
        entry.client_metadata = parsed.metadata


class Api:
    """The route handlers, bound to one service instance."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.service: SigningService | None = None
        self.tsa: TimestampAuthority | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        engine = open_engine(self.settings.database_url)
        keystore = open_keystore(self.settings.data_dir, self.settings.keystore)
        audit = AuditLog(engine)
        self.service = SigningService(
            engine, keystore, audit, rate_limit_per_minute=self.settings.rate_limit_per_minute
        )
        self.tsa = self._load_tsa()
        # Each request allocates a few thousand short-lived objects; with the default thresholds the
        # cyclic collector runs every few requests and rescans everything loaded at start-up.
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        try:
            yield
        finally:
            await audit.aclose()
            self.service.close()
            keystore.close()
            engine.dispose()

    def _load_tsa(self) -> TimestampAuthority | None:
        service = self.service
        assert service is not None
        with Session(service.engine) as session:
            row = session.scalars(
                select(Certificate).where(Certificate.purpose == "timestamping").order_by(Certificate.created_at.desc())
            ).first()
        if row is None:
            return None
        ref = KeyRef.parse(row.key_ref)
        keystore = service.keystore
        return TimestampAuthority(load_x509(row), load_chain(row), lambda request: keystore.sign(ref, request))

    def _authorize_and_sign(self, authorization: str | None, organization_id: str, parse: Parse, entry: AuditEntry):  # noqa: ANN202
        """Authenticate, parse, sign (on the event loop or in a worker thread, see ``SigningService.inline``).
        ``entry`` learns each fact as it is established."""
        service = self.service
        assert service is not None
        try:
            parsed, echo = parse()
        except Problem as problem:
            parsed, echo, invalid = None, None, problem
        else:
            invalid = None
        # An unauthenticated caller learns nothing about its request's validity: 401 comes first.
        grant = service.authorize(
            authorization, organization_id, parsed and parsed.project_slug, parsed and parsed.policy_slug
        )
        _describe(entry, grant.caller, parsed)
        if invalid is not None:
            raise invalid
        return echo(service.sign(grant, parsed, entry))

    async def _signing_route(self, request: Request, read: Callable[[Request], Awaitable[Parse]]) -> Response:
        """Read the request, then authenticate, parse and sign it; answer only once the audit record
        is committed."""
        service = self.service
        assert service is not None
        organization_id = request.path_params["organization_id"]
        entry = _audit_entry(request, organization_id)
        try:
            parse = await read(request)
            arguments = (request.headers.get("authorization"), organization_id, parse, entry)
            if service.inline:
                body = self._authorize_and_sign(*arguments)
            else:
                body = await run_in_threadpool(self._authorize_and_sign, *arguments)
        except Problem as problem:
            entry.outcome, entry.status, entry.reason = problem.audit_outcome, problem.status, problem.detail
            try:
                await service.audit.append(entry)
            except SignbridgeError as exc:
                log.error("%s", exc)
                return problem_response(Problem(503, "The audit log is unavailable; try again later."))
            return problem_response(problem)
        try:
            await service.audit.append(entry)
        except SignbridgeError as exc:
            log.error("%s; the signature was withheld", exc)
            return problem_response(Problem(503, "The audit log is unavailable; the signature was not released."))
        return JSONResponse(body)

    async def sign_hash(self, request: Request) -> Response:
        async def read(request: Request) -> Parse:
            body = await read_body(request, self.settings.max_body_bytes)

            def parse():  # noqa: ANN202
                parsed = parse_sign_hash(_json(body))

                def echo(result) -> dict:  # noqa: ANN001
                    return {
                        "signingRequestId": result.request_id,
                        "hashSigningData": {"hash": base64.b64encode(parsed.signature.digest).decode()},
                        "hashSigningResult": {"signature": base64.b64encode(result.signature).decode()},
                    }

                return parsed, echo

            return parse

        return await self._signing_route(request, read)

    async def fast_signing_request(self, request: Request) -> Response:
        async def read(request: Request) -> Parse:
            fields: dict = {}
            problem: Problem | None = None
            if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
                problem = Problem(415, "Send the signing request as multipart/form-data.")
            else:
                body = await read_body(request, self.settings.max_body_bytes)

                async def chunks() -> AsyncIterator[bytes]:
                    yield body

                try:
                    form = await MultiPartParser(request.headers, chunks(), max_files=2, max_fields=32).parse()
                    fields = {key: value for key, value in form.multi_items()}
                    artifact = get(fields, "Artifact")
                    if isinstance(artifact, UploadFile):
                        fields["Artifact"] = await artifact.read()
                except (MultiPartException, ValueError, KeyError) as exc:
                    problem = bad_request(f"The multipart body is malformed: {exc}")

            def parse():  # noqa: ANN202
                if problem is not None:
                    raise problem
                return _parse_fast_signing_fields(fields)

            return parse

        return await self._signing_route(request, read)

    async def my_signing_policies(self, request: Request) -> Response:
        service = self.service
        assert service is not None
        try:
            caller = await run_in_threadpool(
                service.authenticate, request.headers.get("authorization"), request.path_params["organization_id"]
            )
            query = dict(request.query_params)
            policies = await run_in_threadpool(
                service.my_signing_policies, caller, get(query, "projectSlug"), get(query, "signingPolicySlug")
            )
        except Problem as problem:
            return problem_response(problem)
        return JSONResponse({"signingPolicies": policies})

    async def timestamp(self, request: Request) -> Response:
        try:
            if self.tsa is None:
                raise Problem(503, "This service has no timestamp authority; create one with `signbridge admin tsa create`.")
            if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/timestamp-query":
                raise Problem(415, "Send an RFC 3161 request with Content-Type: application/timestamp-query.")
            query = await read_body(request, MAX_TIMESTAMP_QUERY)
        except Problem as problem:
            return problem_response(problem)
        reply = await run_in_threadpool(self.tsa.respond, query)
        return Response(reply, media_type="application/timestamp-reply")

    async def healthz(self, _request: Request) -> Response:
        return PlainTextResponse("Healthy")

    async def openapi(self, _request: Request) -> Response:
        return JSONResponse(openapi_document(__version__))


def _json(body: bytes):  # noqa: ANN202
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("The request body is not valid JSON.") from None


def _parse_fast_signing_fields(fields: dict):  # noqa: ANN202
    fast = get(fields, "IsFastSigningRequest")
    if not isinstance(fast, str) or fast.lower() != "true":
        raise bad_request(
            "Only fast signing requests (IsFastSigningRequest=true) are supported by this service.",
            "IsFastSigningRequest",
        )
    project, policy = get(fields, "ProjectSlug"), get(fields, "SigningPolicySlug")
    for name, value in (("ProjectSlug", project), ("SigningPolicySlug", policy)):
        if not isinstance(value, str) or not value:
            raise bad_request(f"The {name} field is required.", name)
    artifact = get(fields, "Artifact")
    if not isinstance(artifact, bytes):
        raise bad_request("The Artifact file (payload.json) is required.", "Artifact")
    payload = _json(artifact)
    parsed = parse_fast_signing_payload(project, policy, payload)

    def echo(result) -> dict:  # noqa: ANN001
        return {**payload, "Signature": base64.b64encode(result.signature).decode()}

    return parsed, echo


class CaseInsensitivePaths:
    """ASP.NET routes ignore case (clients write Api, API or api); ours are declared in lower case."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = dict(scope)
            scope["path"] = scope["path"].lower()
        await self.app(scope, receive, send)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = {404: "There is no such route.", 405: "That method is not allowed on this route."}.get(
        exc.status_code, str(exc.detail)
    )
    return problem_response(Problem(exc.status_code, detail, headers=dict(exc.headers or {})))


async def _server_error(_request: Request, exc: Exception) -> Response:
    log.exception("unexpected error", exc_info=exc)
    return problem_response(Problem(500, "The service failed unexpectedly; the administrator can find details in its log."))


def create_app(settings: ServerSettings) -> ASGIApp:
    api = Api(settings)
    org = "/api/v1/{organization_id}"
    routes = [
        Route("/api/healthz", api.healthz, methods=["GET"]),
        Route("/api/swagger/v1/swagger.json", api.openapi, methods=["GET"]),
        Route("/api/openapi.json", api.openapi, methods=["GET"]),
        Route(f"{org}/cryptoki/mysigningpolicies", api.my_signing_policies, methods=["GET"]),
        Route(f"{org}/signingrequests", api.fast_signing_request, methods=["POST"]),
        Route(f"{org}/signingrequests/signhash", api.sign_hash, methods=["POST"]),
        Route("/api/timestamp", api.timestamp, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=api.lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    return CaseInsensitivePaths(app)


def create_app_from_env() -> ASGIApp:
    """The factory uvicorn's worker processes call: settings from ``SIGNBRIDGE_DATA_DIR``."""
    data_dir = Path(os.environ["SIGNBRIDGE_DATA_DIR"])
    return create_app(ServerSettings.load(data_dir, database_url=os.environ.get("SIGNBRIDGE_DATABASE_URL")))
