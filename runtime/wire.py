"""Bytes on the wire of a TVM RPC session, measured: a counting TCP relay between the client and the board.

TVM's RPC has no byte counters of its own; what a session costs a board's link (framing, handles,
the calls' other arguments, not only the tensors' payload) is what this relay passes each way. Used
by weight patches (edgetvm/update) and the LLM runtime on a board (bench/decode.py --target).

The relay runs in a process of its own: as threads of the client's process it stalled for good
uploading 108 MB of LLM weights to the emulated board (neither side used CPU after the library loaded).
The cause is not pinned down (TVM's calls release the GIL while they send and receive: checked with a
spinning thread), and a relay that shares nothing with the client cannot be caught in it.

    python -m edgetvm.runtime.wire HOST PORT    prints its own port, then answers each line on stdin
                                                with "SENT RECEIVED"; exits when stdin closes
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading


class CountingProxy:
    """A relay on 127.0.0.1:`port` to host:port (in a child process); `counts()` -> (sent, received)."""

    def __init__(self, host: str, port: int):
        from edgetvm.runtime.leftovers import owner_env

        self.target = (host, port)
        self.proc = subprocess.Popen([sys.executable, "-m", "edgetvm.runtime.wire", host, str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env={**os.environ, **owner_env()})
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"the counting relay to {host}:{port} did not start")
        self.port = int(line)

    def counts(self) -> tuple[int, int]:
        self.proc.stdin.write("?\n")
        self.proc.stdin.flush()
        sent, received = self.proc.stdout.readline().split()
        return int(sent), int(received)

    def close(self) -> None:
        """Stop relaying: the board sees the session end even while a client object still holds it (TVM's
        server serves one session at a time, so a lingering one would block the next)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def _serve(host: str, port: int) -> None:
    counts = {"sent": 0, "received": 0}
    lock = threading.Lock()
    listener = socket.create_server(("127.0.0.1", 0))

    def pump(src: socket.socket, dst: socket.socket, counter: str) -> None:
        try:
            while data := src.recv(1 << 16):
                with lock:  # counted before it is passed on: a reply the client holds is already counted
                    counts[counter] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def accept() -> None:
        # Every connection is relayed: session.connect probes the address with a bare connect first.
        while True:
            client, _ = listener.accept()
            try:
                upstream = socket.create_connection((host, port), timeout=30)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            threading.Thread(target=pump, args=(client, upstream, "sent"), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client, "received"), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print(listener.getsockname()[1], flush=True)
    for _ in sys.stdin:
        with lock:
            print(counts["sent"], counts["received"], flush=True)
    os._exit(0)  # the client is gone: so is the relay, whatever its threads are doing


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
