"""Identities at the edge: client certificates (mTLS) and bearer tokens (JWT) -> one Principal.

- mTLS: the TLS layer checks the certificate against --client-ca; the identity is the certificate subject in
  RFC 4514 form (e.g. "CN=radiology-viewer,O=Example Hospital"); its scopes come from the gateway config's
  `identities` table (serving.gateway.config).
- JWT: `Authorization: Bearer <token>` (REST header or gRPC metadata), verified against --jwt-key (a PEM public key
  or a JWKS file). Asymmetric algorithms only (a public key must never verify an HMAC token). `exp` and `sub` are
  required; identity = `sub`; scopes from `scope` (space-separated) or `scopes` (list).
- A token, when present, decides: a bad token is refused even if a certificate was also presented.
- --allow-anonymous (loopback only, checked at start-up): no credential -> "anonymous" with the configured scopes.
"""

from __future__ import annotations

import json
from pathlib import Path

from serving.gateway.core import GatewayError, Principal

ASYMMETRIC = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


def subject_of(der_or_pem: bytes, pem: bool = False) -> str:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(der_or_pem) if pem else x509.load_der_x509_certificate(der_or_pem)
    return cert.subject.rfc4514_string()


def grpc_subject(context) -> str | None:
    """The verified client certificate's subject on a gRPC call (None without mTLS)."""
    certs = context.auth_context().get("x509_pem_cert")
    return subject_of(certs[0], pem=True) if certs else None


class JwtVerifier:
    def __init__(self, key_file: str, audience: str | None = None, issuer: str | None = None):
        import jwt

        text = Path(key_file).read_text(encoding="utf-8")
        self.audience, self.issuer = audience, issuer
        self.jwks = None
        self.key = None
        if text.lstrip().startswith("{"):
            self.jwks = jwt.PyJWKSet.from_dict(json.loads(text))
        else:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            try:
                self.key = load_pem_public_key(text.encode())
            except ValueError as exc:
                raise ValueError(f"--jwt-key {key_file} is neither a PEM public key nor a JWKS file") from exc

    def decode(self, token: str) -> dict:
        import jwt

        key = self.key
        if self.jwks is not None:
            kid = jwt.get_unverified_header(token).get("kid")
            matches = [k for k in self.jwks.keys if k.key_id == kid] or (self.jwks.keys if kid is None else [])
            if not matches:
                raise jwt.InvalidKeyError("no key in the JWKS has the token's kid")
            key = matches[0].key
        return jwt.decode(token, key, algorithms=ASYMMETRIC, audience=self.audience, issuer=self.issuer,
                          options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
                          leeway=30)


def token_scopes(claims: dict) -> frozenset:
    scopes = claims.get("scopes")
    if isinstance(scopes, list):
        return frozenset(str(s) for s in scopes)
    scope = claims.get("scope")
    return frozenset(scope.split()) if isinstance(scope, str) else frozenset()


class Authenticator:
    def __init__(self, config, jwt_key: str | None = None, jwt_audience: str | None = None,
                 jwt_issuer: str | None = None, allow_anonymous: bool = False):
        self.config = config
        self.jwt = JwtVerifier(jwt_key, jwt_audience, jwt_issuer) if jwt_key else None
        self.allow_anonymous = allow_anonymous

    def principal(self, authorization: str | None, subject: str | None) -> Principal:
        if authorization:
            return self._bearer(authorization)
        if subject:
            return Principal(subject, frozenset(self.config.identities.get(subject, ())), "mtls")
        if self.allow_anonymous:
            return Principal("anonymous", frozenset(self.config.anonymous_scopes), "anonymous")
        raise GatewayError("UNAUTHENTICATED", "no credentials: present a client certificate signed by the "
                           "gateway's client CA, or an `Authorization: Bearer <JWT>` header")

    def _bearer(self, authorization: str) -> Principal:
        import jwt

        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise GatewayError("UNAUTHENTICATED", "the Authorization header must be `Bearer <JWT>`")
        if self.jwt is None:
            raise GatewayError("UNAUTHENTICATED", "this gateway accepts no bearer tokens (started without "
                               "--jwt-key); use a client certificate")
        try:
            claims = self.jwt.decode(token.strip())
        except jwt.ExpiredSignatureError:
            raise GatewayError("UNAUTHENTICATED", "the bearer token has expired; get a new one") from None
        except jwt.InvalidSignatureError:
            raise GatewayError("UNAUTHENTICATED", "the bearer token's signature does not verify against the "
                               "gateway's --jwt-key") from None
        except jwt.PyJWTError as exc:
            raise GatewayError("UNAUTHENTICATED", f"the bearer token is not valid ({type(exc).__name__})") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise GatewayError("UNAUTHENTICATED", "the bearer token has no `sub` claim")
        return Principal(subject[:256], token_scopes(claims), "jwt")
