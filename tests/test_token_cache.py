"""The verified-token cache (PIE_TOKEN_CACHE_SIZE): never accepts a token after its exp, never
shares an entry between different tokens, and caches nothing that failed."""

from __future__ import annotations

import time

import pytest

from pie.auth import CachedTokenVerifier, TokenVerifier, make_verifier, mint_dev_token
from pie.config import Settings
from pie.errors import Unauthorized


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Counting(TokenVerifier):
    """The real verifier, counting how often it really verifies."""

    calls = 0

    async def verify(self, token: str):
        self.calls += 1
        return await super().verify(token)


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(_env_file=None, jwt_secret="cache-test-secret", jwt_issuer="pie-dev", data_dir=tmp_path)


def cached(settings: Settings, clock: Clock, *, maxsize: int = 16, max_age: float = 3600) -> CachedTokenVerifier:
    return CachedTokenVerifier(Counting(settings), maxsize=maxsize, max_age=max_age, clock=clock)


async def test_a_cached_token_is_refused_once_its_exp_has_passed(settings):
    clock = Clock()
    v = cached(settings, clock)
    token = mint_dev_token(settings, scopes=["read_models"], ttl=60)
    exp = (await v.verify(token)).claims["exp"]
    await v.verify(token)
    assert v.verifier.calls == 1  # the second answer came from the cache

    clock.now = exp  # the instant of exp: no longer valid
    with pytest.raises(Unauthorized):
        await v.verify(token)
    clock.now = exp + 3600
    with pytest.raises(Unauthorized):
        await v.verify(token)


async def test_an_expired_token_is_refused_on_the_real_clock(settings):
    v = make_verifier(settings)
    assert isinstance(v, CachedTokenVerifier)
    token = mint_dev_token(settings, scopes=["read_models"], ttl=1)
    exp = (await v.verify(token)).claims["exp"]
    while time.time() < exp:
        time.sleep(0.05)
    with pytest.raises(Unauthorized):  # at exp, although the cached entry was stored before
        await v.verify(token)


async def test_entries_are_never_shared_between_tokens(settings):
    v = cached(settings, Clock())
    reader = mint_dev_token(settings, scopes=["read_models"], client_id="tenant-a", subject="a")
    admin = mint_dev_token(settings, admin=True, subject="b")
    # the same claims signed again later differ only in iat/exp: still a token of its own
    a1 = await v.verify(reader)
    b1 = await v.verify(admin)
    assert (a1.subject, a1.is_admin, a1.tenants) == ("a", False, frozenset({"tenant-a"}))
    assert (b1.subject, b1.is_admin) == ("b", True)
    assert (await v.verify(reader)).subject == "a" and not (await v.verify(reader)).is_admin
    assert (await v.verify(admin)).is_admin
    # a tampered copy of a cached token (same payload, other signature) is verified, and refused
    head, payload, sig = reader.split(".")
    forged = f"{head}.{payload}.{sig[:-2]}{'AA' if sig[-2:] != 'AA' else 'BB'}"
    with pytest.raises(Unauthorized):
        await v.verify(forged)
    with pytest.raises(Unauthorized):  # and the failure was not cached as anything else
        await v.verify(forged)


async def test_failures_are_not_cached_and_the_cache_is_bounded(settings):
    clock = Clock()
    v = cached(settings, clock, maxsize=2)
    with pytest.raises(Unauthorized):
        await v.verify("not-a-token")
    with pytest.raises(Unauthorized):
        await v.verify("not-a-token")
    assert v.verifier.calls == 2
    tokens = [mint_dev_token(settings, scopes=["read_models"], subject=f"s{i}") for i in range(3)]
    for t in tokens:
        await v.verify(t)
    assert v.verifier.calls == 5
    await v.verify(tokens[0])  # evicted (least recently used): verified again
    assert v.verifier.calls == 6


async def test_an_entry_lives_at_most_max_age(settings):
    clock = Clock()
    v = cached(settings, clock, max_age=10)
    token = mint_dev_token(settings, scopes=["read_models"], ttl=3600)
    await v.verify(token)
    clock.now += 9
    await v.verify(token)
    assert v.verifier.calls == 1
    clock.now += 2  # past max_age, still before exp: verified again (and accepted)
    await v.verify(token)
    assert v.verifier.calls == 2


def test_the_cache_can_be_turned_off(settings):
    assert isinstance(make_verifier(settings.model_copy(update={"token_cache_size": 0})), TokenVerifier)
