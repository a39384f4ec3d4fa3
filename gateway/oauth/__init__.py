"""The gateway as the OAuth 2.1 authorization server of its MCP servers (MCP authorization).

``models`` (records), ``redirects`` (redirect URI rules), ``clients`` (dynamic registration and Client
ID Metadata Documents), ``service`` (authorization codes, tokens, grants: no HTTP), ``store`` (the
storage interface) with ``sqlite_store`` and ``postgres_store``, ``metadata`` (the discovery
documents) and ``views`` (the HTTP endpoints). A grant is a key: approving creates a ledger key record
for the user and the server, and access tokens resolve to it in the proxy's authenticator.
"""
