"""Weight patches (edgetvm update diff/apply) and Deep Partial Updating rounds (edgetvm update simulate)."""

import gc
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgetvm import train
from edgetvm.cli import main
from edgetvm.compiler import compile_model
from edgetvm.runtime import emulated_board
from edgetvm.runtime import patch as rpatch
from edgetvm.runtime.artifact import open_artifact
from edgetvm.runtime.session import Runner
from edgetvm.targets import load_board
from edgetvm.update import dpu
from edgetvm.update.patch import apply_local, float_weights, make_patch, select_top

MODEL = train.mlp(hidden=(32,))   # 784*32 + 32 + 32*10 + 10 = 25,450 weights


def _compile(params, out: Path, board="host") -> Path:
    onnx.save(train.to_onnx(MODEL, params), out.with_suffix(".onnx"))
    compile_model(out.with_suffix(".onnx"), load_board(board), out, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """An 'old' deployed artifact and a 'new' one whose weights differ everywhere, a little."""
    d = tmp_path_factory.mktemp("update")
    old = train.init_params(MODEL, seed=0)
    rng = np.random.default_rng(1)
    new = {n: (a + rng.normal(0, 0.01, a.shape)).astype(np.float32) for n, a in old.items()}
    _compile(old, d / "old")
    _compile(new, d / "new")
    return d, old, new


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture
def deployed(arts, tmp_path):
    d = tmp_path / "deployed"
    shutil.copytree(arts[0] / "old", d)
    return d


def test_varints_and_codings_round_trip():
    pos = np.array([0, 1, 2, 130, 131, 20000, 10**7], np.int64)
    vals = np.linspace(-1, 1, len(pos)).astype(np.float32)
    p = rpatch.Patch("a" * 64, "b" * 64, [rpatch.TensorUpdate(3, "w", pos, vals, "f32"),
                                          rpatch.TensorUpdate(4, "v", pos, vals, "q8")])
    q = rpatch.decode(rpatch.encode(p))
    assert [t.name for t in q.tensors] == ["w", "v"]
    np.testing.assert_array_equal(q.tensors[0].positions, pos)
    np.testing.assert_array_equal(q.tensors[0].values, vals)
    # 8-bit values land on a 256-step grid spanning the values: within half a step.
    np.testing.assert_allclose(q.tensors[1].values, vals, atol=(2 / 255) / 2 + 1e-7)


def test_diff_then_apply_gives_the_new_weights_at_k_and_nothing_else(arts, deployed, tmp_path, capsys):
    d, old, new = arts
    assert main(["update", "diff", str(deployed), str(d / "new"), "-k", "0.01", "-o", str(tmp_path / "p")]) == 0
    n = sum(a.size for a in old.values())
    blob = (tmp_path / "p").read_bytes()
    # positions delta-coded (mostly 1-2 bytes) + 4-byte values: well under 8 bytes a changed value
    assert len(blob) < round(0.01 * n) * 6 + 1024
    assert main(["update", "apply", str(deployed), str(tmp_path / "p")]) == 0
    got = float_weights(open_artifact(deployed))   # open_artifact re-checks every hash
    changed = sum(int((got[k] != old[k]).sum()) for k in old)
    assert changed == round(0.01 * n)
    for k in old:
        moved = got[k] != old[k]
        np.testing.assert_array_equal(got[k][moved], new[k][moved])   # the new values, exactly
    # the changed ones are the largest changes
    delta = np.concatenate([np.abs(new[k] - old[k]).ravel() for k in old])
    moved = np.concatenate([(got[k] != old[k]).ravel() for k in old])
    assert delta[moved].min() >= delta[~moved].max()
    manifest = json.loads((deployed / "manifest.json").read_text())
    assert manifest["patches"][-1]["changed"] == changed and not (deployed / "weights.bin").exists()


def test_patched_artifact_runs_and_matches_its_new_weights(arts, deployed):
    d, old, new = arts
    blob = make_patch(open_artifact(deployed), new, None)   # every changed value: the full update as a patch
    apply_local(deployed, blob)
    x = np.random.default_rng(0).random((1, 1, 28, 28), np.float32)
    got = Runner(open_artifact(deployed)).run({"x": x})["logits"]
    want = Runner(open_artifact(d / "new")).run({"x": x})["logits"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def _refused(args, capsys, deployed, needle):
    before = _snapshot(deployed)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert _snapshot(deployed) == before   # byte-identical, no file added or removed


def test_bad_patches_are_refused_and_leave_the_artifact_byte_identical(arts, deployed, tmp_path, capsys):
    d, old, new = arts
    good = make_patch(open_artifact(deployed), new, select_top({k: np.abs(new[k] - old[k]) for k in old}, 0.02))
    (tmp_path / "trunc").write_bytes(good[:len(good) // 2])
    _refused(["update", "apply", str(deployed), str(tmp_path / "trunc")], capsys, deployed, "truncated or damaged")
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    (tmp_path / "flip").write_bytes(bytes(flipped))
    _refused(["update", "apply", str(deployed), str(tmp_path / "flip")], capsys, deployed, "truncated or damaged")
    (tmp_path / "junk").write_bytes(b"hello")
    _refused(["update", "apply", str(deployed), str(tmp_path / "junk")], capsys, deployed, "not an edgetvm weight patch")
    # made for another base: the new artifact
    other = make_patch(open_artifact(d / "new"), old, None)
    (tmp_path / "other").write_bytes(other)
    _refused(["update", "apply", str(deployed), str(tmp_path / "other")], capsys, deployed, "another base artifact")
    # applied once, the same patch no longer fits: its base is gone
    (tmp_path / "good").write_bytes(good)
    assert main(["update", "apply", str(deployed), str(tmp_path / "good")]) == 0
    _refused(["update", "apply", str(deployed), str(tmp_path / "good")], capsys, deployed, "another base artifact")


def test_k_outside_zero_one_is_one_line_exit_2(arts, deployed, tmp_path, capsys):
    d = arts[0]
    for k in ("0", "1.5", "-0.1"):
        assert main(["update", "diff", str(deployed), str(d / "new"), "-k", k, "-o", str(tmp_path / "p")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "outside (0, 1]" in err
        assert main(["update", "simulate", "-k", k, "--rounds", "1"]) == 2
        assert "outside (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_failure_during_apply_leaves_the_old_artifact(arts, deployed, monkeypatch):
    """A crash between writing the new weight file and renaming the manifest in: the old artifact stays."""
    d, old, new = arts
    before = _snapshot(deployed)
    blob = make_patch(open_artifact(deployed), new, None)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(rpatch.os, "fdopen", crash)   # the manifest's temporary file
    with pytest.raises(OSError):
        rpatch.apply_patch(deployed, blob)
    assert _snapshot(deployed) == before


def test_dpu_scores_select_top_k_of_all_weights():
    prev = {"a": np.zeros(100, np.float32), "b": np.zeros(50, np.float32)}
    full = {"a": np.linspace(0, 1, 100).astype(np.float32), "b": np.full(50, 2.0, np.float32)}
    # local contributions favour the end of "a"
    local = {"a": np.linspace(0, 1, 100).astype(np.float32), "b": np.zeros(50, np.float32)}
    rng = np.random.default_rng(0)
    mask = select_top(dpu.scores("global", prev, full, local, 0.5, rng), 0.1)
    assert mask["b"].sum() == 15 and mask["a"].sum() == 0   # 10% of all 150, the largest changes
    mask = select_top(dpu.scores("dpu", prev, full, local, 0.5, rng), 0.1)
    assert mask["a"].sum() + mask["b"].sum() == 15 and mask["a"][-5:].all()
    mask = select_top(dpu.scores("random", prev, full, local, 0.5, rng), 0.1)
    assert mask["a"].sum() + mask["b"].sum() == 15


def test_simulate_runs_rounds_for_every_method_on_real_data(tmp_path, capsys):
    """Two short rounds of an MLP on digits: each partial method sends at most k of the weights as a patch
    that is applied to its own deployed artifact; full updating sends the whole weight file."""
    png, js = tmp_path / "dpu.png", tmp_path / "dpu.json"
    assert main(["update", "simulate", "--rounds", "2", "--model", "mlp", "--data", "digits", "-k", "0.05",
                 "--epochs-initial", "3", "--epochs-update", "1", "--epochs-finetune", "1",
                 "--workdir", str(tmp_path / "w"), "--png", str(png), "--json", str(js), "--quiet"]) == 0
    res = json.loads(js.read_text())
    assert png.stat().st_size > 10_000
    n = res["n_weights"]
    for rec in res["records"]:
        if rec["round"] == 0:
            continue
        if rec["method"] == "full":
            assert rec["bytes"] == res["full_bytes"]
        else:
            assert rec["changed"] <= round(0.05 * n)
            assert (rec["bytes"] > 0) == rec["updated"] and rec["bytes"] < 0.2 * res["full_bytes"]
    for m in dpu.METHODS:   # the artifact each method deployed holds what the report says it does
        open_artifact(tmp_path / "w" / f"deployed-{m}")
    assert "dpu" in capsys.readouterr().out


reason = emulated_board.board_unavailable_reason()


@pytest.mark.slow   # ~40 s on this machine (qemu), beyond the default run's share
@pytest.mark.skipif(reason is not None, reason=f"emulated board unavailable: {reason}")
def test_apply_over_rpc_on_the_emulated_board(arts, tmp_path, capsys):
    """The patch goes to an aarch64 board over TVM RPC and is applied there; the board's artifact then
    hashes like the one patched here, and a bad patch is refused there too."""
    from tvm import rpc

    from edgetvm.update.patch import deploy_rpc, remote_functions

    d, old, new = arts
    art = _compile(old, tmp_path / "rpi4", "rpi4")
    mask = select_top({k: np.abs(new[k] - old[k]) for k in old}, 0.01)
    blob = make_patch(open_artifact(art), new, mask)
    (tmp_path / "p").write_bytes(blob)
    name = f"test-{tmp_path.name}"   # the rootfs is shared by every board: a name of its own
    with emulated_board.EmulatedBoard(functions=True) as board:
        # TVM's RPC server serves one session at a time: each session is closed before the next one opens.
        session = rpc.connect(board.host, board.port, session_timeout=120)
        deploy_rpc(session, art, name)
        del session
        gc.collect()   # the client's session object has reference cycles: end the session now
        addr = f"127.0.0.1:{board.port}"
        (tmp_path / "bad").write_bytes(blob[:-1])
        assert main(["update", "apply", name, str(tmp_path / "bad"), "--rpc", addr]) == 2
        assert "truncated or damaged" in capsys.readouterr().err
        assert main(["update", "apply", name, str(tmp_path / "p"), "--rpc", addr]) == 0
        out = capsys.readouterr().out
        session = rpc.connect(board.host, board.port, session_timeout=120)
        manifest = json.loads(bytes(remote_functions(session)["read"](f"{name}/manifest.json")))
        board_hash = remote_functions(session)["sha256"](f"{name}/{manifest['weights_file']}")
        del session
    shutil.rmtree(emulated_board.cache_dir() / "rootfs" / rpatch.DEPLOY_DIR.lstrip("/") / name, ignore_errors=True)
    apply_local(art, blob)
    here = open_artifact(art).manifest
    assert manifest["files"] == here["files"] and board_hash == here["files"][here["weights_file"]]
    sent = int(out.rsplit(", ", 1)[-1].split()[0].replace(",", ""))   # "..., N bytes sent on the wire"
    assert len(blob) <= sent < len(blob) + 4096   # the patch plus the call's framing, measured


def test_apply_through_a_tracker_counts_the_bytes_on_the_wire(arts, deployed, tmp_path, capsys):
    """A board found by its tracker key gets the patch as one found by address does: applied there, and the
    bytes the session sent measured by the relay, not computed."""
    import os
    import subprocess
    import sys
    import time

    from tvm import rpc

    d, old, new = arts
    mask = select_top({k: np.abs(new[k] - old[k]) for k in old}, 0.01)
    blob = make_patch(open_artifact(deployed), new, mask)
    (tmp_path / "p").write_bytes(blob)
    board_dir = tmp_path / "board"
    shutil.copytree(deployed, board_dir / "mlp")   # what an earlier deploy left on the board
    port = emulated_board.free_port()
    with emulated_board.RPCTracker() as tracker:
        server = subprocess.Popen([sys.executable, str(Path(rpatch.__file__)), "--host", "127.0.0.1",
                                   "--port", str(port), "--tracker", tracker.address, "--key", "patch-board"],
                                  env={**os.environ, "EDGETVM_DEPLOY_DIR": str(board_dir)})
        try:
            for _ in range(100):
                if "patch-board" in str(rpc.connect_tracker(tracker.host, tracker.port).summary()):
                    break
                time.sleep(0.1)
            assert main(["update", "apply", "mlp", str(tmp_path / "p"), "--tracker", tracker.address,
                         "--key", "patch-board"]) == 0
        finally:
            server.kill()
            server.wait()
    out = capsys.readouterr().out
    apply_local(deployed, blob)
    assert _snapshot(board_dir / "mlp") == _snapshot(deployed)
    sent = int(out.rsplit(", ", 1)[-1].split()[0].replace(",", ""))
    assert len(blob) <= sent < len(blob) + 4096


def test_a_partial_update_of_a_conv_nets_parameters_patches_its_packed_weights(tmp_path):
    """The compiler stores a conv's filters packed ([OC/16, C*9, 16]) under new names: a DPU update chosen
    among the parameters still lands on exactly those values, and the patched artifact holds the new
    parameters."""
    from edgetvm.update.patch import WeightMap

    model = train.vgg_small(channels=(16, 32), hidden=32)
    old = train.init_params(model, seed=0)
    onnx.save(train.to_onnx(model, old), tmp_path / "m.onnx")
    compile_model(tmp_path / "m.onnx", load_board("host"), tmp_path / "art", log=lambda m: None)
    art = open_artifact(tmp_path / "art")
    wmap = WeightMap(tmp_path / "m.onnx", load_board("host").target())
    stored = float_weights(art)
    assert set(stored) != set(old)   # packed under other names: what the map is for
    assert all(np.array_equal(wmap.stored(old)[n].reshape(-1), stored[n].reshape(-1)) for n in stored)
    assert all(np.array_equal(a, old[n]) for n, a in wmap.params_of(stored).items())

    rng = np.random.default_rng(0)
    new = {n: (a + rng.normal(0, 0.01, a.shape)).astype(np.float32) for n, a in old.items()}
    mask = select_top({n: np.abs(new[n] - old[n]) for n in old}, 0.01)
    cand = {n: np.where(mask[n], new[n], old[n]) for n in old}
    blob = make_patch(art, wmap.stored(cand), wmap.stored(mask, False))
    report = apply_local(tmp_path / "art", blob)
    assert report["changed"] == sum(int(m.sum()) for m in mask.values())
    held = wmap.params_of(float_weights(open_artifact(tmp_path / "art")))
    assert all(np.array_equal(held[n], cand[n]) for n in old)
