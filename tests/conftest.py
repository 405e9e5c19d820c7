"""Shared fixtures: a tiny synthetic dataset and the real MVTec AD copy (when present)."""
from __future__ import annotations

from pathlib import Path

import pytest

from recontrast import synthetic

REPO = Path(__file__).resolve().parents[1]

# What `synthetic_root` holds: every category at 64 px.
SYNTH = dict(size=64, n_train=12, n_test_good=6, n_test_defect=3, seed=0)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Returns the root of a tiny synthetic MVTec-layout dataset (all categories, see SYNTH).

    Shared by the whole session: tests must not write into it (copy it first).
    """
    return synthetic.generate(tmp_path_factory.mktemp("synthetic"), **SYNTH)


@pytest.fixture(scope="session")
def real_mvtec_root() -> Path:
    """Returns ../shared/data/mvtec_ad_256 (MVTec AD resized to 256 px) or skips."""
    root = (REPO / ".." / "shared" / "data" / "mvtec_ad_256").resolve()
    if not root.is_dir():
        pytest.skip(f"real MVTec AD copy not found at {root}")
    return root
