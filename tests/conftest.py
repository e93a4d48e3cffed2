"""The tiers run from the fastest to the one that holds the most: unit, chart,
integration, lab, then the real nodes (e2e), whose cluster lives for the session and so
goes last; within e2e, tests marked `last` (the chart's uninstall) end it."""

from __future__ import annotations

from pathlib import Path

import pytest

TIERS = ("unit", "chart", "integration", "lab", "e2e")
HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "last: run after every other test of its tier "
                            "(e2e: it upgrades and then uninstalls the chart the others use)")


def _tier(item: pytest.Item) -> int:
    try:
        name = Path(str(item.path)).resolve().relative_to(HERE).parts[0]
    except ValueError:
        return len(TIERS)
    return TIERS.index(name) if name in TIERS else len(TIERS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: (_tier(item), item.get_closest_marker("last") is not None))
