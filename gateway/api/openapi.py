"""The OpenAPI 3.1 document of the service API (gateway listener) and the admin API (admin listener)."""

from __future__ import annotations

from typing import Any

from gateway import __version__

_CENTS = {"type": "string", "pattern": r"^\d+(\.\d{1,3})?$", "description": "cents as an exact decimal string"}
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "stable machine code"},
                "message": {"type": "string"},
                "hint": {"type": "string"},
                "details": {"type": "object"},
            },
        }
    },
}
_RECEIPT = {
    "type": "object",
    "required": ["id", "amount_cents", "balance_cents", "user", "server", "feature", "replayed"],
    "properties": {
        "id": {"type": "string"},
        "amount_cents": _CENTS,
        "balance_cents": _CENTS,
        "user": {"type": "string"},
        "server": {"type": "string"},
        "feature": {"type": "string"},
        "replayed": {"type": "boolean"},
    },
}
_ANY = {"type": "object"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _op(
    summary: str,
    ok: dict[str, Any],
    *,
    body: dict[str, Any] | None = None,
    ok_status: str = "200",
    idempotency: bool = False,
    params: list[dict[str, Any]] | None = None,
    description: str | None = None,
    ok_description: str = "success",
) -> dict[str, Any]:
    responses: dict[str, Any] = {ok_status: {"description": ok_description, **_json(ok)}}
    if ok_status == "201":
        responses["200"] = {"description": "replayed (idempotent retry)", **_json(ok)}
    for code, text in (
        ("400", "invalid input"),
        ("401", "bad credentials"),
        ("402", "payment required"),
        ("404", "not found"),
        ("409", "conflict"),
        (
            "422",
            "the user's key is not usable, or an amount over the most one request may move "
            "(amount_too_large) or a balance it would take past the ledger's limit (balance_limit_exceeded)",
        ),
        ("503", "unavailable"),
    ):
        responses[code] = {"description": text, **_json(_ERROR)}
    op: dict[str, Any] = {"summary": summary, "responses": responses, "security": [{"bearer": []}]}
    if description is not None:
        op["description"] = description
    parameters = list(params or [])
    if idempotency:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": True,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            }
        )
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    return op


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


