"""LATTE on a board reached over TVM RPC: the emulated aarch64 board registers at a tracker and the
training steps, built for its target, are measured there the same way as on the emulated fleet."""

import json
import subprocess
import sys

import pytest

from edgetvm.errors import UserError
from edgetvm.latte import devices, pipeline, training
from edgetvm.runtime import emulated_board as eb

KEY = "latte-a64"


def test_board_profiles_stay_out_of_the_emulated_fleet():
    assert all(not p.board for p in devices.list_profiles())
    boards = [p for p in devices.list_profiles(boards=True) if p.board]
    assert boards and all(p.board == "rpi4" for p in boards if p.name == "rpi4-board")


def test_board_profile_without_an_address_is_refused():
    with pytest.raises(UserError, match="--tracker HOST:PORT --key KEY"):
        pipeline.profile_fleet([devices.load_profile("rpi4-board")], ["fedmlp"], [0.125], quiet=True)


@pytest.mark.skipif((reason := eb.board_unavailable_reason()) is not None, reason=f"emulated board: {reason}")
def test_profile_on_a_board_through_the_tracker(tmp_path):
    out = tmp_path / "profile.json"
    with eb.RPCTracker() as tracker, eb.EmulatedBoard(tracker=tracker, key=KEY):
        r = subprocess.run([sys.executable, "-m", "edgetvm.cli", "latte", "profile", "--device", "rpi4-board",
                            "--arch", "fedmlp", "--widths", "1/8", "--repeats", "1", "--tracker", tracker.address,
                            "--key", KEY, "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert list(data["runs"]) == ["rpi4-board"], r.stderr[-2000:]
    (m,) = data["measurements"]
    assert m["profile"] == "rpi4-board" and m["clock"] == "board" and m["step_s"] > 0
    # Every kernel the host build's step calls was timed on the board, under the host build's names,
    # so the cost model joins them with the same kernel features.
    meta = training.load_meta(m["dir"])
    kernels = {s for s in meta["calls"] if s in meta["kernels"]}
    assert kernels and kernels <= set(m["kernels"])
    assert all(k["time_s"] > 0 for k in m["kernels"].values())


def test_unreachable_board_fails_at_once_with_the_address(capsys):
    from edgetvm.cli import main

    rc = main(["latte", "profile", "--device", "rpi4-board", "--rpc", "127.0.0.1:1", "-o", "/nonexistent/p.json"])
    err = capsys.readouterr().err
    assert rc == 2 and "127.0.0.1:1" in err and len(err.strip().splitlines()) == 1


def test_profile_naming_an_unknown_board_fails_before_compiling(tmp_path):
    src = (devices.DEVICES_DIR / "rpi4-board.toml").read_text().replace('board = "rpi4"', 'board = "nope"')
    (tmp_path / "b.toml").write_text(src)
    with pytest.raises(UserError, match="board 'nope'.*valid boards: .*rpi4"):
        pipeline.profile_fleet([devices.load_profile_file(tmp_path / "b.toml")], ["no-such-arch"], [1.0],
                               quiet=True, session=object())
