"""Amounts and prices: the price table and its hot reload, and the two-phase settlement of proxied calls
(hold before forwarding, capture or void after) with its leases and sweeper.
"""
