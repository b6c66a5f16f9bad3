"""ONNX session creation and per-graph timing: a leaf that the engine and retrieval's embedder both use."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFail


@dataclass(frozen=True)
class SessionConfig:
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int | None = None
    # onnxruntime's pool threads spin after each run. With several sessions run in turn (a partitioned
    # bundle runs ~2 per layer) the idle pools spin against the active one: on ds3bench under load,
    # decode took 447 ms/token spinning vs 40 without (monolithic 61 vs 36). A single monolithic session on
    # cores it has to itself gains 17–44% from spinning (issue #12). None: decided per layout (``for_layout``).
    spin: bool | None = None
    # onnxruntime's per-node profiler (a JSON trace per session under this prefix); `dsedge profile` uses it
    # for one extra trial to split a monolithic graph's time by layer and operator.
    profile_prefix: str | None = None
    # One CPU arena for all sessions (onnxruntime's environment allocator) instead of one per session. A
    # partitioned bundle runs hundreds of sessions in turn (V2-Lite cut to 8 layers: 458), each arena grown to
    # its own prefill peak and kept: a 512-token prefill took the 2.6 GiB bundle to an 8.1 GiB peak RSS and
    # 15 s; with the shared arena 3.0 GiB and 4.3 s (benchmarks/README.md, issue 13). None: per layout.
    shared_arena: bool | None = None
    # One intra-op thread pool for the whole process (onnxruntime's global pool) instead of one per session.
    # A partitioned bundle runs ~2 sessions per layer in turn, each waking its own pool's sleeping worker: on
    # ds3bench int4 partitioned decode went 152-182 → 213-233 tokens/s with the global pool (monolithic:
    # 272). Once the pool exists every later session of the process must use it (onnxruntime refuses
    # per-session threads then, to other code's sessions too), sized as the first asked. None: on for
    # partitioned bundles in a process that declared its sessions dsedge's (``own_process_threads``: the CLI
    # does), else off.
    shared_threads: bool | None = None

    def for_layout(self, layout: str) -> SessionConfig:
        """The automatic policies. Spinning: on for one monolithic session, off for partitioned bundles (many
        sessions in turn); an explicit ``spin`` is kept (force it off when other work shares the cores).
        The shared arena: on for partitioned bundles. The process-wide thread pool: on for partitioned
        bundles where the process is dsedge's (``own_process_threads``)."""
        spin = self.spin if self.spin is not None else layout == "monolithic"
        shared = self.shared_arena if self.shared_arena is not None else layout == "partitioned"
        pool = self.shared_threads if self.shared_threads is not None else \
            layout == "partitioned" and bool(_owned_process)
        return replace(self, spin=spin, shared_arena=shared, shared_threads=pool)


log = logging.getLogger(__name__)
_warned_providers: set[str] = set()


class GraphTimers:
    """Wall time and calls per graph (session.run), so a profile can say where each token's time went."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


class TimedSession:
    """An InferenceSession whose ``run`` is timed under the graph's name (two perf_counter calls per run)."""

    def __init__(self, session: ort.InferenceSession, name: str, timers: GraphTimers):
        self._session, self._name, self._timers = session, name, timers

    def run(self, output_names, feeds, run_options=None):
        started = time.perf_counter()
        try:
            return self._session.run(output_names, feeds, run_options)
        finally:
            self._timers.add(self._name, time.perf_counter() - started)

    def run_with_iobinding(self, binding, run_options=None):
        started = time.perf_counter()
        try:
            return self._session.run_with_iobinding(binding, run_options)
        finally:
            self._timers.add(self._name, time.perf_counter() - started)

    def __getattr__(self, attr):
        return getattr(self._session, attr)


