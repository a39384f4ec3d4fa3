"""The self-service web portal under ``/portal/``: sign-up and sign-in, the catalog, API keys, the
dashboard, the developer page and account settings. A face over the ledger's operations
(``gateway.api.operations``) and the login service (``gateway.logins``), never a second
implementation of either."""

from gateway.portal.app import add_portal

__all__ = ["add_portal"]
