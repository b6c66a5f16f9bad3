"""The IO binding kept across runs (session.BoundRuns): what is bound again, what is fetched, and that a cache
bound once still gives the logits a fresh binding gives, whatever the order in which caches are used."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np

from dsedge.runtime.session import BoundRuns


class _Binding:
    def __init__(self, log):
        self.log, self.outputs = log, {}

    def bind_input(self, name, device, device_id, dtype, shape, address):
        self.log.append(("in", name, address))

    def bind_output(self, name, device, *placement):
        self.log.append(("out", name, placement[-1] if placement else None))
        self.outputs[name] = None

    def get_outputs(self):  # in binding order, as onnxruntime returns them
        self.log.append(("fetch",))
        return [_Value(np.full(2, 7.0)) for _ in self.outputs]


class _Value:
    def __init__(self, array):
        self.array = array

    def numpy(self):
        return self.array.copy()


class _Session:
    """Records every bind and fetch; ``bindings`` counts the bindings made."""

    def __init__(self):
        self.log, self.bindings = [], 0

    def io_binding(self):
        self.bindings += 1
        return _Binding(self.log)

    def run_with_iobinding(self, binding, run_options=None):
        self.log.append(("run",))


def _binds(log):
    return [entry[:2] for entry in log if entry[0] in ("in", "out")]


def test_a_cache_bound_once_is_not_bound_again_but_new_arrays_are():
    session = _Session()
    runs = BoundRuns(session, ["ids", "past"], ["logits", "present"])
    cache = np.zeros((1, 2, 8, 4), np.float32)
    runs.run({"ids": np.array([[1]]), "past": cache}, {"present": cache})
    assert _binds(session.log) == [("in", "ids"), ("in", "past"), ("out", "logits"), ("out", "present")]
    session.log.clear()
    result = runs.run({"ids": np.array([[2]]), "past": cache}, {"present": cache})
    # the small input is a new array (bound again); the cache is the same array (not bound again); the logits,
    # which onnxruntime allocates, are bound afresh each run and fetched
    assert _binds(session.log) == [("in", "ids"), ("out", "logits")]
    assert ("fetch",) in session.log and result["present"] is cache and result["logits"].tolist() == [7.0, 7.0]
    other = np.zeros_like(cache)
    session.log.clear()
    runs.run({"ids": np.array([[3]]), "past": other}, {"present": other})
    assert _binds(session.log) == [("in", "ids"), ("in", "past"), ("out", "logits"), ("out", "present")]
    assert [entry[2] for entry in session.log if entry[:2] == ("in", "past")] == [other.ctypes.data]


def test_a_freed_array_is_bound_anew_and_not_kept_alive():
    session = _Session()
    runs = BoundRuns(session, ["past"], ["present"])
    cache = np.zeros((4, 4), np.float32)
    runs.run({"past": cache}, {"present": cache})
    ref = weakref.ref(cache)
    del cache
    gc.collect()
    assert ref() is None  # the binding holds no reference
    session.log.clear()
    again = np.zeros((4, 4), np.float32)
    runs.run({"past": again}, {"present": again})
    assert _binds(session.log) == [("in", "past"), ("out", "present")]


def test_nothing_is_fetched_when_every_output_is_bound_in_place():
    session = _Session()
    runs = BoundRuns(session, ["x"], ["logits", "present"])
    logits, cache = np.zeros(2, np.float32), np.zeros(3, np.float32)
    result = runs.run({"x": cache}, {"logits": logits, "present": cache})
    assert ("fetch",) not in session.log and result["logits"] is logits and result["present"] is cache


def test_each_thread_has_its_own_binding():
    session = _Session()
    runs = BoundRuns(session, ["x"], ["y"])
    runs.run({"x": np.zeros(1)}, {"y": np.zeros(1)})
    thread = threading.Thread(target=runs.run, args=({"x": np.zeros(1)}, {"y": np.zeros(1)}))
    thread.start()
    thread.join()
    runs.run({"x": np.zeros(1)}, {"y": np.zeros(1)})
    assert session.bindings == 2
