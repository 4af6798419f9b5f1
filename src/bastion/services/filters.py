"""Stored filters (``/user/{userId}/filter``), parsed once and cached by ID."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import orjson

from bastion.core.filters import Filter
from bastion.core.ids import parse_digits
from bastion.errors import BadJson, InvalidParam
from bastion.storage import rooms as rooms_store
from bastion.storage.database import Database

MAX_FILTER_BYTES = 32 * 1024


class FilterService:
    def __init__(self, db: Database, cache_size: int = 10_000) -> None:
        self._db = db
        self._cache: OrderedDict[tuple[str, int], Filter] = OrderedDict()
        self._max = cache_size
        self._inline: OrderedDict[str, Filter] = OrderedDict()

    def parse_inline(self, raw: str) -> Filter:
        """A filter given as JSON in the query string; parsed once per distinct string."""
        cached = self._inline.get(raw)
        if cached is not None:
            return cached
        if len(raw) > MAX_FILTER_BYTES:
            raise InvalidParam("Filter is too large")
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidParam("'filter' is not valid JSON") from None
        try:
            parsed = Filter.parse(value)
        except BadJson as exc:
            raise InvalidParam(exc.message) from None
        self._inline[raw] = parsed
        if len(self._inline) > 1000:
            self._inline.popitem(last=False)
        return parsed

    async def create(self, user_id: str, body: dict[str, Any]) -> str:
        Filter.parse(body)  # raises M_BAD_JSON with the reason
        encoded = orjson.dumps(body)
        if len(encoded) > MAX_FILTER_BYTES:
            raise InvalidParam("Filter is too large")
        filter_id = await self._db.write(rooms_store.insert_filter, user_id, encoded)
        return str(filter_id)

    @staticmethod
    def _parse_id(filter_id: str) -> int:
        number = parse_digits(filter_id)
        if number is None:
            raise InvalidParam("Invalid filter ID")
        return number

    async def get_raw(self, user_id: str, filter_id: str) -> bytes | None:
        return await self._db.read(rooms_store.get_filter, user_id, self._parse_id(filter_id))

    async def get(self, user_id: str, filter_id: str) -> Filter:
        key = (user_id, self._parse_id(filter_id))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        raw = await self._db.read(rooms_store.get_filter, user_id, key[1])
        if raw is None:
            raise InvalidParam("Unknown filter ID")
        parsed = Filter.parse(orjson.loads(raw))
        self._cache[key] = parsed
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return parsed
