import os

import pytest


def _one_thread_pool() -> None:
    """The harness runs a case in a forked child, which the tests' monkeypatches reach; where this
    process's TVM pool has worker threads (TVM's default on machines with 4+ hardware threads, or after
    an in-process `edgetvm run` set TVM_NUM_THREADS) it must exec a fresh interpreter, which no patch
    reaches. So the suite's own pool is made now, with one thread, and not bound to a CPU (TVM pins a
    one-thread pool's calling thread, after which os.sched_getaffinity here reports one CPU). The
    environment is left as it was for the processes the tests start."""
    from edgetvm.runtime.session import make_pool

    assert make_pool({"TVM_NUM_THREADS": "1", "TVM_BIND_THREADS": "0"}, override=True) == 1


_one_thread_pool()


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
