import os
import tempfile

import pytest
import torch

# The 'auto' backend's measurements go to a throwaway file, never the user's cache.
os.environ["FUSED_RES_AUTO_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="fused_res_auto_"),
                                                  "auto.json")

# Small CPU machines: keep thread oversubscription away from the timings of the suite.
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_fallback_warnings():
    """Each test sees the fallback warnings as a fresh process would: registry.warn_once
    warns once per reason per process, so a test that asserts a warning must not depend on
    whether an earlier test (in whatever order pytest ran them) already used its reason;
    likewise the fused modules' warn_once."""
    from fused_res.backends import registry
    from fused_res.nn import hooks

    registry._warned.clear()
    hooks._WARNED.clear()
    yield
