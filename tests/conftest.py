import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (benchmarks, long tuning runs)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("EDGETVM_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or EDGETVM_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
