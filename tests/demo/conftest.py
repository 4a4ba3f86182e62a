"""A small demo world, generated once per test session (about a second)."""

from __future__ import annotations

import pytest

from curate.demo.world import World, generate_world

SMALL = 120  # every category still has at least one row


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> World:
    return generate_world(tmp_path_factory.mktemp("demo-world"), samples=SMALL, seed=3)
