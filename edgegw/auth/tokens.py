"""JWT verification and minting, and what a verified token grants (a ``Principal``).

PyJWT does the cryptography and the standard claims (``exp``, ``nbf``, ``iss``, ``aud``,
with leeway); this module only chooses the key, maps claims to one of three roles and
reads the optional ``lots`` scope.  No I/O after construction: key files are read once by
``TokenVerifier.from_config`` (at start-up), so verifying never touches the disk.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from .config import ROLES, AuthConfig

RANK = {role: i for i, role in enumerate(ROLES)}
HS256_MIN_SECRET = 32


class AuthError(Exception):
    """A credential was missing or not accepted; ``str()`` says why (no token in it)."""


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a request acts for, and what they may do."""

    user: str
    role: str
    lots: tuple[str, ...] | None = None  # glob patterns; None: every lot
    expires_at: float | None = None  # wall-clock seconds (the token's exp)
    via: str = "bearer"  # bearer, cookie, proxy, metrics_token, none

    def has(self, role: str) -> bool:
        return RANK[self.role] >= RANK[role]

    def sees_lot(self, lot_id: str) -> bool:
        return self.lots is None or any(fnmatch.fnmatchcase(lot_id, p) for p in self.lots)


#: the principal of a hub with ``auth.mode = "none"``: everything, nobody in particular
ANONYMOUS_ADMIN = Principal("", "admin", via="none")


class TokenVerifier:
    """Checks a JWT against the configured keys and maps its claims to a Principal."""

    def __init__(self, config: AuthConfig, *, secret: str = "", public_keys: Sequence[Any] = (),
                 jwks: jwt.PyJWKSet | None = None) -> None:
        self.config = config
        self.secret = secret
        self.public_keys = list(public_keys)
        self.jwks = jwks
        algorithms = []
        if secret:
            algorithms.append("HS256")
        if self.public_keys or jwks is not None:
            algorithms += ["RS256", "ES256"]
        self.algorithms = algorithms

    @classmethod
    def from_config(cls, config: AuthConfig) -> TokenVerifier:
        """Read the key files named in ``config``; ValueError naming the key on failure."""
        secret = config.hs256_secret
        if config.hs256_secret_file:
            secret = _read("hs256_secret_file", config.hs256_secret_file).strip()
            if len(secret) < HS256_MIN_SECRET:
                raise ValueError(f"auth.hs256_secret_file: the secret must be at least "
                                 f"{HS256_MIN_SECRET} characters")
        keys = []
        if config.public_key_file:
            pem = _read("public_key_file", config.public_key_file).encode()
            try:
                keys.append(_load_public_key(pem))
            except ValueError as exc:
                raise ValueError(f"auth.public_key_file: not a PEM public key: {exc}") from None
        jwks = None
        if config.jwks_file:
            try:
                jwks = jwt.PyJWKSet.from_json(_read("jwks_file", config.jwks_file))
            except (jwt.PyJWKSetError, ValueError) as exc:
                raise ValueError(f"auth.jwks_file: not a usable JWKS: {exc}") from None
        return cls(config, secret=secret, public_keys=keys, jwks=jwks)

    def verify(self, token: str) -> Principal:
        cfg = self.config
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"malformed token: {exc}") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise AuthError(f"token algorithm {alg!r} is not accepted here")
        options: Any = {"require": ["exp"], "verify_aud": bool(cfg.audience),
                   "verify_iss": bool(cfg.issuer)}
        last: Exception | None = None
        for key in self._keys_for(alg, header.get("kid")):
            try:
                claims = jwt.decode(token, key, algorithms=[alg], options=options,
                                    leeway=cfg.leeway_s, audience=cfg.audience or None,
                                    issuer=cfg.issuer or None)
                break
            except jwt.InvalidSignatureError as exc:
                last = exc  # maybe another key of the set
            except jwt.ExpiredSignatureError:
                raise AuthError("token expired") from None
            except jwt.InvalidTokenError as exc:
                raise AuthError(f"token not accepted: {exc}") from None
        else:
            raise AuthError(f"token not accepted: {last or 'no key for it'}")
        return self.principal(claims)

    def _keys_for(self, alg: str, kid: str | None) -> list[Any]:
        if alg == "HS256":
            return [self.secret]
        keys = [k for k in self.public_keys if _key_fits(k, alg)]
        if self.jwks is not None:
            for jwk in self.jwks.keys:
                if (kid is None or jwk.key_id == kid) and jwk.algorithm_name in (alg, None):
                    keys.append(jwk.key)
        return keys

    def principal(self, claims: dict[str, Any]) -> Principal:
        cfg = self.config
        user = claims.get(cfg.user_claim)
        if not isinstance(user, str) or not user.strip():
            raise AuthError(f"token has no {cfg.user_claim!r} claim naming the user")
        found = claims.get(cfg.role_claim)
        names = [found] if isinstance(found, str) else found if isinstance(found, list) else []
        roles = [cfg.role_map.get(n, n) for n in names if isinstance(n, str)]
        roles = [r for r in roles if r in RANK]
        if not roles:
            raise AuthError(f"token's {cfg.role_claim!r} claim names no role "
                            f"({', '.join(ROLES)})")
        lots = claims.get("lots")
        if lots is not None:
            if isinstance(lots, str):
                lots = [lots]
            if not isinstance(lots, list) or not all(isinstance(p, str) for p in lots):
                raise AuthError("token's 'lots' claim must be a list of lot patterns")
            lots = tuple(lots)
        exp = claims.get("exp")
        return Principal(user.strip()[:100], max(roles, key=RANK.__getitem__), lots,
                         float(exp) if isinstance(exp, (int, float)) else None)


