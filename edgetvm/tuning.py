"""`edgetvm tune`: per-board schedule search with MetaSchedule and its XGBoost cost model.

The tasks are the fused kernels of exactly the `main` that `edgetvm compile` builds (same import,
same weight lifting, same legalization and fusion), so the records apply at compile time through
`MetaScheduleApplyDatabase`. A database is a directory:

    edgetvm-tuning.json          what it was made for: board, TVM target, model sha256, input shapes
    database_workload.json       MetaSchedule's JSON database (one JSON document per line,
    database_tuning_record.json    appended as trials finish: a SIGKILL loses at most a line)
    tasks.json                   per task: untuned latency, whether the search space ran out
    logs/                        MetaSchedule's logs

`--trials N` is a budget per task. Records already in the database count toward it and seed the
search (the evolutionary search starts from the database's best, the cost model is trained on all
of them), so running the same command again continues where a killed or interrupted run stopped.
Tasks are tuned one after another, the slowest (untuned time x calls) first.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgetvm.errors import UserError

IDENTITY = "edgetvm-tuning.json"
TASKS = "tasks.json"
WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
LOCK = ".lock"
BUILD_DIR = ".build"
FORMAT = "edgetvm-tuning-db/1"
# apache-tvm-ffi versions known to crash MetaSchedule (segfault in tvm.ir.save_json).
BAD_TVM_FFI = {"0.1.15.post2"}
GOOD_TVM_FFI = "0.1.14.post0"
FAILED_SECS = 1e9  # MetaSchedule records a failed trial as 1e10 s
INTERRUPTED = "edgetvm: interrupted before this candidate was built"


# ------------------------------------------------------------------------------- database


def _model_identity(model_path: str | Path, input_shapes) -> tuple[dict, list]:
    from edgetvm.passes import model_import
    from edgetvm.runtime.artifact import sha256_file

    _model, inputs = model_import.prepare(model_path, input_shapes)
    return {"name": Path(model_path).name, "sha256": sha256_file(Path(model_path))}, inputs


def _identity(board, model: dict, inputs) -> dict:
    return {
        "format": FORMAT,
        "board": board.name,
        "target": str(board.target()),
        "model": model,
        "inputs": [i.to_json() for i in inputs],
    }


def _fmt_inputs(inputs: list[dict]) -> str:
    return " ".join(f"{i['name']}:{','.join(map(str, i['shape']))}" for i in inputs)


def _check_identity(path: Path, have: dict, want: dict, model_path) -> None:
    """Refuses a database made for another board, target, model or input shapes."""
    hint = (f"tune for it with `edgetvm tune {model_path} --target {want['board']} "
            f"-o NEW_DB` (or pass the database made for it)")
    if have.get("format") != FORMAT:
        raise UserError(f"{path} is a tuning database of another format ({have.get('format')!r}, expected "
                        f"{FORMAT!r}); {hint}")
    if have.get("board") != want["board"]:
        raise UserError(f"tuning database {path} was made for board '{have.get('board')}', not "
                        f"'{want['board']}'; {hint}")
    if have.get("target") != want["target"]:
        raise UserError(f"tuning database {path} was made for TVM target {have.get('target')}, but board "
                        f"'{want['board']}' is now {want['target']} (board file or CPU changed); {hint}")
    if have.get("model", {}).get("sha256") != want["model"]["sha256"]:
        raise UserError(f"tuning database {path} was made for another model ({have.get('model', {}).get('name')}, "
                        f"sha256 {str(have.get('model', {}).get('sha256'))[:12]}...), not {want['model']['name']} "
                        f"(sha256 {want['model']['sha256'][:12]}...); {hint}")
    if have.get("inputs") != want["inputs"]:
        raise UserError(f"tuning database {path} was made for input shapes {_fmt_inputs(have.get('inputs', []))}, "
                        f"not {_fmt_inputs(want['inputs'])}; pass the same --input-shape, or {hint}")


def _read_identity(path: Path) -> dict:
    f = path / IDENTITY
    try:
        have = json.loads(f.read_text())
        if not isinstance(have, dict):
            raise ValueError("not a JSON object")
        return have
    except (OSError, ValueError) as e:
        raise UserError(f"{f} is unreadable ({e}); the tuning database is damaged: delete {path} and tune "
                        f"again") from None


def _scan(path: Path, n_workloads: int | None) -> tuple[int, int]:
    """(number of lines, byte length) of the good part of a JSON-lines file of the database.

    Text after the last newline is what a killed writer leaves (a torn line) and is not part of
    it. A complete line that is not a workload (n_workloads None) or a record is corruption.
    """
    if not path.exists():
        return 0, 0
    *complete, _torn = path.read_bytes().split(b"\n")
    offset = 0
    for i, line in enumerate(complete):
        try:
            doc = json.loads(line)
        except ValueError:
            doc = None
        if n_workloads is None:  # [structural hash, module]
            ok = isinstance(doc, list) and len(doc) == 2
        else:  # [workload index, [trace, run_secs, target, args_info]]
            ok = (isinstance(doc, list) and len(doc) == 2 and isinstance(doc[0], int)
                  and 0 <= doc[0] < n_workloads)
        if not ok:
            kind = "workload" if n_workloads is None else "record"
            raise UserError(f"{path} line {i + 1} is not a MetaSchedule {kind}; the tuning database is damaged: "
                            f"delete {path.parent} and tune again")
        offset += len(line) + 1
    return len(complete), offset


def _check_files(path: Path) -> tuple[dict, bool]:
    """{file: good prefix length} and whether any file has a torn last line."""
    n_wl, wl_len = _scan(path / WORKLOADS, None)
    _, rec_len = _scan(path / RECORDS, n_wl)
    sizes = {WORKLOADS: wl_len, RECORDS: rec_len}
    torn = any((path / f).exists() and (path / f).stat().st_size != n for f, n in sizes.items())
    return sizes, torn


@functools.cache
def _database_class():
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    class TuningDatabase(JSONDatabase):
        """MetaSchedule's JSON database, knowing its directory (`.path`) and what it was made for."""

        __slots__ = ("__dict__",)

    return TuningDatabase


