"""``/portal/servers``: every server behind the gateway, what its upstream lists (tools, resources,
prompts; cached by ``listing.Listings``) and the price of each from the live price table."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from gateway.portal import security
from gateway.portal.listing import Entry, Listing, Listings
from gateway.portal.prices import Price, listed_prices, price_of
from gateway.portal.render import page
from gateway.runtime import RUNTIME

LISTINGS: web.AppKey[Listings] = web.AppKey("portal_listings", Listings)
KIND_TITLES = (("tool", "Tools"), ("resource", "Resources"), ("prompt", "Prompts"))


@dataclass(frozen=True, slots=True)
class Item:
    entry: Entry
    price: Price


@dataclass(frozen=True, slots=True)
class ServerView:
    name: str
    listing: Listing
    sections: tuple[tuple[str, tuple[Item, ...]], ...]  # (title, items) per kind the upstream lists
    rules: tuple[tuple[str, str, Price], ...]  # the price file's own lines, when the upstream is not listed


async def catalog(request: web.Request) -> web.StreamResponse:
    ws = await security.session_of(request)  # public: what anyone reads before signing up
    rt = request.config_dict[RUNTIME]
    listings = request.app[LISTINGS]
    refresh = request.query.get("refresh") == "1"
    names = sorted(rt.config.servers)
    found = await asyncio.gather(*(listings.get(name, refresh=refresh) for name in names))
    table = rt.prices.table  # the table in force now: a hot reload shows at the next page view
    views = []
    for name, listing in zip(names, found, strict=True):
        sections = tuple(
            (title, tuple(Item(e, price_of(table, name, kind, e.name)) for e in listing.of(kind)))
            for kind, title in KIND_TITLES
        )
        rules = () if listing.available else tuple(listed_prices(table, name))
        views.append(ServerView(name, listing, tuple((t, i) for t, i in sections if i), rules))
    return await page(request, "catalog.html", {"servers": views}, session=ws)