def mint(secret: str, user: str, role: str, ttl_s: float, *, lots: list[str] | None = None,
         issuer: str = "", audience: str = "", role_claim: str = "role",
         now: float | None = None) -> str:
    """An HS256 token for ``user`` with ``role``, valid ``ttl_s`` seconds."""
    if role not in RANK:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if len(secret) < HS256_MIN_SECRET:
        raise ValueError(f"the HS256 secret must be at least {HS256_MIN_SECRET} characters")
    now = time.time() if now is None else now
    claims: dict[str, Any] = {"sub": user, role_claim: role, "iat": int(now),
                              "exp": int(now + ttl_s)}
    if lots is not None:
        claims["lots"] = list(lots)
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")


def parse_ttl(text: str) -> float:
    """``90s``, ``30m``, ``8h``, ``7d`` or plain seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
    text = text.strip().lower()
    scale = units.get(text[-1:], None)
    try:
        value = float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        raise ValueError(f"not a duration (e.g. 30m, 8h, 7d): {text!r}") from None
    if not 0 < value <= 366 * 86_400:
        raise ValueError(f"a token's lifetime must be > 0 and at most a year: {text!r}")
    return value


def _read(key: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"auth.{key}: cannot read {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"auth.{key}: {path!r} is not UTF-8 text") from None


def _load_public_key(pem: bytes) -> Any:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        return load_pem_public_key(pem)
    except UnsupportedAlgorithm as exc:  # a key type this cryptography cannot load
        raise ValueError(str(exc)) from None


def _key_fits(key: Any, alg: str) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    return isinstance(key, rsa.RSAPublicKey if alg == "RS256" else ec.EllipticCurvePublicKey)


def jwk_json(public_key: Any, kid: str) -> dict[str, Any]:
    """A public key as one JWKS entry (for tests and for sites that build a JWKS file)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    if isinstance(public_key, rsa.RSAPublicKey):
        jwk = json.loads(RSAAlgorithm.to_jwk(public_key))
        jwk["alg"] = "RS256"
    else:
        jwk = json.loads(ECAlgorithm.to_jwk(public_key))
        jwk["alg"] = "ES256"
    jwk["kid"] = kid
    jwk["use"] = "sig"
    return jwk
