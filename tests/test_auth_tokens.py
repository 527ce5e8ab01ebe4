"""Token verification (spec 2.1): every 401 rule for development HS256 tokens and for production
RS256 tokens checked against a JWKS served from a loopback HTTP server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwk, jwt

from pie.app import create_app
from pie.auth import TokenVerifier
from pie.config import Settings
from pie.errors import ServiceUnavailable, Unauthorized

ISSUER = "https://cognito-idp.ap-southeast-2.amazonaws.com/ap-southeast-2_TestPool"
APP_CLIENT = "app-client-1"


# --- helpers --------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def forge(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A JWT built by hand (no library safety checks): HS256 over ``key``, or no signature."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = b64url(hmac.new(key, signing_input.encode(), hashlib.sha256).digest()) if key is not None else ""
    return f"{signing_input}.{signature}"


def dev_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"sub": "u1", "iss": "pie-dev", "iat": now, "exp": now + 600, "scope": "streamline/admin"}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


class RsaKey:
    def __init__(self, kid: str):
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_pem = self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self.public_pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self) -> dict[str, Any]:
        data = jwk.construct(self.public_pem, algorithm="RS256").to_dict()
        return {**data, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def sign(self, claims: dict[str, Any], kid: str | None = None) -> str:
        return jwt.encode(claims, self.private_pem, algorithm="RS256", headers={"kid": kid or self.kid})


def cognito_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "sub": "machine-1",
        "iss": ISSUER,
        "iat": now,
        "exp": now + 600,
        "token_use": "access",
        "scope": "streamline/read_domains",
        "client_id": APP_CLIENT,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


class JwksServer:
    """A loopback HTTP server publishing ``self.keys`` as a JWKS; counts fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.requests = 0
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keys() -> dict[str, RsaKey]:
    return {name: RsaKey(name) for name in ("key-1", "key-2", "attacker")}


@pytest.fixture
def jwks_server(keys) -> Iterator[JwksServer]:
    server = JwksServer()
    server.keys = [keys["key-1"].jwk()]
    yield server
    server.close()