def _load(path: Path, files_dir: Path, identity: dict):
    cls = _database_class()
    try:
        db = cls(path_workload=str(files_dir / WORKLOADS), path_tuning_record=str(files_dir / RECORDS),
                 allow_missing=True, module_equality="structural")
    except Exception as e:  # TVM's own parser: a record that is JSON but not a valid schedule
        raise UserError(f"tuning database {path} cannot be loaded ({_first_line(str(e))}); it is damaged: "
                        f"delete it and tune again") from None
    db.path = path
    db.identity = identity
    return db


def open_database(path: str | Path, board, model_path: str | Path, input_shapes=None):
    """The tuning database at `path` for applying at compile time (read-only).

    Raises UserError when it is missing or damaged, or was made for another board, target, model
    (sha256 of the model file) or input shapes. A torn last line left by a killed `edgetvm tune`
    is skipped (the files are not changed: a tune may still be writing to them).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"tuning database {path} does not exist; create it with `edgetvm tune {model_path} "
                        f"--target {board.name} -o {path}`")
    if not path.is_dir() or not (path / IDENTITY).exists():
        raise UserError(f"{path} is not an edgetvm tuning database (no {IDENTITY}); pass the directory "
                        f"written by `edgetvm tune -o`")
    have = _read_identity(path)
    model, inputs = _model_identity(model_path, input_shapes)
    want = _identity(board, model, inputs)
    _check_identity(path, have, want, model_path)
    load_tensor_intrinsics(board.arch)  # tuned traces may tensorize: their intrinsics must be known
    sizes, torn = _check_files(path)
    if not torn:
        return _load(path, path, have)
    with tempfile.TemporaryDirectory(prefix="edgetvm-db-") as tmp:
        for name, n in sizes.items():
            src = path / name
            (Path(tmp) / name).write_bytes(src.read_bytes()[:n] if src.exists() else b"")
        return _load(path, Path(tmp), have)  # JSONDatabase reads everything at construction


def _open_for_tuning(path: Path, board, model: dict, inputs, model_path, stack: contextlib.ExitStack):
    """Creates or reopens the database for `edgetvm tune`, exclusively, repairing a torn last line."""
    want = _identity(board, model, inputs)
    if path.exists() and not path.is_dir():
        raise UserError(f"-o {path} is a file, not a tuning database directory; choose another path")
    if path.is_dir() and not (path / IDENTITY).exists():
        if any(p.name not in (LOCK, BUILD_DIR) for p in path.iterdir()):
            raise UserError(f"-o {path} is a non-empty directory that is not an edgetvm tuning database; "
                            f"choose another path")
    if not path.resolve().parent.is_dir():
        raise UserError(f"-o {path}: directory {path.resolve().parent} does not exist; create it or choose "
                        f"another path")
    try:
        path.mkdir(exist_ok=True)
        lock = stack.enter_context(open(path / LOCK, "w"))
    except OSError as e:
        raise UserError(f"-o {path}: cannot write there ({e.strerror or e}); choose another path") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"another `edgetvm tune` is writing to {path}; wait for it to finish (or stop it) "
                        f"and run this again") from None
    if (path / IDENTITY).exists():
        have = _read_identity(path)
        _check_identity(path, have, want, model_path)
    else:
        want["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        import tvm

        want["tvm_version"] = tvm.__version__
        _write_json(path / IDENTITY, want)
        have = want
    sizes, torn = _check_files(path)
    if torn:  # a killed run's torn last line: cut it, or the next append would glue onto it
        for name, n in sizes.items():
            with open(path / name, "r+b") as f:
                f.truncate(n)
    return _load(path, path, have)


def _write_json(path: Path, doc) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- tasks


def deploy_module(model_path: str | Path, input_shapes=None, target=None):
    """`main` exactly as `edgetvm compile` builds it for `target` (import, shape folding, lifted weights)."""
    from edgetvm.passes import model_import, pipeline

    model, inputs = model_import.prepare(model_path, input_shapes)
    mod, _weights = model_import.import_model(model, inputs)
    _transform, deploy = pipeline.lift_weight_transforms(mod, target=target)
    return deploy, inputs


def legalize(deploy, target):
    """What the compile pipeline hands to MetaScheduleApplyDatabase: legalized and fused, unscheduled."""
    import tvm

    from edgetvm.passes import pipeline

    with target:
        passes = pipeline.fusion_passes(target, database=True)
        names = [p.info.name for p in passes]
        if "MetaScheduleApplyDatabase" not in names:
            raise RuntimeError("passes.pipeline no longer applies a MetaSchedule database")
        return tvm.transform.Sequential(passes[: names.index("MetaScheduleApplyDatabase")])(deploy)


def default_schedule(mod, target):
    """The schedule `edgetvm compile` gives a kernel that no database covers (a Schedule with its trace)."""
    from tvm import s_tir

    from edgetvm.passes.schedule import CPUDefault

    with target:
        sch = CPUDefault().apply(mod["main"], target, False)
    return sch if sch is not None else s_tir.Schedule(mod)


def extract_tasks(deploy, target):
    """MetaSchedule's tuning tasks of the kernels compile builds (those not already scheduled)."""
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(legalize(deploy, target), target)
    return [t for t in tasks if not bool(t.mod.attrs.get("tirx.is_scheduled", False) if t.mod.attrs else False)]


