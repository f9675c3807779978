"""diagrams/*.svg are rendered from the .dot sources beside them (diagrams/render.sh); a source
edited without re-rendering fails here."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

DIAGRAMS = Path(__file__).parent.parent / "diagrams"


@pytest.mark.parametrize("src", sorted(DIAGRAMS.glob("*.dot")), ids=lambda p: p.name)
def test_svg_matches_its_source(src: Path) -> None:
    svg = src.with_suffix(".svg")
    assert svg.exists(), f"run diagrams/render.sh to create {svg.name}"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert f"source: {src.name} sha256: {digest}" in svg.read_text(), (
        f"{svg.name} is stale: run diagrams/render.sh"
    )
