"""Every provider has a poller module, registered under its own name."""

from __future__ import annotations

import pkgutil

import pollers
from bus.config import DEFAULT_URLS
from bus.statuses import PROVIDERS, TABLES
from pollers.runner import REGISTRY


def test_every_provider_is_registered_under_its_name() -> None:
    assert set(PROVIDERS) == set(REGISTRY) == set(DEFAULT_URLS) == set(TABLES)
    assert all(name == client.name for name, client in REGISTRY.items())


def test_every_provider_module_is_in_the_registry() -> None:
    modules = {m.name for m in pkgutil.iter_modules(pollers.__path__)}
    assert set(PROVIDERS) <= modules
    assert {c.__module__ for c in REGISTRY.values()} == {f"pollers.{p}" for p in PROVIDERS}