def scheduled_functions(deploy, target, database) -> list[str]:
    """Names of the kernels that `database` gives a tuned schedule when compiling `deploy`."""
    from tvm import relax, tirx

    mod = legalize(deploy, target)
    with target, database:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    return sorted(gv.name_hint for gv, f in mod.functions.items()
                  if isinstance(f, tirx.PrimFunc) and f.attrs is not None
                  and bool(f.attrs.get("tirx.is_scheduled", False)))


# ------------------------------------------------------------------------------- measuring


def load_tensor_intrinsics(arch: str) -> None:
    """Registers the tensor intrinsics MetaSchedule's CPU rules may use for a board of this `arch`.

    TuneContext runs `import tvm.s_tir.tensor_intrin`, which parses every intrinsic of every backend
    with TVMScript: 30-60 s on 2 cores, most of it CUDA's. The package is registered without its
    __init__, and only the module of the board's CPU family is imported (0.5 s for x86, 3 s for ARM).
    """
    import importlib
    import importlib.util

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        import tvm.s_tir

        spec = importlib.util.find_spec(name)
        pkg = importlib.util.module_from_spec(spec)  # its submodules import as usual, on demand
        sys.modules[name] = pkg
        tvm.s_tir.tensor_intrin = pkg
    family = {"aarch64": "arm_cpu", "arm64": "arm_cpu", "riscv64": "riscv_cpu", "x86_64": "x86",
              "amd64": "x86", "i686": "x86"}.get(arch.lower(), "arm_cpu" if arch.lower().startswith("arm") else "x86")
    importlib.import_module(f"{name}.{family}")




def _worker_init() -> None:
    """Build/run worker processes: Ctrl-C in the terminal is the parent's to handle, and a kernel measured
    here runs on TVM's pool as `edgetvm run` sets it up. With TVM's default pool (half the hardware threads
    on x86: one on this 2-core VM) the host's candidates were timed on one thread and deployed on two, and
    VGG's "fastest" records ran 1.27x slower than its untuned build."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from edgetvm.runtime.session import model_threads

    model_threads()


def _direct_session(host: str, port: int, timeout: int, _rpc_config=None):
    from tvm import rpc

    return rpc.connect(host, port, session_timeout=timeout)


def make_builder(cross_compiler: str, root: Path, stop: threading.Event):
    """Builds in this process: LocalBuilder's fresh worker pool per batch spends ~30 s per worker
    importing tvm.s_tir.tensor_intrin on 2 cores, past its 30 s timeout. Writes a .so (through the
    board's cross compiler) that RPC servers load without a compiler of their own."""
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.support import cc

    fcompile = cc.cross_compiler(cross_compiler) if cross_compiler else None
    counter = iter(range(1 << 62))

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for bi in build_inputs:
                if stop.is_set():
                    results.append(BuilderResult(None, INTERRUPTED))
                    continue
                try:
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(bi.mod)
                    lib = tvm.tirx.build(mod, target=bi.target)
                    d = tempfile.mkdtemp(prefix="c", dir=root)  # RemoveBuildArtifact deletes this folder
                    out = os.path.join(d, f"edgetvm_{os.getpid()}_{next(counter)}.so")
                    if fcompile:
                        lib.export_library(out, fcompile=fcompile)
                    else:
                        lib.export_library(out)
                    results.append(BuilderResult(out, None))
                except Exception as e:  # a candidate that does not compile is a failed trial, not a crash
                    results.append(BuilderResult(None, f"{type(e).__name__}: {e}"))
            return results

    return InProcessBuilder()


def make_runner(rpc: str | None, tracker: str | None, key: str | None, session_timeout: int):
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, LocalRunner, RPCConfig, RPCRunner

    from edgetvm.runtime.session import parse_address

    evaluator = EvaluatorConfig(number=3, repeat=1, min_repeat_ms=100, enable_cpu_cache_flush=False)
    if rpc:
        host, port = parse_address(rpc, "--rpc")
        # RPCRunner only knows trackers; a direct server gets its own session function.
        config = RPCConfig(tracker_host=host, tracker_port=port, tracker_key="direct",
                           session_timeout_sec=session_timeout)
        return RPCRunner(config, evaluator, max_workers=1, initializer=_worker_init,
                         f_create_session=functools.partial(_direct_session, host, port, session_timeout))
    if tracker:
        host, port = parse_address(tracker, "--tracker")
        config = RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                           session_timeout_sec=session_timeout)
        return RPCRunner(config, evaluator, max_workers=1, initializer=_worker_init)
    return LocalRunner(timeout_sec=session_timeout, evaluator_config=evaluator, initializer=_worker_init)


