"""Every provider has a poller module, registered under its own name."""

from __future__ import annotations

import pkgutil

import pollers
from bus.config import DEFAULT_URLS, load_settings
from bus.statuses import PROVIDERS, TABLES
from pollers.runner import REGISTRY


def test_every_provider_is_registered_under_its_name() -> None:
    assert set(PROVIDERS) == set(REGISTRY) == set(DEFAULT_URLS) == set(TABLES)
    settings = load_settings({})
    built = {name: build(settings.providers[name], None) for name, build in REGISTRY.items()}  # type: ignore[arg-type]
    assert all(name == provider.name for name, provider in built.items())


def test_every_provider_module_is_in_the_registry() -> None:
    modules = {m.name for m in pkgutil.iter_modules(pollers.__path__)}
    assert set(PROVIDERS) <= modules
    assert {b.__module__ for b in REGISTRY.values()} == {f"pollers.{p}" for p in PROVIDERS}


def test_each_provider_declares_what_its_document_offers() -> None:
    settings = load_settings({})
    offered = {
        name: (
            (build := REGISTRY[name](settings.providers[name], None)).statuses is not None,  # type: ignore[arg-type]
            build.history is not None,
            build.inbound is not None,
            build.balance.unit if build.balance else None,
        )
        for name in PROVIDERS
    }
    # (per-id statuses, account history, inbound, balance unit), from each document.
    assert {
        "smspilot": (True, False, True, "RUB"),
        "smstower": (True, False, True, "SMS"),
        "smspager": (True, False, False, "RUB"),
        "smsc": (False, True, True, None),
        "epochta": (True, False, False, "credits"),
    } == offered
