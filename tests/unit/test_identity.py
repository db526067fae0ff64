"""The caller a cached copy is kept for: a trusted header, or a bearer token's subject bound to
the whole token; no identity, or an ambiguous or expired one, names nobody."""

from __future__ import annotations

import base64
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from resilgate.identity import Caller, caller_of, jwt_claims

NOW = 1_750_000_000.0


def segment(value: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode()


def jwt(claims: dict[str, Any], signature: str = "c2lnbmF0dXJl") -> str:
    return f"{segment({'alg': 'RS256', 'typ': 'JWT'})}.{segment(claims)}.{signature}"


def bearer(token: str) -> CIMultiDict[str]:
    return CIMultiDict({"Authorization": f"Bearer {token}"})


def token_caller(token: str) -> Caller | None:
    return caller_of(bearer(token), None, NOW)


def test_a_bearer_token_names_its_subject() -> None:
    caller = token_caller(jwt({"sub": "dr-a", "exp": NOW + 600}))
    assert caller is not None and caller.kind == "token" and caller.expires_at == NOW + 600
    assert b"dr-a" not in caller.scope and repr(caller) == "<Caller by token>"
    assert caller == token_caller(jwt({"sub": "dr-a", "exp": NOW + 600}))  # same token
    assert caller_of(CIMultiDict({"authorization": "bearer  " + jwt({"sub": "x"})}), None, NOW)


def test_a_forged_token_with_someone_elses_subject_is_another_caller() -> None:
    genuine = token_caller(jwt({"sub": "dr-a"}, signature="Z2VudWluZQ"))
    forged = token_caller(jwt({"sub": "dr-a"}, signature="Zm9yZ2Vk"))
    other = token_caller(jwt({"sub": "dr-b"}, signature="Z2VudWluZQ"))
    assert genuine is not None and forged is not None and other is not None
    assert len({genuine.scope, forged.scope, other.scope}) == 3


def test_no_usable_token_names_nobody() -> None:
    for headers in (
        CIMultiDict[str](),
        CIMultiDict({"Authorization": "Basic ZHI6cHc="}),
        CIMultiDict({"Authorization": "Bearer "}),
        CIMultiDict({"Authorization": "Bearer opaque-token-not-a-jwt"}),
        bearer(jwt({"name": "no subject"})),
        bearer(jwt({"sub": ""})),
        bearer(jwt({"sub": 42})),
        bearer(jwt({"sub": "dr-a", "exp": NOW})),  # expired
        bearer(jwt({"sub": "dr-a", "exp": "tomorrow"})),
        bearer("a.!!!.c"),
        bearer(f"a.{base64.urlsafe_b64encode(b'[1]').decode()}.c"),
        CIMultiDict([("Authorization", f"Bearer {jwt({'sub': 'a'})}")] * 2),  # which one?
    ):
        assert caller_of(headers, None, NOW) is None, headers


def test_with_an_identity_header_only_that_header_counts() -> None:
    header = "X-Clinician"
    caller = caller_of(CIMultiDict({"x-clinician": " dr-a "}), header, NOW)
    assert caller is not None and caller.kind == "header" and caller.expires_at is None
    assert caller == caller_of(CIMultiDict({header: "dr-a"}), header, NOW)
    assert caller != caller_of(CIMultiDict({header: "dr-b"}), header, NOW)
    assert caller_of(bearer(jwt({"sub": "dr-a"})), header, NOW) is None
    assert caller_of(CIMultiDict({header: "  "}), header, NOW) is None
    assert caller_of(CIMultiDict([(header, "dr-a"), (header, "dr-b")]), header, NOW) is None


def test_a_header_value_and_a_token_never_share_a_scope() -> None:
    token = jwt({"sub": "dr-a"})
    by_token = token_caller(token)
    by_header = caller_of(CIMultiDict({"X-User": token}), "X-User", NOW)
    assert by_token is not None and by_header is not None and by_token != by_header


@given(st.text(min_size=1).filter(str.strip), st.text(min_size=1).filter(str.strip))
def test_different_callers_by_header_never_share_a_scope(a: str, b: str) -> None:
    first = caller_of(CIMultiDict({"X-User": a}), "X-User", NOW)
    second = caller_of(CIMultiDict({"X-User": b}), "X-User", NOW)
    assert first is not None and second is not None
    assert (first.scope == second.scope) == (a.strip() == b.strip())


@given(
    st.dictionaries(
        st.text(max_size=8), st.integers(-(2**53), 2**53) | st.text(max_size=8), max_size=4
    )
)
def test_jwt_claims_reads_the_payload_unverified(claims: dict[str, Any]) -> None:
    assert jwt_claims(jwt(claims)) == claims
    assert jwt_claims("only.two") is None