def _median_ms(run_secs) -> float | None:
    secs = sorted(float(s) for s in run_secs or [])
    if not secs or secs[0] >= FAILED_SECS:
        return None
    mid = len(secs) // 2
    return 1e3 * (secs[mid] if len(secs) % 2 else (secs[mid - 1] + secs[mid]) / 2)


def _measure(builder, runner, mod, target, where: str, name: str) -> float | None:
    """Latency of one kernel, measured as MetaSchedule measures its candidates; None if interrupted."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    built = builder.build([BuilderInput(mod, target)])[0]
    if built.error_msg == INTERRUPTED:
        return None
    if built.error_msg:
        raise UserError(f"cannot build the untuned kernel of task {name} for {target} "
                        f"({_first_line(built.error_msg)}); check the board's cross compiler")
    try:
        res = runner.run([RunnerInput(built.artifact_path, "cpu", ArgInfo.from_entry_func(mod))])[0]
        res = res.result()
    finally:
        shutil.rmtree(os.path.dirname(built.artifact_path), ignore_errors=True)
    ms_ = _median_ms(res.run_secs) if not res.error_msg else None
    if ms_ is None:
        raise UserError(f"measuring the untuned kernel of task {name} on {where} failed "
                        f"({_first_line(res.error_msg or 'no timing')}); check that the board runs "
                        f"`python -m tvm.exec.rpc_server` with --load-library libtvm_runtime_extra.so "
                        f"(`edgetvm board emulate` does)")
    return ms_


def _first_line(text: str) -> str:
    lines = [l.strip() for l in str(text).strip().splitlines() if l.strip()]
    # TVM errors end with the useful line; Python tracebacks too.
    useful = [l for l in lines if not l.startswith(("File ", "Traceback", "^", "~"))]
    return (useful[-1] if useful else (lines[0] if lines else "unknown error"))[:200]


class _Stopped(Exception):
    pass


def _feed(cost_model, context, candidates, results, train: bool = True) -> None:
    """XGBModel.update, training only once its predictions are used.

    Until it holds num_warmup_samples results the model answers with random scores whatever its
    training, yet it retrains (seconds, growing with the data) after every batch; so the data are
    only stored until then. After that, its own adaptive training (retrain on +20% data) applies.
    """
    enough = cost_model.data_size + len(candidates) >= cost_model.num_warmup_samples
    if not train or not enough:
        cost_model.last_train_size = 1 << 60  # its adaptive-training test then skips training
    elif cost_model.booster is None:
        cost_model.last_train_size = 0
    cost_model.update(context, candidates, results)


def _stoppable(cost_model, stop: threading.Event):
    """The cost model, but its predictions raise once `stop` is set.

    A search round (evolutionary search over a population, in C++) takes tens of seconds on 2 cores
    and cannot be interrupted; it asks the cost model for scores several times per round, so this
    ends it within one generation of a Ctrl-C.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.cost_model import PyCostModel

    @derived_object
    class StoppableCostModel(PyCostModel):
        def load(self, path):
            cost_model.load(path)

        def save(self, path):
            cost_model.save(path)

        def update(self, context, candidates, results):
            _feed(cost_model, context, candidates, results)

        def predict(self, context, candidates):
            if stop.is_set():
                raise _Stopped("interrupted")
            return cost_model.predict(context, candidates)

    return StoppableCostModel()


# ------------------------------------------------------------------------------- progress


@dataclass
class TaskSummary:
    name: str
    weight: int
    budget: int
    trials: int = 0
    untuned_ms: float | None = None  # the default schedule's
    tuned_ms: float | None = None  # the best record's (the default schedule's is one of them)
    exhausted: bool = False
    default_recorded: bool = False

    @property
    def done(self) -> bool:
        return self.trials >= self.budget or self.exhausted

    @property
    def best_ms(self) -> float | None:
        """What the compiled model will use: the tuned kernel if it beats the default."""
        vals = [v for v in (self.tuned_ms, self.untuned_ms) if v is not None]
        return min(vals) if vals else None


@dataclass
class TuneResult:
    path: Path
    board: str
    tasks: list[TaskSummary]
    seconds: float
    new_trials: int
    resumed_trials: int
    interrupted: bool = False
    stopped_by: int | None = None  # the signal that interrupted it
    failures: int = 0
    records: int = 0

    def total(self, attr: str) -> float | None:
        vals = [(t.weight, getattr(t, attr)) for t in self.tasks]
        if any(v is None for _, v in vals):
            return None
        return sum(w * v for w, v in vals)


