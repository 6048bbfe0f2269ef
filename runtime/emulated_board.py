"""An emulated aarch64 board: a Debian arm64 rootfs run under qemu-user that serves TVM RPC.

Use it for correctness and plumbing (cross-compiled libraries, RPC, trackers), never for speed:
emulation is 15-25x slower than a real core.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from tvm import rpc

from edgetvm.runtime.leftovers import boards_dir, owner_env
from edgetvm.runtime.signals import deferred

TVM_VERSION = "0.27.0.post1"
TVM_FFI_VERSION = "0.1.14.post0"
SUITE = "bookworm"
PYTHON = "3.11"  # bookworm's python3; the wheels must match it
REQUIREMENTS = (f"apache-tvm[rpc]=={TVM_VERSION}", f"apache-tvm-ffi=={TVM_FFI_VERSION}", "numpy")
WHEEL_PLATFORMS = [f"manylinux_2_{v}_aarch64" for v in (17, 24, 27, 28)] + ["manylinux2014_aarch64"]
SPEC = f"debian-{SUITE}-arm64 python{PYTHON} " + " ".join(REQUIREMENTS)
MARKER = ".edgetvm-board"
VENV = "/opt/tvm-venv"  # inside the rootfs
EXTRA_LIB = f"{VENV}/lib/python{PYTHON}/site-packages/tvm/lib/libtvm_runtime_extra.so"
BINFMT_DIR = pathlib.Path("/proc/sys/fs/binfmt_misc")
HOST = "127.0.0.1"

# Runs "$@" chrooted into $1 inside a private mount namespace (unshare --mount): the mounts
# belong to that one board and vanish with its last process, so boards never unmount each
# other's /proc and a killed board leaves nothing mounted inside the cache.
_IN_ROOT = r"""
set -e
root=$1; shift
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
if [ -n "$EDGETVM_WHEELS" ]; then
    mkdir -p "$root/mnt/wheels"
    mount --bind "$EDGETVM_WHEELS" "$root/mnt/wheels"
