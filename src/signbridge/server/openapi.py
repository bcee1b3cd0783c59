"""The OpenAPI description of the service's routes."""

from __future__ import annotations

from typing import Any

_PROBLEM = {"$ref": "#/components/schemas/Problem"}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(status): {"description": "Problem details", "content": {"application/problem+json": {"schema": _PROBLEM}}}
        for status in statuses
    }


_ORG = {"name": "organizationId", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
_B64 = {"type": "string", "format": "byte"}


def openapi_document(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "signbridge signing service",
            "version": version,
            "description": "The subset of SignPath's REST API that crypto providers use, and an RFC 3161 TSA.",
        },
        "servers": [{"url": "/Api"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Problem": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "errors": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
                        "traceId": {"type": "string"},
                    },
                    "required": ["type", "title", "status"],
                },
                "SigningPolicy": {
                    "type": "object",
                    "properties": {
                        "signingPolicyId": {"type": "string", "format": "uuid"},
                        "signingPolicySlug": {"type": "string"},
                        "projectSlug": {"type": "string"},
                        "certificateType": {"type": "string", "enum": ["X509"]},
                        "certificateBytes": _B64,
                        "keyType": {"type": "string", "enum": ["Rsa", "Ecdsa"]},
                        "keySizeInBits": {"type": "integer"},
                        "publicKeyBytes": {**_B64, "description": "RSA: PKCS#1 RSAPublicKey; ECDSA: SubjectPublicKeyInfo"},
                        "rsaParameters": {
                            "type": "object",
                            "properties": {"publicExponent": _B64, "modulus": _B64},
                        },
                        "certificateChain": {
                            "type": "array",
                            "items": _B64,
                            "description": "signbridge addition: the issuer chain, DER, the leaf's issuer first",
                        },
                    },
                },
                "SignHashRequest": {
                    "type": "object",
                    "required": ["projectSlug", "signingPolicySlug", "hashSigningData"],
                    "properties": {
                        "projectSlug": {"type": "string"},
                        "signingPolicySlug": {"type": "string"},
                        "hashSigningData": {
                            "type": "object",
                            "required": ["hash", "signatureAlgorithm"],
                            "properties": {
                                "hash": _B64,
                                "signatureAlgorithm": {"type": "string", "enum": ["Rsa", "Ecdsa"]},
                                "rsaOptions": {
                                    "type": "object",
                                    "properties": {
                                        "hashAlgorithmName": {"type": "string", "enum": ["Sha1", "Sha256", "Sha384", "Sha512"]},
                                        "hashAlgorithmOid": {"type": "string"},
                                        "paddingMode": {"type": "string", "enum": ["Pkcs1", "Pss"]},
                                    },
                                },
                                "ecdsaOptions": {
                                    "type": "object",
                                    "properties": {"signatureFormat": {"type": "string", "enum": ["Ieee", "Asn1"]}},
                                },
                                "metadata": {"type": "object"},
                            },
                        },
                    },
                },
                "SignHashResponse": {
                    "type": "object",
                    "properties": {
                        "signingRequestId": {"type": "string", "format": "uuid"},
                        "hashSigningData": {"type": "object", "properties": {"hash": _B64}},
                        "hashSigningResult": {"type": "object", "properties": {"signature": _B64}},
                    },
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {
                "get": {"operationId": "Healthz", "security": [], "responses": {"200": {"description": "Healthy"}}}
            },
            "/readyz": {
                "get": {
                    "operationId": "Readyz",
                    "security": [],
                    "responses": {
                        "200": {"description": "The database and the keystore answer"},
                        "503": {"description": "A check failed; the body names it"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "Metrics",
                    "security": [],
                    "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {}}}},
                }
            },
            "/v1/{organizationId}/Cryptoki/MySigningPolicies": {
                "get": {
                    "operationId": "Cryptoki_MySigningPolicies",
                    "parameters": [
                        _ORG,
                        {"name": "projectSlug", "in": "query", "schema": {"type": "string"}},
                        {"name": "signingPolicySlug", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {
                            "description": "The policies the caller may submit to",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "signingPolicies": {
                                                "type": "array",
                                                "items": {"$ref": "#/components/schemas/SigningPolicy"},
                                            }
                                        },
                                    }
                                }
                            },
                        },
                        **_errors(401, 403, 404, 429),
                    },
                }
            },
            "/v1/{organizationId}/SigningRequests/SignHash": {
                "post": {
                    "operationId": "SigningRequests_SignHash",
                    "parameters": [_ORG],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SignHashRequest"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "The signature",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SignHashResponse"}}},
                        },
                        **_errors(400, 401, 403, 404, 413, 429, 503),
                    },
                }
            },
            "/v1/{organizationId}/SigningRequests": {
                "post": {
                    "operationId": "SigningRequests_SubmitFast",
                    "deprecated": True,
                    "description": "Legacy fast signing request (IsFastSigningRequest=true), as jsign 7.1 sends it.",
                    "parameters": [_ORG],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "ProjectSlug": {"type": "string"},
                                        "SigningPolicySlug": {"type": "string"},
                                        "IsFastSigningRequest": {"type": "string", "enum": ["true"]},
                                        "Artifact": {"type": "string", "format": "binary"},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {"description": "The payload echoed with a Signature property"},
                        **_errors(400, 401, 403, 404, 413, 415, 429, 503),
                    },
                }
            },
            "/timestamp": {
                "post": {
                    "operationId": "Timestamp",
                    "security": [],
                    "description": "RFC 3161 time-stamp authority",
                    "requestBody": {"content": {"application/timestamp-query": {"schema": {"type": "string", "format": "binary"}}}},
                    "responses": {
                        "200": {"description": "TimeStampResp", "content": {"application/timestamp-reply": {}}},
                        **_errors(413, 415, 503),
                    },
                }
            },
        },
    }