class BoundRuns:
    """Runs of one session with IO binding: each output named in ``in_place`` is written into that (contiguous)
    array, which is also bound as whatever input is the same array, so a cache buffer is read and updated
    without a copy. The other outputs come back as new arrays. CPU only (the arrays live in host memory).

    One binding is kept per thread across runs, and the very array bound under a name on the previous run is
    not bound again: the cache buffers (two per layer) are bound once per cache instead of every step. A fresh
    binding of every tensor cost ~0.2 ms of qwen2bench's 2.1 ms int4 decode step (benchmarks/binding_ab.py,
    benchmarks/README.md session 14).
    """

    def __init__(self, session, input_names, output_names):
        self._session, self._inputs, self._outputs = session, list(input_names), list(output_names)
        self._local = threading.local()

    def run(self, values: dict[str, np.ndarray], in_place: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding, bound = self._binding()
        keep = []  # contiguous copies must outlive the run
        for name in self._inputs:
            array = values[name]
            if not array.flags.c_contiguous:
                array = np.ascontiguousarray(array)
                keep.append(array)
            _bind(bound, name, name, array, binding.bind_input)
        for name in self._outputs:
            target = in_place.get(name)
            if target is None:  # onnxruntime allocates it, at this run's shape
                binding.bind_output(name, "cpu")
                bound.pop((name, "out"), None)
            else:
                _bind(bound, (name, "out"), name, target, binding.bind_output)
        self._session.run_with_iobinding(binding)
        if all(name in in_place for name in self._outputs):  # wrapping every output costs 13–50 µs a run
            return {name: in_place[name] for name in self._outputs}
        outputs = binding.get_outputs()
        return {name: in_place[name] if name in in_place else value.numpy()
                for name, value in zip(self._outputs, outputs, strict=True)}

    def _binding(self):
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = (self._session.io_binding(), {})
        return state


def _bind(bound: dict, key, name: str, array: np.ndarray, bind) -> None:
    """``bind`` ``array`` as ``name`` unless that very array is recorded under ``key`` in ``bound``. A weak
    reference, so a binding never keeps an array alive (a dropped cache is freed; a freed array is bound
    anew), and identity, since an array's address, shape and dtype do not change under it (nothing here
    reshapes or resizes arrays in place)."""
    ref = bound.get(key)
    if ref is None or ref() is not array:
        bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        bound[key] = weakref.ref(array)


_registered_arena: list[bool] = []


def _shared_cpu_arena() -> bool:
    """Register the process's shared CPU arena with onnxruntime's environment once (growing by what is
    requested, not to the next power of two); False when this onnxruntime cannot (sessions keep their own)."""
    if not _registered_arena:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # 1: kSameAsRequested
            _registered_arena.append(True)
        except (AttributeError, RuntimeError, OrtFail) as exc:
            log.warning("onnxruntime could not register a shared CPU arena (%s): each session keeps its own", exc)
            _registered_arena.append(False)
    return _registered_arena[0]


_owned_process: list[bool] = []  # set by own_process_threads
_process_pool: list[int] = []  # the intra-op size of the process-wide pool, once created (0: cores)
_warned_threads: set[int] = set()


def own_process_threads() -> None:
    """Declare every onnxruntime session of this process dsedge's (the CLI's entry point does): partitioned
    bundles may then create onnxruntime's process-wide thread pool, after which onnxruntime refuses sessions
    with their own threads — fine for dsedge's sessions (all made here), fatal for other code's."""
    if not _owned_process:
        _owned_process.append(True)


def _uses_process_pool(config: SessionConfig) -> bool:
    """Whether a session runs on the process-wide thread pool: always once it exists (onnxruntime then refuses
    per-session threads), else when ``config.shared_threads`` asks for it and it can be created now."""
    if not _process_pool:
        if not config.shared_threads:
            return False
        try:
            from onnxruntime.capi.onnxruntime_pybind11_state import set_global_thread_pool_sizes

            set_global_thread_pool_sizes(config.threads or 0, 1)  # takes effect when the environment is created
        except (ImportError, RuntimeError, OrtFail) as exc:
            log.warning("onnxruntime could not create a process-wide thread pool (%s): sessions keep their own",
                        exc)
            return False
        _process_pool.append(config.threads or 0)
    elif config.threads and config.threads != _process_pool[0] and config.threads not in _warned_threads:
        _warned_threads.add(config.threads)
        log.warning("onnxruntime's process-wide thread pool has %s intra-op threads; this session asked for %d "
                    "and runs on it (load bundles that need other counts in their own process)",
                    _process_pool[0] or "the default", config.threads)
    return True


def _onnxruntime_errors() -> tuple[type[BaseException], ...]:
    """What onnxruntime raises when it cannot load a graph: its own exception classes (plain Exceptions) and the
    RuntimeError its Python layer raises."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return (RuntimeError, *(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type)))


ORT_ERRORS = _onnxruntime_errors()


def make_session(path: Path | bytes, config: SessionConfig, *, data_root: Path | None = None,
                 stem: str = "decoder", custom_ops_library: str | None = None) -> ort.InferenceSession:
    """A session of the ONNX file ``path``, or of a serialized model (``bytes``, e.g. a composed graph) whose
    external-data locations are relative to ``data_root``; ``stem`` names a serialized model's profile;
    ``custom_ops_library``: a shared library of custom ops the graph uses (dsedge.runtime.streamed)."""
    options = ort.SessionOptions()
    if custom_ops_library:
        options.register_custom_ops_library(custom_ops_library)
    if config.profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = f"{config.profile_prefix}{stem if isinstance(path, bytes) else path.stem}"
    if data_root is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_root))
    if _uses_process_pool(config):
        options.use_per_session_threads = False
    elif config.threads:
        options.intra_op_num_threads = config.threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spin else "0")
    if config.shared_arena and _shared_cpu_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    available = set(ort.get_available_providers())
    providers = [p for p in config.providers if p in available] or ["CPUExecutionProvider"]
    missing = [p for p in config.providers if p not in available]
    if missing and not _warned_providers.intersection(missing):
        _warned_providers.update(missing)
        log.warning("execution provider(s) %s not available in this onnxruntime build (%s); using %s",
                    ", ".join(missing), ", ".join(sorted(available)), ", ".join(providers))
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, sess_options=options, providers=providers)