fi
exec chroot "$root" "$@"
"""
_ROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
}


def cache_dir() -> pathlib.Path:
    return boards_dir() / f"arm64-{SUITE}"


def _in_root_cmd(root: pathlib.Path, *argv: str) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", _IN_ROOT, "sh", str(root), *argv]


def _run(cmd: list[str], log, **kw) -> None:
    """Runs cmd, logging its output; raises with the tail of it on failure. Interrupted, it kills cmd's
    whole process group (debootstrap and pip start children of their own) before raising."""
    with deferred():
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, **kw)
    tail: list[str] = []
    try:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-40:]
            # debootstrap's phase lines end with "..."; its per-package lines would be hundreds.
            if line.rstrip().endswith("...") or line.startswith(("Successfully", "E:", "W:")):
                log("  " + line.rstrip())
    except BaseException:
        with deferred():
            _kill_group(proc)
        raise
    if proc.wait():
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n" + "\n".join(tail))


def _remove_tree(path: pathlib.Path) -> None:
    # --one-file-system: never descend into a bind mount of the host's /dev or /sys left by a
    # killed debootstrap.
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def ensure_binfmt() -> None:
    """Makes the kernel run aarch64 ELF files through qemu-aarch64-static."""
    entry = BINFMT_DIR / "qemu-aarch64"
    if not (BINFMT_DIR / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
                       check=True, capture_output=True, text=True)
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        # qemu-user-static installed in the same apt run as binfmt-support may leave its format out of
        # binfmt-support's database (seen on a fresh machine): import it from the package's file first.
        if not pathlib.Path("/var/lib/binfmts/qemu-aarch64").exists() and \
                pathlib.Path("/usr/share/binfmts/qemu-aarch64").exists():
            subprocess.run(["update-binfmts", "--import", "qemu-aarch64"], check=True, capture_output=True, text=True)
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"],
                       check=True, capture_output=True, text=True)
    text = entry.read_text() if entry.exists() else ""
    if not text.startswith("enabled"):
        raise RuntimeError(f"binfmt entry qemu-aarch64 is not enabled: {text!r}")
    # Without F the interpreter is looked up inside the chroot, where it does not exist.
    flags = next((ln.split()[1] for ln in text.splitlines() if ln.startswith("flags:")), "")
    if "F" not in flags:
        raise RuntimeError(f"binfmt entry qemu-aarch64 lacks the F (fix binary) flag: {text!r}")


def board_unavailable_reason() -> str | None:
    """None if the emulated board can run here, else why not (one line)."""
    if sys.platform != "linux":
        return "the emulated board needs Linux"
    if os.geteuid() != 0:
        return "the emulated board needs root (debootstrap, chroot, mounts)"
    tools = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap",
             "update-binfmts": "binfmt-support", "unshare": "util-linux"}
    for tool, package in tools.items():
        if not shutil.which(tool):
            return f"{tool} not found (apt-get install {package})"
    try:
        ensure_binfmt()
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        return "binfmt_misc cannot be enabled for qemu-aarch64: " + " ".join(detail.split())
    return None


def _download_wheels(dest: pathlib.Path, log) -> None:
    log(f"downloading aarch64 wheels into {dest}")
    platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    _run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", *platforms,
          "--python-version", PYTHON, "--implementation", "cp", "-d", str(dest),
          *REQUIREMENTS], log)


def _install_tvm(root: pathlib.Path, wheels: pathlib.Path, log) -> None:
    pip = [f"{VENV}/bin/python", "-m", "pip", "install", "--disable-pip-version-check"]
    env = dict(_ROOT_ENV)
    try:
        _download_wheels(wheels, log)
        env["EDGETVM_WHEELS"] = str(wheels)
        pip += ["--no-index", "--find-links", "/mnt/wheels"]
        log("installing the wheels inside the rootfs (pip under qemu)")
    except RuntimeError as e:
        # Slow path: let pip inside the rootfs reach the index itself.
        log(f"host download failed, installing from the index inside the rootfs:\n{e}")
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/host-ca.crt")
        env["PIP_CERT"] = "/etc/ssl/host-ca.crt"
        env.update({k: os.environ[k] for k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")
                    if k in os.environ})
    _run(_in_root_cmd(root, *pip, *REQUIREMENTS), log, env=env)


def _build_rootfs(dest: pathlib.Path, wheels: pathlib.Path, log) -> None:
    log(f"debootstrap {SUITE} arm64 into {dest} (about 10 minutes)")
    _run(["unshare", "--mount", "--propagation", "private", "--",
          "debootstrap", "--arch=arm64", "--variant=minbase",
          "--include=python3,python3-venv", SUITE, str(dest), "http://deb.debian.org/debian"], log)
    log(f"creating {VENV}")
    _run(_in_root_cmd(dest, "python3", "-m", "venv", VENV), log, env=_ROOT_ENV)
    _install_tvm(dest, wheels, log)
    log("checking that tvm imports inside the rootfs")
    check = "import tvm, numpy; print(tvm.__version__, numpy.__version__)"
    _run(_in_root_cmd(dest, f"{VENV}/bin/python", "-c", check), log,
         env={**_ROOT_ENV, "TVM_USE_RUNTIME_LIB": "1"})
    freeze = subprocess.run(_in_root_cmd(dest, f"{VENV}/bin/python", "-m", "pip", "freeze"),
                            env=_ROOT_ENV, check=True, capture_output=True, text=True).stdout
    (dest / MARKER).write_text(SPEC + "\n" + freeze)


def ensure_rootfs(log=print) -> pathlib.Path:
    """Returns the cached arm64 rootfs with TVM installed, building it first if needed.

    The build goes to a temporary sibling that is renamed into place once complete, under an
    exclusive lock, so neither an interrupted build nor a concurrent one is ever used.
    """
    base = cache_dir()
    root = base / "rootfs"

    def done() -> bool:
        marker = root / MARKER
        return marker.exists() and marker.read_text().split("\n", 1)[0] == SPEC

    if done():
        return root
    if reason := board_unavailable_reason():
        raise RuntimeError(reason)
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process building {root}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if done():
            return root
        for stale in base.glob("rootfs.*"):
            log(f"removing {stale}")
            _remove_tree(stale)
        start = time.monotonic()
        partial = pathlib.Path(tempfile.mkdtemp(prefix="rootfs.partial-", dir=base))
        partial.chmod(0o755)
        try:
            _build_rootfs(partial, base / "wheels", log)
        except BaseException:
            _remove_tree(partial)  # its builders are dead by now (_run), so nothing is mounted there
            raise
        if root.exists():  # built for other versions
            root.rename(base / f"rootfs.old-{os.getpid()}")
        partial.rename(root)
        for stale in base.glob("rootfs.old-*"):
            _remove_tree(stale)
        log(f"rootfs ready at {root} after {time.monotonic() - start:.0f} s")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class _Service:
    """A process group started with setsid, logging to a file, killed as a whole on stop."""

    host = HOST
    proc: subprocess.Popen | None = None
    name = "service"

    def _spawn(self, cmd: list[str], env: dict) -> None:
        # Held back: a signal between the fork and the assignment would leave a group nobody stops.
        with deferred():
            self._log_file = open(self.log_path, "wb")
            # owner_env: runtime/leftovers.py finds the group by it if it ever outlives its owner.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                         stderr=subprocess.STDOUT, env={**env, **owner_env()},
                                         start_new_session=True)

    def _wait_ready(self, ready, timeout: float) -> None:
        try:
            error = self._poll(ready, timeout)
        except BaseException:  # Ctrl-C while waiting must not leave the server behind
            self.stop()
            raise
        if error:
            self.stop()
            tail = pathlib.Path(self.log_path).read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"{self.name} on {self.host}:{self.port} {error}; log "
                               f"{self.log_path}:\n" + "\n".join(tail))

    def _poll(self, ready, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        error = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"exited with {self.proc.returncode}"
            try:
                if ready():
                    return None
            except Exception as e:  # not up yet; keep the last reason for the report
                error = f"{type(e).__name__}: {e}"
            time.sleep(0.5)
        return f"not ready after {timeout:.0f} s ({error})"

    def stop(self) -> None:
        """Kills the whole process group; a board's mounts go with it (a private mount namespace).
        A second Ctrl-C meanwhile is held back until the group is gone."""
        if self.proc is None:
            return
        with deferred():
            _kill_group(self.proc)
            self.proc = None
            self._log_file.close()

    def __enter__(self):
        try:
            self.start()
        except BaseException:  # also a signal between the spawn and start's own cleanup
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group `proc` leads, SIGKILL 5 s later if any of it is still alive; reaps proc."""
    # The real servers run in popen_worker children that would keep the port if orphaned.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + 5
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.05)
        if not _group_alive(proc.pid):
            break
    proc.wait()


