"""NATS in operator mode for the tests: an operator, a system account and an account with
JetStream, their JWTs signed as `nsc` signs them, users' credentials files in the form `nsc`
writes, and the nats-server configuration (a memory resolver) that trusts them."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import nkeys  # type: ignore[import-untyped]
import orjson

UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
             "wildcards": True, "conn": -1, "leaf": -1}  # fmt: skip
HEADER = orjson.dumps({"typ": "JWT", "alg": "ed25519-nkey"})
JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def key_pair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def public(key: nkeys.KeyPair) -> str:
    return str(key.public_key.decode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats: dict[str, object],
        expires: float | None = None) -> str:  # fmt: skip
    """A JWT of the NATS kind (v2 claims, `ed25519-nkey`) about `subject`, signed by `issuer`."""
    claims: dict[str, object] = {"iat": int(time.time()), "iss": public(issuer), "name": name,
                                 "sub": subject, "nats": {**nats, "version": 2}}  # fmt: skip
    if expires is not None:
        claims["exp"] = int(expires)
    claims["jti"] = base64.b32encode(hashlib.sha256(orjson.dumps(claims)).digest()).decode()
    signed = f"{_b64(HEADER)}.{_b64(orjson.dumps(claims))}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


def creds_text(user_jwt: str, seed: str, newline: str = "\n") -> str:
    """A credentials file as `nsc generate creds` writes it."""
    lines = ["-----BEGIN NATS USER JWT-----", user_jwt, "------END NATS USER JWT------", "",
             "************************* IMPORTANT *************************",
             "NKEY Seed printed below can be used to sign and prove identity.",
             "NKEYs are sensitive and should be treated as secrets.", "",
             "-----BEGIN USER NKEY SEED-----", seed, "------END USER NKEY SEED------", "",
             "*************************************************************", ""]  # fmt: skip
    return newline.join(lines)


@dataclass
class Operator:
    operator: nkeys.KeyPair = field(default_factory=lambda: key_pair(nkeys.PREFIX_BYTE_OPERATOR))
    system: nkeys.KeyPair = field(default_factory=lambda: key_pair(nkeys.PREFIX_BYTE_ACCOUNT))
    account: nkeys.KeyPair = field(default_factory=lambda: key_pair(nkeys.PREFIX_BYTE_ACCOUNT))

    def user(self, where: Path, name: str, *, expires: float | None = None,
             newline: str = "\n") -> tuple[Path, str]:  # fmt: skip
        """A new user of the account: its credentials file, and its seed (to look for)."""
        user = key_pair(nkeys.PREFIX_BYTE_USER)
        claims = {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
        user_jwt = jwt(self.account, public(user), name, claims, expires)
        seed = str(user.seed.decode())
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_bytes(creds_text(user_jwt, seed, newline).encode())
        return where, seed

    def server_config(self, revoked: tuple[str, ...] = ()) -> str:
        """nats-server's configuration: this operator, its accounts preloaded; the users whose
        seeds are in `revoked` no longer let in."""
        revocations = {public(nkeys.from_seed(bytearray(s.encode()))): int(time.time()) + 1
                       for s in revoked}  # fmt: skip
        system = jwt(self.operator, public(self.system), "SYS",
                     {"type": "account", "limits": UNLIMITED})  # fmt: skip
        account = jwt(self.operator, public(self.account), "APP",
                      {"type": "account", "limits": {**UNLIMITED, **JETSTREAM},
                       **({"revocations": revocations} if revocations else {})})  # fmt: skip
        operator = jwt(self.operator, public(self.operator), "smsbus-test", {"type": "operator"})
        return (
            f"operator: {operator}\nsystem_account: {public(self.system)}\nresolver: MEMORY\n"
            f"resolver_preload: {{\n  {public(self.system)}: {system}\n"
            f"  {public(self.account)}: {account}\n}}\n"
        )
