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


def _client(script: str) -> dict:
    """What `script` prints last (JSON), run in a process of its own against an RPC server through the relay."""
    with EmulatedDevice(None) as server:
        host, port = server.address
        r = subprocess.run([sys.executable, "-c", script, host, str(port)], capture_output=True, text=True,
                           timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_large_upload_through_the_relay_completes_and_is_counted_each_way():
    """32 MB is far beyond the sockets' buffers (a relay in the client's own process once stalled on an
    LLM's 108 MB upload). The client runs in a process of its own, so that a hang fails the test
    instead of stopping the suite."""
    got = _client(CLIENT)
    assert got["same"] and got["relay_gone"]
    n = got["nbytes"]
    assert n <= got["sent"] < n + (64 << 10)  # the payload and the calls' framing, once
    assert n <= got["received"] < n + (64 << 10)


READS = """
import json, sys
import numpy as np, tvm
from edgetvm.runtime.tensors import to_numpy
from edgetvm.runtime.wire import CountingProxy
proxy = CountingProxy(sys.argv[1], int(sys.argv[2]))
sess = tvm.rpc.connect("127.0.0.1", proxy.port, session_timeout=0)
rng = np.random.default_rng(0)
arrays = [np.float32(3.5), rng.standard_normal((2, 3)).astype("float16"), rng.integers(-9, 9, (4, 5, 6), dtype=np.int8)]
same = all(np.array_equal(to_numpy(tvm.runtime.tensor(a, sess.cpu())), a) for a in arrays)
t = tvm.runtime.tensor(np.zeros(2, "float32"), sess.cpu())
sent = {}
for name, read in (("numpy", t.numpy), ("to_numpy", lambda: to_numpy(t))):
    before = proxy.counts()
    for _ in range(10):
        read()
    sent[name] = (proxy.counts()[0] - before[0]) / 10
del t, sess
proxy.close()
print(json.dumps({"same": same, "sent": sent}))
"""


def test_reading_a_tensor_on_a_board_skips_numpys_extra_round_trip():
    """`numpy()` of a remote tensor copies it and then syncs the board's stream, one more request over
    the link (TVM's RPC copies a CPU tensor synchronously anyway); to_numpy copies into a tensor here."""
    got = _client(READS)
    assert got["same"]
    assert got["sent"]["to_numpy"] < got["sent"]["numpy"]