def _group_alive(pgid: int) -> bool:
    # Not os.killpg(pgid, 0): it counts zombies, and this machine's init may never reap them.
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                return True
    return False


def _logs_dir() -> pathlib.Path:
    path = cache_dir() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.log"):  # one per random port: keep a week's worth
        with contextlib.suppress(FileNotFoundError):
            if time.time() - old.stat().st_mtime > 7 * 86400:
                old.unlink()
    return path


class RPCTracker(_Service):
    """`tvm.exec.rpc_tracker` on this host."""

    name = "rpc_tracker"

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.log_path = _logs_dir() / f"tracker-{self.port}.log"

    def start(self, timeout: float = 30) -> "RPCTracker":
        self._spawn([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", self.host,
                     "--port", str(self.port), "--port-end", str(self.port + 1)],
                    {**os.environ, "PYTHONUNBUFFERED": "1"})
        self._wait_ready(self._answers, timeout)
        return self

    def _answers(self) -> bool:
        # A plain connect first: connect_tracker retries on its own for a minute.
        socket.create_connection((self.host, self.port), timeout=2).close()
        return "server_info" in rpc.connect_tracker(self.host, self.port).summary()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class EmulatedBoard(_Service):
    """A TVM RPC server on 127.0.0.1 running inside the arm64 rootfs under qemu-user.

    With `tracker` ("host:port" or an RPCTracker) it registers there under `key` instead of
    accepting direct sessions.
    """

    name = "emulated board"

    def __init__(self, port: int | None = None, tracker=None, key: str | None = None, functions: bool = False):
        """functions=True: serve edgetvm's device-side update functions too (runtime/patch.py, copied into
        the rootfs: it needs only numpy and TVM), so that a weight patch is applied on the board."""
        self.functions = functions
        if isinstance(tracker, RPCTracker):
            tracker = tracker.address
        if tracker and not key:
            raise ValueError("a board registered with a tracker needs a key")
        self.port = port or free_port()
        self.tracker = tracker
        self.key = key
        self.log_path = _logs_dir() / f"board-{self.port}.log"

    def start(self, timeout: float = 120, log=print) -> "EmulatedBoard":
        root = ensure_rootfs(log)
        ensure_binfmt()  # binfmt_misc forgets qemu on reboot; the cached rootfs does not
        # --port-end pins the port: by default the server silently moves to the next free one.
        argv = [f"{VENV}/bin/python", "-m", "tvm.exec.rpc_server", "--host", self.host,
                "--port", str(self.port), "--port-end", str(self.port + 1),
                "--load-library", EXTRA_LIB]
        if self.functions:
            # runtime/patch.py's serve() runs the same listening loop with its functions registered.
            # Copied and renamed in: boards sharing the cached rootfs never see a half-written file.
            tmp = root / "opt" / f".edgetvm_patch.{os.getpid()}.py"
            shutil.copy(pathlib.Path(__file__).with_name("patch.py"), tmp)
            os.replace(tmp, root / "opt" / "edgetvm_patch.py")
            argv = [f"{VENV}/bin/python", "/opt/edgetvm_patch.py", "--host", self.host,
                    "--port", str(self.port), "--load-library", EXTRA_LIB]
        if self.tracker:
            argv += ["--tracker", self.tracker, "--key", self.key]
        self._spawn(_in_root_cmd(root, *argv), {**_ROOT_ENV, "TVM_USE_RUNTIME_LIB": "1"})
        self._wait_ready(self._registered if self.tracker else self._accepts_session, timeout)
        return self

    def _bound(self) -> bool:
        # Whatever else may listen on the port, rpc.connect would wait forever for its handshake.
        text = pathlib.Path(self.log_path).read_text(errors="replace")
        return f"bind to {self.host}:{self.port}" in text

    def _accepts_session(self) -> bool:
        return self._bound() and rpc.connect(self.host, self.port, session_timeout=60).cpu().exist

    def _registered(self) -> bool:
        if not self._bound():
            return False
        host, port = self.tracker.rsplit(":", 1)
        summary = rpc.connect_tracker(host, int(port)).summary()
        return any(s["key"] == f"server:{self.key}" and s["addr"][1] == self.port
                   for s in summary["server_info"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgetvm board emulate", description=__doc__)
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--tracker", help="HOST:PORT of an RPC tracker to register with")
    parser.add_argument("--key", help="device key to register under (needs --tracker)")
    parser.add_argument("--build-only", action="store_true", help="build the rootfs and exit")
    args = parser.parse_args(argv)
    if bool(args.tracker) != bool(args.key):
        parser.error("--tracker and --key go together")
    if reason := board_unavailable_reason():
        print(f"error: {reason}", file=sys.stderr)
        return 2
    if args.build_only:
        print(ensure_rootfs())
        return 0
    # Ctrl-C (and SIGTERM, which the CLI turns into an exception: the board runs in a session of its
    # own, so it would be orphaned otherwise) leaves through the `with`, which stops the board.
    with EmulatedBoard(args.port, args.tracker, args.key) as board:
        where = f"registered with {board.tracker} as {board.key}" if board.tracker else "direct"
        print(f"serving TVM RPC on {board.host}:{board.port} ({where}); "
              f"log {board.log_path}; Ctrl-C stops", flush=True)
        rc = board.proc.wait()
    print(f"error: the server exited with {rc}; log {board.log_path}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    from edgetvm.cli import main as edgetvm_main  # its handling of Ctrl-C and SIGTERM

    sys.exit(edgetvm_main(["board", "emulate", *sys.argv[1:]]))