class _Progress:
    """One carriage-return line on stderr: trials, tasks, best latency so far."""

    def __init__(self, tasks: list[TaskSummary], stream=None, enabled: bool = True):
        self.tasks, self.stream, self.enabled = tasks, stream or sys.stderr, enabled
        self.t0 = time.monotonic()
        self.current: int | None = None
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_len = 0

    def line(self) -> str:
        total = sum(t.budget for t in self.tasks)
        done = sum(min(t.trials, t.budget) if not t.exhausted else t.budget for t in self.tasks)
        frac = done / total if total else 1.0
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        n_done = sum(t.done for t in self.tasks)
        el = int(time.monotonic() - self.t0)
        text = (f"tune [{bar}] trials {sum(t.trials for t in self.tasks)}/{total}  tasks {n_done}/{len(self.tasks)}")
        if self.current is not None:
            t = self.tasks[self.current]
            best = f"{t.tuned_ms:.4g} ms" if t.tuned_ms is not None else "-"
            text += f"  {t.name[:32]} best {best}"
            if t.untuned_ms:
                text += f" (untuned {t.untuned_ms:.4g})"
        est = [t.weight * t.best_ms for t in self.tasks if t.best_ms is not None]
        if len(est) == len(self.tasks):
            text += f"  model est. {sum(est):.4g} ms"
        return text + f"  {el // 60}:{el % 60:02d}"

    def update(self, final: bool = False) -> None:
        if not self.enabled:
            return
        text = self.line()
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns - 1
            text = text[:width]
            pad = max(0, self.last_len - len(text))
            self.stream.write("\r" + text + " " * pad + ("\n" if final else ""))
            self.last_len = len(text)
        else:  # a log file: one line per update, carriage return first for those who tail it
            self.stream.write("\r" + text + "\n")
        self.stream.flush()


# ------------------------------------------------------------------------------- tuning


def check_environment() -> None:
    from importlib import metadata

    try:
        ffi = metadata.version("apache-tvm-ffi")
    except metadata.PackageNotFoundError:
        ffi = None
    if ffi in BAD_TVM_FFI:
        raise UserError(f"apache-tvm-ffi {ffi} crashes MetaSchedule (segfault in tvm.ir.save_json); install "
                        f"the working one: pip install apache-tvm-ffi=={GOOD_TVM_FFI}")
    try:
        import xgboost  # noqa: F401
    except ImportError:
        raise UserError("tuning needs XGBoost for its cost model; install it: pip install xgboost-cpu "
                        "(or pip install 'edgetvm[tune]')") from None


def reset_metaschedule_logging() -> None:
    """Before MetaSchedule sets up its loggers: drop an earlier tune's log files, and log warnings up."""
    import logging

    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for h in list(ms_logger.handlers):
        ms_logger.removeHandler(h)
        h.close()
    ms_logger.setLevel(logging.WARNING)  # becomes the level of its console handler (quiet_metaschedule_console)


