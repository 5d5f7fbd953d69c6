import sys
from pathlib import Path

# tests/helpers is importable as `helpers` from every tier.
sys.path.insert(0, str(Path(__file__).parent))

import os  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def inductor_cache_in_the_test_folder(tmp_path_factory):
    """Importing transformers' models (or compiling) makes torch's Inductor create its cache
    under /tmp and name it in TORCHINDUCTOR_CACHE_DIR, which every child would inherit: keep it
    in pytest's own folder instead, so that no test leaves it behind."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    yield
    if previous is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small byte-level dataset with train and val splits (tests/helpers/corpus.py), one per
    test module."""
    from helpers.corpus import make_dataset

    return make_dataset(tmp_path_factory.mktemp("ds"))
