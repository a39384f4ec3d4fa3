"""The HTTP APIs beside the proxy: the developers' service API (/v1/), the operator's admin API, their
OpenAPI documents, and the operations the admin API and the CLI share.
"""