def quiet_metaschedule_console() -> None:
    """MetaSchedule logs to files in DB/logs; its console handler would tear the progress line."""
    import logging

    lg = logging.getLogger("tvm.s_tir.meta_schedule")
    for h in list(lg.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            lg.removeHandler(h)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event, log):
    """First Ctrl-C (or SIGTERM): stop searching, keep every measured record, print the summary.

    The search round in progress ends at its next cost-model query, candidates not yet built are
    skipped, the ones being measured finish (seconds). A second Ctrl-C aborts at once (the database
    then loses at most a torn last line, which the next run cuts).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    from edgetvm.runtime.signals import exception_for

    def handler(signum, _frame):
        if stop.is_set():
            raise exception_for(signum)
        stop.signum = signum  # the command exits as this signal asks: 130 for Ctrl-C, 143 for SIGTERM
        stop.set()
        log(f"\n{signal.Signals(signum).name}: stopping; the records measured so far are kept (press again to "
            f"abort at once)")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def tune(model_path: str | Path, board, db_path: str | Path, input_shapes=None, trials: int = 64,
         trials_per_batch: int = 16, rpc: str | None = None, tracker: str | None = None,
         key: str | None = None, session_timeout: int | None = None, seed: int | None = None,
         population: int | None = None, progress: bool = True,
         log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> TuneResult:
    """Tunes every kernel of the model for `board` to `trials` trials, appending to the database."""
    from edgetvm.runtime.session import connect

    t_start = time.monotonic()
    if trials < 1:
        raise UserError(f"--trials {trials}: give a positive number of trials per task")
    if trials_per_batch < 1:
        raise UserError(f"--trials-per-batch {trials_per_batch}: give a positive number")
    if population is not None and population < 2:
        raise UserError(f"--population {population}: give at least 2 (MetaSchedule's default is 512)")
    check_environment()
    remote = rpc or tracker
    where = (rpc if rpc else f"tracker {tracker} key {key}") if remote else "this machine"
    # Unreachable servers, trackers and unknown keys fail here, in seconds, naming the address.
    session = connect(rpc, tracker, key, session_timeout=30)
    del session
    if not remote and not board.runs_on_host():
        import platform

        raise UserError(f"board '{board.name}' ({board.arch}) cannot run kernels on this {platform.machine()} "
                        f"machine; measure on the board with --rpc HOST:PORT or --tracker HOST:PORT --key KEY")
    if board.cross_compiler and not shutil.which(board.cross_compiler):
        raise UserError(f"board '{board.name}' needs the cross compiler {board.cross_compiler}, which is not "
                        f"installed; install it (Debian: g++-aarch64-linux-gnu or g++-arm-linux-gnueabihf)")
    if session_timeout is None:
        session_timeout = 120 if remote else 60

    db_path = Path(db_path)
    model, inputs = _model_identity(model_path, input_shapes)
    with contextlib.ExitStack() as stack:
        db = _open_for_tuning(db_path, board, model, inputs, model_path, stack)
        target = board.target()
        deploy, _ = deploy_module(model_path, input_shapes, target)
        extracted = extract_tasks(deploy, target)
        if not extracted:
            raise UserError(f"{Path(model_path).name} has no kernels to tune (nothing left after "
                            f"legalization); compile it without --tuning-db")
        if population is None:
            # MetaSchedule's default (512) is sized for thousands of trials; a search round over it
            # takes a minute per fused conv on 2 cores. Small budgets get a smaller population.
            population = max(128, min(512, 16 * trials_per_batch))
        return _tune_tasks(db, board, target, extracted, trials, trials_per_batch, remote, where, session_timeout,
                           rpc, tracker, key, seed, population, progress, log, stack, t_start)


def _tune_tasks(db, board, target, extracted, trials, trials_per_batch, remote, where, session_timeout,
                rpc, tracker, key, seed, population, progress, log, stack, t_start) -> TuneResult:
    import tvm
    import tvm_ffi
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback, RemoveBuildArtifact, UpdateCostModel
    from tvm.s_tir.meta_schedule.runner import RunnerResult
    from tvm.s_tir.meta_schedule.task_scheduler.task_scheduler import PyTaskScheduler

    path: Path = db.path
    build_root = path / BUILD_DIR
    shutil.rmtree(build_root, ignore_errors=True)  # what a killed run left
    build_root.mkdir()
    stack.callback(shutil.rmtree, build_root, True)
    stop = threading.Event()
    stack.enter_context(_stop_on_signals(stop, log))

    n_threads = max(1, len(os.sched_getaffinity(0)))
    hashes = [str(tvm_ffi.structural_hash(t.dispatched[0])) for t in extracted]
    cache = {}
    if (path / TASKS).exists():
        with contextlib.suppress(OSError, ValueError, TypeError):
            cache = {t["hash"]: t for t in json.loads((path / TASKS).read_text())["tasks"]}

    # Records already in the database: they count toward the budget and seed the search.
    workloads = [db.commit_workload(t.dispatched[0]) for t in extracted]
    by_task: list[list] = [[] for _ in extracted]
    for rec in db.get_all_tuning_records():
        for i, wl in enumerate(workloads):
            if rec.workload.same_as(wl):
                by_task[i].append(rec)
                break
    summaries = []
    for t, h, recs in zip(extracted, hashes, by_task):
        c = cache.get(h, {})
        s = TaskSummary(name=t.task_name, weight=int(t.weight), budget=trials, untuned_ms=c.get("untuned_ms"),
                        default_recorded=bool(c.get("default_recorded")) and bool(recs))
        s.trials = len(recs) - s.default_recorded
        s.exhausted = "exhausted_at" in c and s.trials >= int(c["exhausted_at"])
        best = [m for m in (_median_ms(r.run_secs) for r in recs) if m is not None]
        s.tuned_ms = min(best) if best else None
        summaries.append(s)
    resumed = sum(s.trials for s in summaries)

    def save_cache():
        _write_json(path / TASKS, {"tasks": [
            {"name": s.name, "hash": h, "weight": s.weight, "untuned_ms": s.untuned_ms,
             "default_recorded": s.default_recorded, **({"exhausted_at": s.trials} if s.exhausted else {})}
            for s, h in zip(summaries, hashes)]})

    log(f"tuning {len(extracted)} task(s) of {db.identity['model']['name']} for {board.name} on {where}: "
        f"{trials} trials per task, database {path}"
        + (f" (resuming: {resumed} trial(s) already there)" if resumed else ""))

    tools: dict = {}

    def measuring():
        """The builder and runner, made on first use (a runner starts worker processes)."""
        if not tools:
            tools["builder"] = make_builder(board.cross_compiler, build_root, stop)
            tools["runner"] = runner = make_runner(rpc, tracker, key, session_timeout)
            # Its worker processes go with this run, not whenever the garbage collector gets to them.
            stack.callback(lambda: getattr(runner, "pool", None) and runner.pool.shutdown(wait=True))
        return tools["builder"], tools["runner"]

    # Each kernel's default schedule (what compile does without a database) is measured once and goes
    # into the database as a record: compile then picks the faster of it and the best trial, so
    # tuning never makes a kernel slower than untuned; and the table has its baseline.
    todo = [i for i, s in enumerate(summaries) if s.untuned_ms is None]
    for n, i in enumerate(todo):
        if stop.is_set():
            break
        if progress and (sys.stderr.isatty() or n == 0):
            text = f"measuring the untuned kernels {n + 1}/{len(todo)}: {summaries[i].name[:40]}"
            print("\r" + text.ljust(80) if sys.stderr.isatty() else f"measuring the untuned kernels of "
                  f"{len(todo)} task(s)", end="" if sys.stderr.isatty() else "\n", file=sys.stderr, flush=True)
        mod = extracted[i].dispatched[0]
        sch = default_schedule(mod, target)
        got = _measure(*measuring(), sch.mod, target, where, summaries[i].name)
        if got is None:
            break
        summaries[i].untuned_ms = got
        summaries[i].tuned_ms = min(got, summaries[i].tuned_ms or got)
        with contextlib.suppress(Exception):  # a default schedule whose trace does not replay: no record
            from tvm import s_tir

            replay = s_tir.Schedule(mod)
            sch.trace.apply_to_schedule(replay, remove_postproc=False)
            if tvm_ffi.structural_equal(replay.mod, sch.mod):
                db.commit_tuning_record(ms.database.TuningRecord(
                    sch.trace, workloads[i], [tvm.tirx.FloatImm("float32", got / 1e3)], target,
                    ms.arg_info.ArgInfo.from_entry_func(mod)))
                summaries[i].default_recorded = True
        save_cache()
    if todo and progress and sys.stderr.isatty():
        print(file=sys.stderr)

    # Slowest first: an interrupted run has spent its time where it pays most.
    order = sorted(range(len(extracted)),
                   key=lambda i: (-(summaries[i].weight * (summaries[i].untuned_ms or 0)), i))

    pending = [i for i in order if not summaries[i].done]
    if not pending or stop.is_set():
        return TuneResult(path=path, board=board.name, tasks=summaries, seconds=time.monotonic() - t_start,
                          new_trials=0, resumed_trials=resumed, interrupted=stop.is_set(),
                          stopped_by=getattr(stop, "signum", None), records=len(db))

    # Search contexts, the cost model seeded with every record so far.
    load_tensor_intrinsics(board.arch)
    reset_metaschedule_logging()
    contexts, _weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted, work_dir=str(path), space="post-order-apply",
        strategy=ms.search_strategy.EvolutionarySearch(population_size=population), num_threads=n_threads,
        seed=seed)
    quiet_metaschedule_console()
    cost_model = ms.cost_model.XGBModel(num_tuning_cores=n_threads, adaptive_training=True)
    search_cost_model = _stoppable(cost_model, stop)
    # Its data: every record so far. Training is put off (a retrain per task would take minutes)
    # to the first batch of new results, which then trains on everything.
    for ctx, recs in zip(contexts, by_task):
        cands, results = [], []
        for r in recs:
            with contextlib.suppress(Exception):  # a trace that no longer replays is skipped
                cand = r.as_measure_candidate()
                cands.append(cand)
                results.append(RunnerResult([float(s) for s in r.run_secs], None))
        if cands:
            _feed(cost_model, ctx, cands, results, train=False)
    cost_model.last_train_size = 0 if cost_model.data_size >= cost_model.num_warmup_samples else 1 << 60

    prog = _Progress(summaries, enabled=progress)
    counters = {"new": 0, "failures": 0}
    group_ids: list[int] = []  # task id in the running TaskScheduler -> index into `extracted`

    @derived_object
    class RecordAndReport(PyMeasureCallback):
        """MetaSchedule's AddToDatabase, minus candidates an interrupt kept from being built; and progress."""

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            i = group_ids[task_id]
            s = summaries[i]
            workload = db.commit_workload(contexts[i].mod)
            for cand, built, res in zip(measure_candidates, builder_results, runner_results):
                if built.error_msg == INTERRUPTED:
                    continue
                run_secs = res.run_secs if res.run_secs is not None and not res.error_msg else None
                if run_secs is None:
                    run_secs = [tvm.tirx.FloatImm("float32", 1e10)]
                    counters["failures"] += 1
                db.commit_tuning_record(ms.database.TuningRecord(
                    cand.sch.trace, workload, run_secs, contexts[i].target, cand.args_info))
                s.trials += 1
                counters["new"] += 1
                m = _median_ms(run_secs)
                if m is not None and (s.tuned_ms is None or m < s.tuned_ms):
                    s.tuned_ms = m
            prog.current = i
            prog.update()

    @derived_object
    class InOrder(PyTaskScheduler):
        """One task at a time to its budget, in the given order; stops scheduling on Ctrl-C."""

        def next_task_id(self) -> int:
            outer = self._outer()
            for tid, rec in enumerate(outer.tasks_):
                if rec.is_terminated:
                    continue
                if rec.measure_candidates is not None:  # its batch is out: collect it (runs callbacks)
                    outer.join_running_task(tid)
                if stop.is_set():
                    return -1
                prog.current = group_ids[tid]
                return tid
            return -1

    callbacks = [RecordAndReport(), RemoveBuildArtifact(), UpdateCostModel()]

    # Each call to the scheduler gives its tasks one budget; a resumed run has tasks with different
    # remainders, so consecutive tasks (in tuning order) with the same remainder go together.
    builder, runner = measuring()
    prog.update()
    while pending and not stop.is_set():
        left = trials - summaries[pending[0]].trials
        group = [pending[0]]
        for i in pending[1:]:
            if trials - summaries[i].trials != left:
                break
            group.append(i)
        group_ids[:] = group
        try:
            ms.tune.tune_tasks(
                tasks=[contexts[i] for i in group], task_weights=[float(extracted[i].weight) for i in group],
                work_dir=str(path), max_trials_global=left * len(group), max_trials_per_task=left,
                num_trials_per_iter=min(trials_per_batch, left), builder=builder, runner=runner,
                database=db, cost_model=search_cost_model, measure_callbacks=callbacks,
                task_scheduler=InOrder())
        except Exception:
            if not stop.is_set():
                raise
            # Ctrl-C during a search round: _stoppable ended it; the records so far are all committed.
        if not stop.is_set():
            for i in group:
                if summaries[i].trials < trials:
                    # The search found nothing new to measure: more trials would not help.
                    summaries[i].exhausted = True
        save_cache()
        pending = [i for i in pending if not summaries[i].done]
    prog.current = None
    prog.update(final=True)
    result = TuneResult(path=path, board=board.name, tasks=summaries, seconds=time.monotonic() - t_start,
                        new_trials=counters["new"], resumed_trials=resumed, interrupted=stop.is_set(),
                        stopped_by=getattr(stop, "signum", None), failures=counters["failures"], records=len(db))
    return result


