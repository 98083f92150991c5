"""``edgegw token``: mint a sign-in token from the hub config's HS256 secret.

For sites without an identity provider: an administrator mints a token per person (or per
kiosk) and hands it over; the person pastes it into the dashboard's sign-in page, or a
script sends it as ``Authorization: Bearer``.  The token is printed on stdout, nothing else.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .auth.config import ROLES
from .auth.tokens import TokenVerifier, mint, parse_ttl
from .config import ConfigError, load

DEFAULT_CONFIG = "/etc/edgegw/hub.toml"


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "token", help="mint an HS256 sign-in token from the hub config",
        description="Mint a sign-in token (JWT, HS256) with the hub config's shared secret, for "
                    "sites without an identity provider.  The token is printed on stdout; "
                    "paste it on the dashboard's sign-in page or send it as "
                    "'Authorization: Bearer <token>'.",
        epilog="examples:\n"
               "  edgegw token --config /etc/edgegw/hub.toml --user alice --role operator "
               "--ttl 8h\n"
               "  edgegw token --config conf/hub.toml --user wall --role viewer --lots 'LOT7*'")
    p.add_argument("--config", metavar="FILE", default=DEFAULT_CONFIG,
                   help="hub TOML whose [auth] holds hs256_secret or hs256_secret_file "
                        f"(default: {DEFAULT_CONFIG}, where install.sh puts it)")
    p.add_argument("--user", required=True, help="the user's name (the token's sub)")
    p.add_argument("--role", required=True, choices=ROLES,
                   help="viewer (read), operator (also acknowledge alerts) or admin (also "
                        "stats, metrics)")
    p.add_argument("--ttl", default="8h", help="lifetime: 90s, 30m, 8h, 7d (default 8h)")
    p.add_argument("--lots", action="append", metavar="GLOB",
                   help="restrict to lots matching this pattern (repeatable); default: all")
    p.set_defaults(func=cmd_token)


def cmd_token(args: argparse.Namespace) -> int:
    from .hub.config import HubConfig

    cfg = load(HubConfig, args.config)
    auth = cfg.auth
    if auth is None or not (auth.hs256_secret or auth.hs256_secret_file):
        raise ConfigError([f"{args.config}: auth: needs hs256_secret or hs256_secret_file "
                           "to mint tokens"])
    try:
        ttl = parse_ttl(args.ttl)
        secret = TokenVerifier.from_config(auth).secret
        token = mint(secret, args.user, args.role, ttl, lots=args.lots, issuer=auth.issuer,
                     audience=auth.audience, role_claim=auth.role_claim)
    except ValueError as exc:
        raise ConfigError([f"{args.config}: {exc}"]) from None
    sys.stdout.write(token + "\n")
    return 0
