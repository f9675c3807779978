"""One JSON encoding of an event for every transport."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def to_json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)
