"""The console's session cookies and CSRF tokens: signed, bounded in time, tied."""

from __future__ import annotations

from reconciler.console.auth import SESSION_MAX_AGE_S, Keys


def test_a_session_is_valid_only_unaltered_under_its_token_and_while_fresh() -> None:
    """A tampered cookie, another token's cookie and an old cookie are all refused."""
    keys = Keys("token-a")
    cookie = keys.new_session(now=1000.0)
    assert keys.session_nonce(cookie, now=1001.0) is not None
    nonce, issued, mac = cookie.split(".")
    assert keys.session_nonce(f"{nonce}x.{issued}.{mac}", now=1001.0) is None
    assert keys.session_nonce(f"{nonce}.{int(issued) + 1}.{mac}", now=1001.0) is None
    assert Keys("token-b").session_nonce(cookie, now=1001.0) is None
    assert keys.session_nonce(cookie, now=1000.0 + SESSION_MAX_AGE_S + 1) is None
    assert keys.session_nonce("", now=1001.0) is None
    assert keys.session_nonce("a.b.c", now=1001.0) is None


def test_the_csrf_token_belongs_to_one_session() -> None:
    """The token of one nonce does not pass for another, nor without a session."""
    keys = Keys(None)
    one = keys.session_nonce(keys.new_session())
    two = keys.session_nonce(keys.new_session())
    assert one is not None and two is not None
    assert keys.csrf_ok(one, keys.csrf_token(one))
    assert not keys.csrf_ok(two, keys.csrf_token(one))
    assert not keys.csrf_ok(None, keys.csrf_token(one))
    assert not keys.csrf_ok(one, "")


def test_the_login_compares_against_the_token_and_an_open_console_has_none() -> None:
    """Only the exact token logs in; with no token configured nothing does."""
    assert Keys("t0ken").right_token("t0ken")
    assert not Keys("t0ken").right_token("t0ke")
    assert not Keys(None).right_token("")
