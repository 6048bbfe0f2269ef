import os

import pytest
import tvm

# The harness runs a case in a forked child, where the tests' monkeypatches reach it; where this process's
# TVM pool has worker threads (TVM's default on machines with 4+ hardware threads, or after an in-process
# `edgetvm run` set TVM_NUM_THREADS) it must exec a fresh interpreter instead, which the patches never
# reach. One thread here keeps the suite's results the same on any CI machine.
tvm.get_global_func("runtime.config_threadpool")(1, 1)


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
