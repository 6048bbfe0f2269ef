"""The counting relay under an RPC session: bytes on the wire each way, for calls of any size."""

import json
import subprocess
import sys

from edgetvm.runtime.device import EmulatedDevice

CLIENT = """
import json, sys
import numpy as np, tvm
from edgetvm.runtime.wire import CountingProxy
proxy = CountingProxy(sys.argv[1], int(sys.argv[2]))
x = np.random.default_rng(0).integers(0, 256, 32 << 20, dtype=np.uint8)
sess = tvm.rpc.connect("127.0.0.1", proxy.port, session_timeout=0)
before = proxy.counts()
same = tvm.runtime.tensor(x, sess.cpu()).numpy().tobytes() == x.tobytes()
after = proxy.counts()
del sess
proxy.close()
print(json.dumps({"same": same, "sent": after[0] - before[0], "received": after[1] - before[1],
                  "nbytes": x.nbytes, "relay_gone": proxy.proc.poll() is not None}))
"""


def test_a_large_upload_through_the_relay_completes_and_is_counted_each_way():
    """32 MB is far beyond the sockets' buffers (a relay in the client's own process once stalled on an
    LLM's 108 MB upload). The client runs in a process of its own, so that a hang fails the test
    instead of stopping the suite."""
    with EmulatedDevice(None) as server:
        host, port = server.address
        r = subprocess.run([sys.executable, "-c", CLIENT, host, str(port)], capture_output=True, text=True,
                           timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["same"] and got["relay_gone"]
    n = got["nbytes"]
    assert n <= got["sent"] < n + (64 << 10)  # the payload and the calls' framing, once
    assert n <= got["received"] < n + (64 << 10)