# ------------------------------------------------------------------------------- command line


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def print_summary(res: TuneResult, out=None) -> None:
    """Per task: calls per inference, trials, untuned (default schedule) and tuned ms, speed-up."""
    out = out or sys.stdout
    rows = []
    for t in res.tasks:
        note = " (space exhausted)" if t.exhausted else ""
        kept = t.untuned_ms is not None and t.best_ms is not None and t.best_ms >= t.untuned_ms
        speed = f"{t.untuned_ms / t.best_ms:.2f}x" if t.untuned_ms and t.best_ms else "-"
        rows.append([t.name, str(t.weight), f"{t.trials}{note}", _fmt_ms(t.untuned_ms), _fmt_ms(t.best_ms),
                     speed + (" (untuned kept)" if kept and t.trials else "")])
    un, best = res.total("untuned_ms"), res.total("best_ms")
    rows.append(["total (x calls)", "", str(sum(t.trials for t in res.tasks)), _fmt_ms(un), _fmt_ms(best),
                 f"{un / best:.2f}x" if un and best else "-"])
    header = ["task", "calls", "trials", "untuned ms", "tuned ms", "speed-up"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for n, r in enumerate([header] + rows):
        if n == len(rows):
            print("  ".join("-" * w for w in widths), file=out)
        cells = [c.ljust(w) if k in (0, 5) else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))]
        print("  ".join(cells).rstrip(), file=out)
    print("untuned: the default schedule compile uses without a database; tuned: the fastest record, which "
          "compile --tuning-db applies (kernel times as MetaSchedule measures them)", file=out)