def rs256_settings(jwks_url: str, tmp_path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "_env_file": None,
        "jwt_secret": None,  # production: RS256 only
        "jwks_url": jwks_url,
        "jwt_rs256_issuer": ISSUER,
        "cognito_app_client_ids": [APP_CLIENT],
        "jwks_refetch_cooldown_seconds": 30.0,
        "data_dir": tmp_path,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def verifier(jwks_server, tmp_path) -> tuple[TokenVerifier, FakeClock]:
    v = TokenVerifier(rs256_settings(jwks_server.url, tmp_path))
    clock = FakeClock()
    assert v.jwks is not None
    v.jwks.clock = clock
    return v, clock


async def rejected(v: TokenVerifier, token: str) -> str:
    with pytest.raises(Unauthorized) as info:
        await v.verify(token)
    return info.value.message


# --- development HS256, through the app --------------------------------------------------------


async def assert_401(client, headers: dict[str, str] | None) -> dict[str, Any]:
    r = await client.get("/v2/clients", headers=headers or {})
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    body = r.json()
    assert body["success"] is False and body["message"]
    return body


async def test_missing_token_is_401(client):
    body = await assert_401(client, None)
    assert "missing" in body["message"]


@pytest.mark.parametrize(
    "value",
    [
        "Basic dXNlcjpwYXNz",  # wrong scheme
        "Bearer",  # no token
        "Bearer ",  # empty token
        "Bearer not-a-jwt",
        "Bearer a.b.c",
        "Bearer e30.e30",  # two segments
        "Token abc.def.ghi",
        "bearer",
    ],
)
async def test_malformed_authorization_is_401(client, value):
    await assert_401(client, {"Authorization": value})


async def test_expired_token_is_401(client, make_token):
    body = await assert_401(client, {"Authorization": f"Bearer {make_token(admin=True, ttl=-30)}"})
    assert "expired" in body["message"].lower()


async def test_badly_signed_token_is_401(client, settings):
    token = forge({"alg": "HS256", "typ": "JWT"}, dev_claims(), b"some-other-secret")
    await assert_401(client, {"Authorization": f"Bearer {token}"})
    # and a valid token with one byte of its signature changed
    good = forge({"alg": "HS256", "typ": "JWT"}, dev_claims(), settings.jwt_secret.encode())
    head, payload, sig = good.split(".")
    tampered = f"{head}.{payload}.{('A' if sig[0] != 'A' else 'B')}{sig[1:]}"
    await assert_401(client, {"Authorization": f"Bearer {tampered}"})
    # a valid signature over claims that were then edited (privilege escalation attempt)
    low = forge(
        {"alg": "HS256", "typ": "JWT"}, dev_claims(scope="streamline/read_models"), settings.jwt_secret.encode()
    )
    h, _, s = low.split(".")
    await assert_401(client, {"Authorization": f"Bearer {h}.{b64url(json.dumps(dev_claims()).encode())}.{s}"})


async def test_correctly_forged_token_is_accepted(client, settings):
    """The hand-built tokens above fail for the stated reason, not because forge() is broken."""
    token = forge({"alg": "HS256", "typ": "JWT"}, dev_claims(), settings.jwt_secret.encode())
    r = await client.get("/v2/clients", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text


async def test_wrong_issuer_is_401(client, settings):
    token = forge({"alg": "HS256", "typ": "JWT"}, dev_claims(iss="someone-else"), settings.jwt_secret.encode())
    body = await assert_401(client, {"Authorization": f"Bearer {token}"})
    assert "issuer" in body["message"].lower()
    no_iss = forge({"alg": "HS256", "typ": "JWT"}, dev_claims(iss=None), settings.jwt_secret.encode())
    await assert_401(client, {"Authorization": f"Bearer {no_iss}"})


async def test_missing_exp_is_401(client, settings):
    token = forge({"alg": "HS256", "typ": "JWT"}, dev_claims(exp=None), settings.jwt_secret.encode())
    await assert_401(client, {"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
async def test_alg_none_is_401(client, alg):
    token = forge({"alg": alg, "typ": "JWT"}, dev_claims(), None)
    await assert_401(client, {"Authorization": f"Bearer {token}"})


async def test_other_algorithms_are_401(client, settings, keys):
    secret = settings.jwt_secret.encode()
    for alg in ("HS384", "HS512"):
        token = jwt.encode(dev_claims(), secret, algorithm=alg)
        await assert_401(client, {"Authorization": f"Bearer {token}"})
    # RS256 when no JWKS is configured (the dev app)
    token = keys["key-1"].sign(dev_claims())
    await assert_401(client, {"Authorization": f"Bearer {token}"})


async def test_garbage_claims_are_401(client, settings):
    secret = settings.jwt_secret.encode()
    for claims in (dev_claims(exp="tomorrow"), [1, 2, 3], "just a string"):
        header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = b64url(json.dumps(claims).encode())
        sig = b64url(hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest())
        await assert_401(client, {"Authorization": f"Bearer {header}.{payload}.{sig}"})


async def test_valid_token_without_permission_is_403_not_401(client, auth):
    r = await client.post("/v2/clients", json={"client_id": "c1", "name": "C"}, headers=auth(scopes=["read_domains"]))
    assert r.status_code == 403
    assert r.json() == {"success": False, "message": "missing permission admin"}
    assert "www-authenticate" not in r.headers
    # authentication comes first: an invalid token on the same route is 401, not 403
    r = await client.post("/v2/clients", json={"client_id": "c1", "name": "C"}, headers={"Authorization": "Bearer x"})
    assert r.status_code == 401
    # no token and a bad body: authentication is checked first
    r = await client.post("/v2/clients", json={"bad": 1})
    assert r.status_code == 401


async def test_health_is_public(client):
    r = await client.get("/v2/health")
    assert r.status_code == 200


# --- production RS256 against a loopback JWKS -----------------------------------------------------


async def test_rs256_token_is_accepted(verifier, keys, jwks_server):
    v, _ = verifier
    principal = await v.verify(keys["key-1"].sign(cognito_claims()))
    assert principal.has("read_domains") and not principal.has("manage_domains")
    assert principal.app_client_id == APP_CLIENT
    assert jwks_server.requests == 1
    # cached: a second token does not refetch
    await v.verify(keys["key-1"].sign(cognito_claims(sub="another")))
    assert jwks_server.requests == 1


async def test_rs256_rejections(verifier, keys):
    v, _ = verifier
    good = keys["key-1"]
    assert "expired" in (await rejected(v, good.sign(cognito_claims(exp=int(time.time()) - 10)))).lower()
    assert "issuer" in (await rejected(v, good.sign(cognito_claims(iss="https://evil.example.com/pool")))).lower()
    await rejected(v, good.sign(cognito_claims(iss=None)))
    await rejected(v, good.sign(cognito_claims(exp=None)))
    assert await rejected(v, good.sign(cognito_claims(token_use="id"))) == "not an access token"
    assert await rejected(v, good.sign(cognito_claims(token_use=None))) == "not an access token"
    assert await rejected(v, good.sign(cognito_claims(client_id="unknown-app"))) == "app client not allowed"
    assert await rejected(v, good.sign(cognito_claims(client_id=None))) == "app client not allowed"
    # signed by another key that claims key-1's kid
    await rejected(v, keys["attacker"].sign(cognito_claims(), kid="key-1"))
    # no kid at all
    await rejected(v, jwt.encode(cognito_claims(), good.private_pem, algorithm="RS256"))


async def test_rs256_alg_none_and_hs256_with_public_key_are_401(verifier, keys):
    v, _ = verifier
    claims = cognito_claims()
    assert "not accepted" in await rejected(v, forge({"alg": "none", "kid": "key-1"}, claims, None))
    # the classic algorithm-confusion attack: HMAC keyed with the (public) RSA key
    public_pem = keys["key-1"].public_pem
    for key in (public_pem, public_pem.strip(), json.dumps(keys["key-1"].jwk()).encode()):
        token = forge({"alg": "HS256", "typ": "JWT", "kid": "key-1"}, claims, key)
        assert "not accepted" in await rejected(v, token)


async def test_rs256_app_client_allow_list_is_optional(jwks_server, keys, tmp_path):
    v = TokenVerifier(rs256_settings(jwks_server.url, tmp_path, cognito_app_client_ids=[]))
    principal = await v.verify(keys["key-1"].sign(cognito_claims(client_id="any-app")))
    assert principal.app_client_id == "any-app"


async def test_rs256_key_rotation(verifier, keys, jwks_server):
    v, clock = verifier
    await v.verify(keys["key-1"].sign(cognito_claims()))
    # Cognito rotates: key-2 published, key-1 retired
    jwks_server.keys = [keys["key-2"].jwk()]
    clock.now += 31  # past the refetch cooldown since the last fetch
    principal = await v.verify(keys["key-2"].sign(cognito_claims(sub="after-rotation")))
    assert principal.subject == "after-rotation"
    assert jwks_server.requests == 2
    # the retired key is gone from the refreshed cache
    assert await rejected(v, keys["key-1"].sign(cognito_claims())) == "unknown signing key"


async def test_rs256_unknown_kid_refetch_cooldown(verifier, keys, jwks_server):
    v, clock = verifier
    await v.verify(keys["key-1"].sign(cognito_claims()))
    assert jwks_server.requests == 1
    # a stream of garbage kids inside the cooldown: no refetch at all
    for i in range(20):
        assert await rejected(v, keys["key-1"].sign(cognito_claims(), kid=f"garbage-{i}")) == "unknown signing key"
    assert jwks_server.requests == 1
    # after the cooldown one garbage kid triggers exactly one refetch, the rest of the stream none
    clock.now += 30
    for i in range(20):
        await rejected(v, keys["key-1"].sign(cognito_claims(), kid=f"more-garbage-{i}"))
    assert jwks_server.requests == 2
    # a key published meanwhile is picked up after the next cooldown
    jwks_server.keys = [keys["key-1"].jwk(), keys["key-2"].jwk()]
    assert await rejected(v, keys["key-2"].sign(cognito_claims())) == "unknown signing key"
    clock.now += 30
    await v.verify(keys["key-2"].sign(cognito_claims()))
    assert jwks_server.requests == 3
    # known kids never refetch
    for _ in range(5):
        await v.verify(keys["key-1"].sign(cognito_claims()))
    assert jwks_server.requests == 3


async def test_rs256_jwks_unreachable_is_503_not_401(jwks_server, keys, tmp_path):
    jwks_server.status = 500
    v = TokenVerifier(rs256_settings(jwks_server.url, tmp_path))
    with pytest.raises(ServiceUnavailable):
        await v.verify(keys["key-1"].sign(cognito_claims()))
    # a garbage token is still a 401 without touching the network
    before = jwks_server.requests
    await rejected(v, "garbage")
    assert jwks_server.requests == before


async def test_rs256_through_the_app(engine, jwks_server, keys, tmp_path, admin, client):
    """create_app with the production settings: RS256 works end to end; dev tokens do not."""
    await client.post("/v2/clients", json={"client_id": "sealink", "name": "SeaLink"}, headers=admin)
    app = create_app(rs256_settings(jwks_server.url, tmp_path, jwks_refetch_cooldown_seconds=0))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as prod:
        token = keys["key-1"].sign(cognito_claims(client_id=APP_CLIENT, scope="streamline/admin"))
        r = await prod.get("/v2/clients", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        assert [c["client_id"] for c in r.json()] == ["sealink"]
        # a development HS256 token (even a well-formed admin one) is refused in production
        r = await prod.get("/v2/clients", headers=admin)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        # HS256 keyed with the public key
        forged = forge(
            {"alg": "HS256", "kid": "key-1"}, cognito_claims(scope="streamline/admin"), keys["key-1"].public_pem
        )
        r = await prod.get("/v2/clients", headers={"Authorization": f"Bearer {forged}"})
        assert r.status_code == 401
        # JWKS down and an unknown kid: 503 envelope, not a 500
        jwks_server.status = 503
        unknown = keys["key-2"].sign(cognito_claims(scope="streamline/admin"))
        r = await prod.get("/v2/clients", headers={"Authorization": f"Bearer {unknown}"})
        assert r.status_code == 503 and r.json()["success"] is False


def test_jwks_without_issuer_is_a_configuration_error(tmp_path):
    with pytest.raises(RuntimeError, match="issuer"):
        TokenVerifier(Settings(_env_file=None, jwt_secret=None, jwks_url="http://127.0.0.1:9/jwks", data_dir=tmp_path))


def test_cognito_settings_derive_issuer_and_jwks_url(tmp_path):
    s = Settings(
        _env_file=None, cognito_region="ap-southeast-2", cognito_user_pool_id="ap-southeast-2_Abc", data_dir=tmp_path
    )
    assert s.cognito_issuer == "https://cognito-idp.ap-southeast-2.amazonaws.com/ap-southeast-2_Abc"
    assert s.cognito_jwks_url == s.cognito_issuer + "/.well-known/jwks.json"


# ---- time claims (issue 8, item 8): numbers only, iat not in the future, a documented leeway ----


# claims as functions of the current time (parameters are built at collection, minutes earlier)
BAD_TIME_CLAIMS = {
    "exp string": lambda now: {"exp": str(now + 3600)},  # a numeric string: python-jose int()s it
    "nbf string": lambda now: {"exp": now + 3600, "nbf": str(now - 10)},
    "iat string": lambda now: {"exp": now + 3600, "iat": str(now)},
    "exp bool": lambda now: {"exp": True},
    "iat list": lambda now: {"exp": now + 3600, "iat": [now]},
    "iat future": lambda now: {"exp": now + 3600, "iat": now + 3600},  # issued an hour from now
    "nbf future": lambda now: {"exp": now + 3600, "nbf": now + 3600},  # not valid for an hour
    "nbf 90s": lambda now: {"exp": now + 3600, "nbf": now + 90},  # beyond the leeway
}


@pytest.mark.parametrize("claims_at", BAD_TIME_CLAIMS.values(), ids=BAD_TIME_CLAIMS.keys())
async def test_bad_time_claims_are_401(client, settings, claims_at):
    overrides = claims_at(int(time.time()))
    token = forge({"alg": "HS256", "typ": "JWT"}, dev_claims(**overrides), settings.jwt_secret.encode())
    await assert_401(client, {"Authorization": f"Bearer {token}"})


async def test_time_claims_within_the_leeway_are_accepted(client, settings):
    """PIE_JWT_LEEWAY_SECONDS (60) absorbs the issuer's clock running ahead: iat/nbf 30 s ahead
    (exp stays strict: test_expired_token_is_401); fractional NumericDates are numbers too."""
    now = int(time.time())
    for overrides in ({"iat": now + 30, "nbf": now + 30}, {"iat": now + 0.5, "exp": now + 60.5}):
        token = forge({"alg": "HS256", "typ": "JWT"}, dev_claims(**overrides), settings.jwt_secret.encode())
        r = await client.get("/v2/clients", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, (overrides, r.text)
