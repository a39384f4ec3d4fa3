"""Rows of the OAuth tables as models: the one mapping both stores (``sqlite_store``,
``postgres_store``) read with, since their columns are the same."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

from gateway.oauth.models import AuthMethod, Client, Grant

GRANT_COLUMNS = (
    "id, client_id, client_name, user_name, login_id, server, resource, scope, key_id, key_hash, key_prefix, "
    "spend_limit, created_at, revoked_at"
)


def grant_of(row: Sequence[Any]) -> Grant:
    return Grant(
        id=row[0],
        client_id=row[1],
        client_name=row[2],
        user=row[3],
        login_id=row[4],
        server=row[5],
        resource=row[6],
        scope=row[7],
        key_id=row[8],
        key_hash=row[9],
        key_prefix=row[10],
        spend_limit=row[11],
        created_at=row[12],
        revoked_at=row[13],
    )


def client_of(row: Sequence[Any]) -> Client:
    return Client(
        client_id=row[0],
        client_name=row[1],
        client_uri=row[2],
        redirect_uris=tuple(json.loads(row[3])),
        auth_method=cast(AuthMethod, row[4]),
        secret_hash=row[5],
        created_at=row[6],
        kind="dcr",
    )