def openapi_document(surface: str = "service") -> dict[str, Any]:
    """The document of one surface: "service" (gateway listener) or "admin" (admin listener)."""
    key_body = _obj(["key"], key={"type": "string"}, server={"type": ["string", "null"]})
    charge_body = _obj(
        ["key", "amount_cents", "feature"],
        key={"type": "string"},
        amount_cents=_CENTS,
        feature={"type": "string", "minLength": 1, "maxLength": 200},
        server={"type": ["string", "null"]},
    )
    hold_body = {**charge_body, "properties": {**charge_body["properties"], "ttl_s": {"type": "number", "minimum": 1}}}
    amount_body = _obj([], amount_cents=_CENTS)
    paths: dict[str, Any] = {
        "/v1/keys/validate": {"post": _op("Validate a user's key for this server", _ANY, body=key_body)},
        "/v1/charges": {
            "post": _op("Charge a user (one step)", _RECEIPT, body=charge_body, ok_status="201", idempotency=True),
            "get": _op(
                "This developer's charges, newest first",
                _ANY,
                params=[
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                    {"name": "before", "in": "query", "schema": {"type": "string"}},
                ],
            ),
        },
        "/v1/charges/{charge_id}/refund": {
            "post": _op(
                "Refund a charge, fully or partly",
                _ANY,
                body=amount_body,
                ok_status="201",
                params=[_path_param("charge_id")],
                description="Only a charge of this token's developer on one of this token's servers; any other "
                "charge, existing or not, is the same 404. An Idempotency-Key is this developer's own: a retry "
                "with it returns the original refund (200, replayed: true), and no key of the operator or of "
                "another developer is ever the same key.",
            )
        },
        "/v1/holds": {
            "post": _op("Hold an amount for long-running work", _ANY, body=hold_body, ok_status="201", idempotency=True)
        },
        "/v1/holds/{hold_id}/capture": {
            "post": _op(
                "Capture a hold (at most the held amount)",
                _RECEIPT,
                body=amount_body,
                params=[_path_param("hold_id")],
                description="Idempotent: capturing a hold that is already captured answers 200 with the original "
                "charge and replayed: true (nothing is charged again); naming an amount other than the one "
                "captured is a 409 idempotency_conflict. A hold of another developer or outside this token's "
                "servers is a 404.",
                ok_description="the charge (replayed: false), or the original charge of an earlier capture "
                "(replayed: true)",
            )
        },
        "/v1/holds/{hold_id}/release": {"post": _op("Release a hold", _ANY, params=[_path_param("hold_id")])},
        "/v1/earnings": {"get": _op("This developer's earnings, breakdown and statement", _ANY)},
    }
    admin = {
        "/v1/developers": {
            "post": _op("Create a developer", _ANY, body=_obj(["name"], name={"type": "string"}), ok_status="201")
        },
        "/v1/users": {
            "post": _op(
                "Create a user",
                _ANY,
                body=_obj(["name"], name={"type": "string"}, balance_cents=_CENTS),
                ok_status="201",
            )
        },
        "/v1/users/{name}": {"get": _op("A user's balance, keys and charges", _ANY, params=[_path_param("name")])},
        "/v1/users/{name}/topups": {
            "post": _op(
                "Top a user up",
                _ANY,
                body=_obj(["amount_cents"], amount_cents=_CENTS, reference={"type": "string"}),
                ok_status="201",
                params=[_path_param("name")],
            )
        },
        "/v1/keys": {
            "post": _op(
                "Issue an API key (shown once)",
                _ANY,
                body=_obj(
                    ["user", "server"],
                    user={"type": "string"},
                    server={"type": "string"},
                    expires={"type": "string"},
                    spend_limit_cents=_CENTS,
                    name={"type": ["string", "null"], "minLength": 1, "maxLength": 100},
                ),
                ok_status="201",
            ),
            "get": _op("List keys", {"type": "array"}),
        },
        "/v1/keys/{key}/revoke": {"post": _op("Revoke a key", _ANY, params=[_path_param("key")])},
        "/v1/tokens": {
            "post": _op(
                "Issue a service token (shown once)",
                _ANY,
                body=_obj(
                    ["developer", "servers"],
                    developer={"type": "string"},
                    servers={"type": "array", "items": {"type": "string"}},
                ),
                ok_status="201",
            ),
            "get": _op("List service tokens", {"type": "array"}),
        },
        "/v1/tokens/{token}/revoke": {"post": _op("Revoke a service token", _ANY, params=[_path_param("token")])},
        "/v1/usage": {"get": _op("Usage by user, server and tool", {"type": "array"})},
        "/v1/developers/{name}/earnings": {"get": _op("A developer's earnings", _ANY, params=[_path_param("name")])},
        "/v1/developers/{name}/statement": {
            "get": _op("A developer's statement", {"type": "array"}, params=[_path_param("name")])
        },
        "/v1/payouts": {
            "post": _op(
                "Start a payout (with payments.stripe: also its Connect transfer, as `agentpay payouts create`)",
                _ANY,
                body=_obj(["developer"], developer={"type": "string"}, amount_cents=_CENTS),
                ok_status="201",
            ),
            "get": _op("List payouts", {"type": "array"}),
        },
        "/v1/payouts/{payout}/settle": {
            "post": _op(
                "Settle a payout",
                _ANY,
                body=_obj(["reference"], reference={"type": "string"}),
                params=[_path_param("payout")],
            )
        },
        "/v1/payouts/{payout}/fail": {
            "post": _op("Fail a payout (money returns)", _ANY, params=[_path_param("payout")])
        },
        "/v1/ledger/verify": {"get": _op("Check every ledger invariant", _ANY)},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "AgentPay API",
            "version": __version__,
            "description": "The service API (gateway listener, authenticated by a developer's service token)"
            if surface == "service"
            else "The admin API (admin listener, authenticated by the admin token)",
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths if surface == "service" else admin,
    }