def cmd_tune(args) -> None:
    from edgetvm.targets import load_board

    board = load_board(args.target)
    shapes = dict(args.input_shape or [])
    res = tune(args.model, board, args.output, shapes, trials=args.trials, trials_per_batch=args.trials_per_batch,
               rpc=args.rpc, tracker=args.tracker, key=args.key, session_timeout=args.timeout, seed=args.seed,
               population=args.population,
               progress=not args.no_progress)
    print(f"tuned {Path(args.model).name} for {board.name} in {res.seconds:.0f} s: {res.new_trials} new trial(s)"
          + (f" ({res.failures} failed)" if res.failures else "")
          + (f", {res.resumed_trials} from earlier runs" if res.resumed_trials else "")
          + f"; {res.records} record(s) in {res.path}")
    print_summary(res)
    shape_args = "".join(f" --input-shape {k}:{','.join(map(str, v))}" for k, v in shapes.items())
    print(f"apply with: edgetvm compile {args.model} --target {board.name}{shape_args} --tuning-db {res.path} "
          f"-o OUT")
    if res.interrupted:
        print(f"edgetvm: tuning interrupted; the records found are kept in {res.path}: run the same command "
              f"again to continue", file=sys.stderr)
        from edgetvm.runtime.signals import exception_for

        raise exception_for(res.stopped_by or signal.SIGINT)


def add_tune_parser(subparsers) -> None:
    from edgetvm.cli import _shape_arg

    s = subparsers.add_parser(
        "tune", help="search faster kernels for a board (MetaSchedule + XGBoost), into a database",
        description="Tune the kernels of an ONNX or TFLite model for a board with MetaSchedule's evolutionary search "
                    "and XGBoost cost model, measuring candidates on this machine or on the board over RPC. "
                    "Records go to a database directory that `edgetvm compile --tuning-db` applies. Running "
                    "the same command again continues from the database; Ctrl-C stops and keeps the records.")
    s.add_argument("model", help="the .onnx or .tflite file")
    s.add_argument("--target", "-t", default="host", help="board name (see `edgetvm targets`); default host")
    s.add_argument("--input-shape", action="append", type=_shape_arg, metavar="NAME:D1,D2,...",
                   help="static shape for an input with dynamic dims (as for compile)")
    s.add_argument("--trials", type=int, default=64, metavar="N",
                   help="measured candidates per task, records already in the database included (default 64)")
    s.add_argument("--trials-per-batch", type=int, default=16, metavar="K",
                   help="candidates per search round; the cost model retrains after each (default 16)")
    s.add_argument("-o", "--output", required=True, metavar="DB", help="tuning database directory "
                   "(created, or continued if it exists)")
    s.add_argument("--rpc", metavar="HOST:PORT", help="measure on the board serving TVM RPC here")
    s.add_argument("--tracker", metavar="HOST:PORT", help="measure on a board registered with this RPC tracker")
    s.add_argument("--key", help="the board's key at the tracker")
    s.add_argument("--timeout", type=int, metavar="SEC", help="per-candidate run timeout (default 60 here, "
                   "120 over RPC)")
    s.add_argument("--population", type=int, metavar="P", help="evolutionary search population (default "
                   "16 x trials per batch, 128 to 512; MetaSchedule's own default is 512)")
    s.add_argument("--seed", type=int, help="random seed of the search")
    s.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    s.set_defaults(func=cmd_tune)
