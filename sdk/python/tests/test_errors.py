"""Every error code the server can produce, raised as its own class by a real request; and the table."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal

import pytest

import bulkhead
from bulkhead import (
    AgentAccount,
    AgentClient,
    AgentRevoked,
    AgentSuspended,
    AncestorCapExceeded,
    AuthenticationError,
    BodyTooLarge,
    BulkheadConnectionError,
    BulkheadError,
    CapEscalation,
    Conflict,
    CredentialExpired,
    CredentialRevoked,
    HandleTaken,
    HoldClosed,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    InternalError,
    InvalidAmount,
    InvalidCredentials,
    InvalidHandle,
    InvalidRequest,
    InvalidScope,
    InvalidWindow,
    LifetimeCapExceeded,
    LimitExceeded,
    MethodNotAllowed,
    NotFound,
    PermissionDenied,
    PerTxLimitExceeded,
    RateLimited,
    RouteNotAllowed,
    ScopeEscalation,
    ScopeNotGranted,
    ServerError,
    SpendingCapExceeded,
    StoreUnavailable,
    UnprocessableRequest,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_class,
)
from bulkhead.errors import error_from_response
from conftest import MakeAccount
from support.server import Server
from support.util import unique_handle, wait_until

W = "payments:write"


def expect(exc_info: pytest.ExceptionInfo[BulkheadError], cls: type[BulkheadError], status: int, code: str) -> None:
    """The exception is exactly `cls` with the status and code, and a message."""
    err = exc_info.value
    assert type(err) is cls
    assert (err.status, err.code) == (status, code)
    assert err.message
    assert err.body["error"]["code"] == code
    assert code in err.raw
    assert code in str(err)


# 400


def test_invalid_request(make_account: MakeAccount) -> None:
    with pytest.raises(InvalidRequest) as caught:
        make_account(extra={"no_such_field": 1})
    expect(caught, InvalidRequest, 400, "invalid_request")


def test_invalid_amount(make_account: MakeAccount) -> None:
    client = make_account().client()
    with pytest.raises(InvalidAmount) as caught:
        client.spend("0", scope=W)
    expect(caught, InvalidAmount, 400, "invalid_amount")
    assert isinstance(caught.value, InvalidRequest)
    with pytest.raises(InvalidAmount):
        client.spend("1000000000001", scope=W)  # above 10^12


def test_invalid_scope(make_account: MakeAccount) -> None:
    client = make_account().client()
    with pytest.raises(InvalidScope) as caught:
        client.spend("1.00", scope="Not A Scope")
    expect(caught, InvalidScope, 400, "invalid_scope")


def test_invalid_handle(make_account: MakeAccount) -> None:
    with pytest.raises(InvalidHandle) as caught:
        make_account(handle="-Bad Handle")
    expect(caught, InvalidHandle, 400, "invalid_handle")


def test_invalid_window(make_account: MakeAccount) -> None:
    with pytest.raises(InvalidWindow) as caught:
        make_account(window="3 weeks")
    expect(caught, InvalidWindow, 400, "invalid_window")


# 401


def test_invalid_credentials(server: Server) -> None:
    with AgentClient("bk_" + "x" * 40, url=server.url) as client, pytest.raises(InvalidCredentials) as caught:
        client.spend("1.00", scope=W)
    expect(caught, InvalidCredentials, 401, "invalid_credentials")
    assert isinstance(caught.value, AuthenticationError)
    with pytest.raises(InvalidCredentials):
        AgentAccount.create(unique_handle(), [W], "1.00", url=server.url, admin_token="not-the-admin-token" * 2)


def test_credential_revoked(make_account: MakeAccount) -> None:
    account = make_account()
    client = account.client()
    client.spend("1.00", scope=W)
    assert account.revoke() == [account.handle]
    with pytest.raises(CredentialRevoked) as caught:
        client.spend("1.00", scope=W)
    expect(caught, CredentialRevoked, 401, "credential_revoked")


def test_credential_expired(make_account: MakeAccount) -> None:
    account = make_account(expires_in="1s")
    client = account.client()
    agent = account.agent
    assert agent is not None
    assert agent.expires_at is not None

    def expired() -> bool:
        try:
            client.me()
        except CredentialExpired:
            return True
        return False

    wait_until(expired, timeout=10)
    assert datetime.now(timezone.utc) >= agent.expires_at
    with pytest.raises(CredentialExpired) as caught:
        client.spend("1.00", scope=W)
    expect(caught, CredentialExpired, 401, "credential_expired")


# 402


def _check_remaining(err: BulkheadError, window: str) -> None:
    """A 402 reports what is left and when the window resets; the SDK reads it exactly."""
    assert err.remaining == Decimal(window)
    assert err.window_resets_at is not None


def test_per_tx_limit_exceeded(make_account: MakeAccount) -> None:
    client = make_account(spending_cap="10.00", per_tx_limit="2.00").client()
    with pytest.raises(PerTxLimitExceeded) as caught:
        client.spend("2.01", scope=W)
    expect(caught, PerTxLimitExceeded, 402, "per_tx_limit_exceeded")
    assert isinstance(caught.value, LimitExceeded)
    _check_remaining(caught.value, "10.00")


def test_spending_cap_exceeded(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="5.00")
    client = account.client()
    client.spend("4.00", scope=W)
    with pytest.raises(SpendingCapExceeded) as caught:
        client.spend("1.01", scope=W)
    expect(caught, SpendingCapExceeded, 402, "spending_cap_exceeded")
    _check_remaining(caught.value, "1.00")
    retry_after = caught.value.retry_after
    assert retry_after is not None and 0 < retry_after <= 24 * 3600  # the window cap resets then
    assert account.usage().window_spent == Decimal("4.00")  # nothing was charged


def test_lifetime_cap_exceeded(make_account: MakeAccount) -> None:
    client = make_account(spending_cap="10.00", lifetime_cap="3.00").client()
    client.spend("2.50", scope=W)
    with pytest.raises(LifetimeCapExceeded) as caught:
        client.spend("1.00", scope=W)
    expect(caught, LifetimeCapExceeded, 402, "lifetime_cap_exceeded")


def test_ancestor_cap_exceeded(make_account: MakeAccount) -> None:
    parent = make_account(["spawn:agents", W], "5.00", prefix="parent")
    parent_client = parent.client()
    child = parent_client.spawn(unique_handle("child"), [W], "5.00")
    parent_client.spend("4.00", scope=W)
    with pytest.raises(AncestorCapExceeded) as caught:
        child.client().spend("2.00", scope=W)
    expect(caught, AncestorCapExceeded, 402, "ancestor_cap_exceeded")


# 403


def test_scope_not_granted(make_account: MakeAccount) -> None:
    client = make_account(["invoices:read"]).client()
    with pytest.raises(ScopeNotGranted) as caught:
        client.spend("1.00", scope=W)
    expect(caught, ScopeNotGranted, 403, "scope_not_granted")
    assert isinstance(caught.value, PermissionDenied)


def test_scope_escalation(make_account: MakeAccount) -> None:
    client = make_account(["spawn:agents", W], "5.00").client()
    with pytest.raises(ScopeEscalation) as caught:
        client.spawn(unique_handle("child"), ["payments:refund"], "1.00")
    expect(caught, ScopeEscalation, 403, "scope_escalation")


def test_cap_escalation(make_account: MakeAccount) -> None:
    client = make_account(["spawn:agents", W], "5.00").client()
    with pytest.raises(CapEscalation) as caught:
        client.spawn(unique_handle("child"), [W], "5.01")
    expect(caught, CapEscalation, 403, "cap_escalation")


def test_agent_suspended_by_the_breaker(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="1.00", breaker={"denials": 2, "window": "60s"})
    client = account.client()
    client.spend("0.60", scope=W)
    for _ in range(2):
        with pytest.raises(SpendingCapExceeded):
            client.spend("0.60", scope=W)
    with pytest.raises(AgentSuspended) as caught:
        client.spend("0.10", scope=W)
    expect(caught, AgentSuspended, 403, "agent_suspended")
    assert account.refresh().status == "suspended"


# 404, 409, 422, 429


def test_not_found(make_account: MakeAccount, server: Server) -> None:
    client = make_account().client()
    with pytest.raises(NotFound) as caught:
        client.capture("hold_doesnotexist0000000000", "1.00")
    expect(caught, NotFound, 404, "not_found")
    with pytest.raises(NotFound):
        AgentAccount(unique_handle("ghost"), url=server.url, admin_token=server.admin_token).refresh()


def test_handle_taken(make_account: MakeAccount) -> None:
    account = make_account()
    with pytest.raises(HandleTaken) as caught:
        make_account(handle=account.handle)
    expect(caught, HandleTaken, 409, "handle_taken")
    assert isinstance(caught.value, Conflict)


def test_hold_closed(make_account: MakeAccount) -> None:
    client = make_account().client()
    hold = client.hold("1.00", scope=W)
    hold.release()
    with pytest.raises(HoldClosed) as caught:
        hold.capture("0.50")
    expect(caught, HoldClosed, 409, "hold_closed")


def test_idempotency_key_reused(make_account: MakeAccount) -> None:
    account = make_account()
    client = account.client()
    first = client.spend("1.00", scope=W, idempotency_key="order-17")
    again = client.spend("1.00", scope=W, idempotency_key="order-17")
    assert again.id == first.id
    assert again.replayed
    with pytest.raises(IdempotencyKeyReused) as caught:
        client.spend("2.00", scope=W, idempotency_key="order-17")
    expect(caught, IdempotencyKeyReused, 422, "idempotency_key_reused")
    assert account.usage().window_spent == Decimal("1.00")


def test_rate_limited(make_account: MakeAccount) -> None:
    account = make_account(rate_limit={"requests": 2, "per": "1m"})
    client = account.client()
    client.spend("0.10", scope=W)
    client.spend("0.10", scope=W)
    with pytest.raises(RateLimited) as caught:
        client.spend("0.10", scope=W)
    expect(caught, RateLimited, 429, "rate_limited")
    assert caught.value.retry_after is not None
    assert 0 < caught.value.retry_after <= 60
    assert account.usage().window_spent == Decimal("0.20")


def test_body_too_large(make_account: MakeAccount) -> None:
    account = make_account()
    with pytest.raises(BodyTooLarge) as caught:
        account.client().spend("1.00", scope=W, memo="x" * (1024 * 1024 + 1))
    expect(caught, BodyTooLarge, 413, "body_too_large")
    assert account.usage().tx_count == 0


def test_an_agent_key_is_no_admin_token(make_account: MakeAccount, server: Server) -> None:
    account = make_account()
    other = AgentAccount(account.handle, url=server.url, admin_token=account.key)
    with pytest.raises(InvalidCredentials):
        other.refresh()


# No answer at all


def test_no_server_is_a_connection_error() -> None:
    with (
        AgentClient("bk_x", url="http://127.0.0.1:9", max_retries=1) as client,
        pytest.raises(BulkheadConnectionError) as caught,
    ):
        client.spend("1.00", scope=W)
    assert caught.value.status is None
    assert caught.value.code == "connection_error"
    assert isinstance(caught.value, BulkheadError)


# The table


TABLE: list[tuple[str, int, type[BulkheadError], type[BulkheadError]]] = [
    ("invalid_request", 400, InvalidRequest, InvalidRequest),
    ("invalid_amount", 400, InvalidAmount, InvalidRequest),
    ("invalid_scope", 400, InvalidScope, InvalidRequest),
    ("invalid_handle", 400, InvalidHandle, InvalidRequest),
    ("invalid_window", 400, InvalidWindow, InvalidRequest),
    ("invalid_credentials", 401, InvalidCredentials, AuthenticationError),
    ("credential_revoked", 401, CredentialRevoked, AuthenticationError),
    ("credential_expired", 401, CredentialExpired, AuthenticationError),
    ("per_tx_limit_exceeded", 402, PerTxLimitExceeded, LimitExceeded),
    ("spending_cap_exceeded", 402, SpendingCapExceeded, LimitExceeded),
    ("lifetime_cap_exceeded", 402, LifetimeCapExceeded, LimitExceeded),
    ("ancestor_cap_exceeded", 402, AncestorCapExceeded, LimitExceeded),
    ("scope_not_granted", 403, ScopeNotGranted, PermissionDenied),
    ("scope_escalation", 403, ScopeEscalation, PermissionDenied),
    ("cap_escalation", 403, CapEscalation, PermissionDenied),
    ("agent_suspended", 403, AgentSuspended, PermissionDenied),
    ("route_not_allowed", 403, RouteNotAllowed, PermissionDenied),
    ("not_found", 404, NotFound, NotFound),
    ("method_not_allowed", 405, MethodNotAllowed, MethodNotAllowed),
    ("handle_taken", 409, HandleTaken, Conflict),
    ("hold_closed", 409, HoldClosed, Conflict),
    ("agent_revoked", 409, AgentRevoked, Conflict),
    ("idempotency_in_progress", 409, IdempotencyInProgress, Conflict),
    ("body_too_large", 413, BodyTooLarge, BodyTooLarge),
    ("idempotency_key_reused", 422, IdempotencyKeyReused, UnprocessableRequest),
    ("rate_limited", 429, RateLimited, RateLimited),
    ("internal_error", 500, InternalError, ServerError),
    ("upstream_unavailable", 502, UpstreamUnavailable, ServerError),
    ("store_unavailable", 503, StoreUnavailable, ServerError),
    ("upstream_timeout", 504, UpstreamTimeout, ServerError),
]


@pytest.mark.parametrize(("code", "status", "cls", "base"), TABLE)
def test_every_code_maps_to_its_class(
    code: str, status: int, cls: type[BulkheadError], base: type[BulkheadError]
) -> None:
    body = json.dumps({"error": {"code": code, "message": f"about {code}."}}).encode()
    err = error_from_response(status, {}, body)
    assert type(err) is cls
    assert isinstance(err, base)
    assert isinstance(err, BulkheadError)
    assert (err.status, err.code, err.message) == (status, code, f"about {code}.")
    assert error_class(status, code) is cls
    # Exported from the package, under the name it has.
    assert getattr(bulkhead, cls.__name__) is cls
    assert cls.__name__ in bulkhead.__all__


@pytest.mark.parametrize(
    ("status", "base"),
    [
        (400, InvalidRequest),
        (401, AuthenticationError),
        (402, LimitExceeded),
        (403, PermissionDenied),
        (404, NotFound),
        (409, Conflict),
        (422, UnprocessableRequest),
        (429, RateLimited),
        (500, ServerError),
        (503, ServerError),
        (418, BulkheadError),
    ],
)
def test_an_unknown_code_maps_to_the_base_of_its_status(status: int, base: type[BulkheadError]) -> None:
    err = error_from_response(status, {}, b'{"error": {"code": "brand_new_code", "message": "New."}}')
    assert type(err) is base
    assert (err.status, err.code, err.message) == (status, "brand_new_code", "New.")


def test_a_body_that_is_not_json_still_raises_by_status() -> None:
    err = error_from_response(502, {}, b"<html>bad gateway</html>")
    assert type(err) is ServerError
    assert err.code == "http_502"
    assert err.body is None
    assert "bad gateway" in err.raw


def test_a_402_body_with_remaining_and_retry_after() -> None:
    body = {
        "error": {"code": "spending_cap_exceeded", "message": "Over the cap."},
        "remaining": {"window": "0.350000", "lifetime": "12.00"},
        "window_resets_at": "2026-12-06T03:17:59.177Z",
    }
    err = error_from_response(402, {"retry-after": "3600"}, json.dumps(body).encode())
    assert isinstance(err, SpendingCapExceeded)
    assert err.remaining == Decimal("0.35")
    assert err.remaining_lifetime == Decimal("12.00")
    assert err.retry_after == 3600.0
    assert err.window_resets_at == datetime(2026, 12, 6, 3, 17, 59, 177000, tzinfo=timezone.utc)
    assert err.body == json.loads(json.dumps(body), parse_float=Decimal)


def test_retry_after_from_the_body_when_the_header_is_missing() -> None:
    body = b'{"error": {"code": "rate_limited", "message": "Slow down.", "retry_after": 7}}'
    assert error_from_response(429, {}, body).retry_after == 7.0
