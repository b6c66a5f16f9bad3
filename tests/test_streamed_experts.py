"""Missed expert partitions run from the bundle's file by the dsedge-kernels MoEInt4 op (dsedge.runtime.streamed):
the same tokens as loading the partitions' sessions, nothing loaded or evicted at a miss, the files verified, the
kernel against onnxruntime's QMoE, and every partition the kernel does not take left to the stock path.

The fixture is a DeepSeek-V3-shaped checkpoint with widths of 128 (the kernel's activation layout), int4 in
groups of 128 (the kernel's vector path) and of 32 (its scalar block loop)."""

import json
import mmap
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from dsedge.manifest import BundleError
from dsedge.runtime import load_bundle
from dsedge.runtime.session import ORT_ERRORS
from dsedge.runtime.streamed import KERNEL_DOMAIN, SHARED_NAMES, NotStreamable, kernel_library, streamable_graph

dsedge_kernels = pytest.importorskip("dsedge_kernels", reason="dsedge-kernels is not installed (pip install ./kernels)")
if not dsedge_kernels.supported():
    pytest.skip("this CPU has neither AVX-512 VNNI nor AVX2 with FMA: the runtime keeps onnxruntime's ops",
                allow_module_level=True)

WIDE_DS3 = {"hidden_size": 128, "intermediate_size": 256, "kv_lora_rank": 32, "moe_intermediate_size": 128,
            "n_group": 4, "n_routed_experts": 8, "num_attention_heads": 2, "num_key_value_heads": 2,
            "num_experts_per_tok": 2, "topk_group": 2, "num_hidden_layers": 3, "q_lora_rank": 48,
            "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "max_position_embeddings": 256}
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [7]]


def _recipe(group: int) -> dict:
    rule = {"match": "re:.*", "quant": {"bits": 4, "group_size": group}}
    return {"name": f"g{group}", "method": "rtn", "rules": [rule]}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """{group: partitioned bundle (two experts per partition, validated)}, the int8 per-channel one and a
    half-precision export of the g128 checkpoint."""
    import torch
    import transformers

    from dsedge.compress.pipeline import compress
    from dsedge.export.bundle import export_bundle
    from dsedge.testing.bench import BENCH_CONFIGS, add_tokenizer
    from dsedge.testing.tokenizer import VOCAB_SIZE

    root = tmp_path_factory.mktemp("streamed")
    config = transformers.AutoConfig.for_model(**{**BENCH_CONFIGS["ds3bench"], **WIDE_DS3, "vocab_size": VOCAB_SIZE})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(root / "ckpt")
    add_tokenizer(root / "ckpt")
    out = {}
    for name, recipe in (("g128", _recipe(128)), ("g32", _recipe(32)), ("int8", "int8")):
        if isinstance(recipe, dict):
            (root / f"{name}.json").write_text(json.dumps(recipe))
            recipe = root / f"{name}.json"
        compress(root / "ckpt", root / f"{name}.ckpt", recipe=recipe, calib_tokens=32, evaluate=False)
        report = export_bundle(root / f"{name}.ckpt", root / f"{name}.bundle", max_context=64,
                               layout="partitioned", experts_per_partition=2)
        assert all(c["passed"] for c in report.validation)
        out[name] = root / f"{name}.bundle"
    export_bundle(root / "g128.ckpt", root / "fp16.bundle", max_context=64, layout="partitioned",
                  experts_per_partition=2, dtype="fp16", validate=False)
    out["fp16"] = root / "fp16.bundle"
    return out


def _budget(bundle) -> int:
    """Room for two partitions: most of a step's routes miss."""
    ranking = load_bundle(bundle).manifest.contract.placement.ranking
    return 2 * max(p.bytes for p in ranking)


def _logits(engine, prompt, steps=6):
    cache = engine.new_cache(max_len=len(prompt) + steps + 1)
    rows = [engine.forward(np.asarray([prompt]), np.ones((1, len(prompt)), np.int64), cache, last_only=True)]
    for i in range(steps):
        token = int(np.argmax(rows[-1].reshape(-1, rows[-1].shape[-1])[-1]))
        rows.append(engine.forward(np.asarray([[token]]), np.ones((1, len(prompt) + i + 1), np.int64), cache))
    return np.concatenate([r.reshape(-1, r.shape[-1])[-1:] for r in rows])


@pytest.mark.parametrize("group", ["g128", "g32"])
def test_misses_run_from_the_file_with_the_stock_tokens(bundles, group, monkeypatch):
    bundle = bundles[group]
    budget = _budget(bundle)
    monkeypatch.setenv("DSEDGE_KERNELS", "0")
    stock = load_bundle(bundle, memory_budget_bytes=budget)
    assert stock.experts.streamer is None
    monkeypatch.setenv("DSEDGE_KERNELS", "1")
    streamed = load_bundle(bundle, memory_budget_bytes=budget)
    assert streamed.experts.streamer is not None
    pinned = set(streamed.experts.loaded)
    # int8 activations on both sides, summed in another order: measured ≤ 5e-7 of logits up to 0.87. Blocks of 32
    # off the AVX-512 path take the kernel's plain C quantization, and on an AVX2 CPU MLAS rounds some activation
    # on a rounding boundary one step apart from it (4.8e-3 of logits up to 0.80, 2026-12-07; tokens identical)
    exact = group == "g128" or dsedge_kernels.vector_path() == "avx512-vnni"
    for prompt in PROMPTS:
        assert streamed.greedy(prompt, 10) == stock.greedy(prompt, 10)
        a, b = _logits(stock, prompt), _logits(streamed, prompt)
        assert np.abs(a - b).max() <= (1e-5 if exact else 1e-2) * np.abs(a).max()
    stats = streamed.experts.stats
    assert stats.misses > 0 and stats.streamed == stats.misses  # every miss streamed...
    assert stats.evictions == 0 and set(streamed.experts.loaded) == pinned  # ...and nothing loaded for it
    assert stock.experts.stats.streamed == 0 and stock.experts.stats.evictions > 0


def test_everything_resident_needs_no_kernel(bundles):
    engine = load_bundle(bundles["g128"])
    assert engine.decoder is not None and engine.experts.streamer is None  # the composed graph, stock ops


def test_the_rewritten_partition_graph(bundles):
    bundle = bundles["g128"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    part = next(g for g in manifest["graphs"] if g["role"] == "experts")
    path = bundle / part["file"]
    original = onnx.load(str(path), load_external_data=False)
    graph = streamable_graph(path.read_bytes())
    weights = graph.weights
    rewritten = onnx.load_from_string(graph.model)
    onnx.checker.check_model(rewritten)
    ops = [(n.domain, n.op_type) for n in rewritten.graph.node]
    assert ("com.microsoft", "QMoE") not in ops and ops.count((KERNEL_DOMAIN, "MoEInt4")) == 1
    qmoe = next(n for n in original.graph.node if n.op_type == "QMoE")
    moved = [qmoe.input[i] for i in (2, 3, 5, 6)]
    assert [w.name for w in weights] == moved
    stored = {t.name: t for t in original.graph.initializer}
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in rewritten.graph.input}
    for role, w in zip(SHARED_NAMES, weights, strict=True):  # inputs named by their role: the same in every partition
        where = {e.key: e.value for e in stored[w.name].external_data}
        assert (w.location, w.offset) == (where["location"], int(where.get("offset", 0)))
        assert inputs[role] == list(stored[w.name].dims) == list(w.dims)
    moe = next(n for n in rewritten.graph.node if n.op_type == "MoEInt4")
    assert list(moe.input[2:6]) == list(SHARED_NAMES)
    assert graph.constants  # the partition's range, among others, now fed
    for name, value in graph.constants.items():
        np.testing.assert_array_equal(value, onnx.numpy_helper.to_array(stored[name]))
        assert inputs[name] == list(value.shape)
    assert {t.name for t in rewritten.graph.initializer} == set(stored) - set(moved) - set(graph.constants)
    assert (KERNEL_DOMAIN, 1) in [(o.domain, o.version) for o in rewritten.opset_import]


def test_a_constant_that_is_also_an_input_stays_an_initializer(bundles):
    """ONNX lets an initializer be an input's default; feeding it as a second input of that name would not be."""
    chosen = []

    def declare(model, node):
        small = next(t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
        chosen.append(small.name)
        model.graph.input.append(helper.make_tensor_value_info(small.name, small.data_type, list(small.dims)))

    graph = streamable_graph(_qmoe_graph(bundles, declare))
    assert chosen[0] not in graph.constants and graph.constants
    rewritten = onnx.load_from_string(graph.model)
    names = [i.name for i in rewritten.graph.input]
    assert len(names) == len(set(names)) and chosen[0] in {t.name for t in rewritten.graph.initializer}
    onnx.checker.check_model(rewritten)


def test_partitions_alike_share_one_session(bundles, monkeypatch):
    """Every partition of every layer has the same graph but for its weights and range: the misses run in one
    session per distinct rewritten graph, each partition with its own feeds (the tokens stay the stock ones,
    test_misses_run_from_the_file_with_the_stock_tokens)."""
    bundle = bundles["g128"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    parts = [g for g in manifest["graphs"] if g["role"] == "experts"]
    distinct = {streamable_graph((bundle / g["file"]).read_bytes()).model for g in parts}
    assert len(distinct) <= len(parts) // 2  # here 2 graphs for 8 partitions (V2-Lite-8: 4 for 448)
    engine = load_bundle(bundle, memory_budget_bytes=_budget(bundle))
    for prompt in PROMPTS:
        engine.greedy(prompt, 10)
    streamer = engine.experts.streamer.__self__
    streamed = {name: s for name, s in streamer.sessions.items() if s is not None}
    assert len(streamed) > len(streamer.shared) >= 1
    def bare(session):  # the InferenceSession inside the per-partition timer
        return getattr(session, "_session", session)

    assert {bare(s._session) for s in streamed.values()} <= {bare(s) for s in streamer.shared.values()}
    layer_of = {g["name"]: g["layer"] for g in parts}
    for layer in set(layer_of.values()):  # a layer's partitions feed each its own range
        mine = [s for name, s in streamed.items() if layer_of[name] == layer]
        assert len({tuple(tuple(a.ravel()) for a in s.weights.values() if a.size <= 64) for s in mine}) == len(mine)


def _qmoe_graph(bundles, edit) -> bytes:
    manifest = json.loads((bundles["g128"] / "manifest.json").read_text())
    part = next(g for g in manifest["graphs"] if g["role"] == "experts")
    model = onnx.load(str(bundles["g128"] / part["file"]), load_external_data=False)
    edit(model, next(n for n in model.graph.node if n.op_type == "QMoE"))
    return model.SerializeToString()


def _set(node, name, value):
    for a in node.attribute:
        if a.name == name:
            node.attribute.remove(a)
            break
    node.attribute.append(helper.make_attribute(name, value))


@pytest.mark.parametrize(("edit", "why"), [
    (lambda m, n: _set(n, "expert_weight_bits", 8), "4-bit"),
    (lambda m, n: _set(n, "swiglu_fusion", 0), "interleaved"),
    (lambda m, n: _set(n, "activation_type", "gelu"), "SwiGLU"),
    (lambda m, n: _set(n, "block_size", 64), "blocks"),  # scales no longer tile the rows
    (lambda m, n: _set(n, "accuracy_level", 0), "accuracy level 0"),  # QMoE in float: not the kernel's int8
    (lambda m, n: n.input.__setitem__(4, n.input[3]), "biases"),
    (lambda m, n: m.graph.node.append(helper.make_node("QMoE", list(n.input), ["y2"], domain="com.microsoft")),
     "2 QMoE"),
    (lambda m, n: m.graph.node.append(helper.make_node("Identity", [n.input[2]], ["codes_copy"])),
     "another node reads the expert weights"),
])
def test_a_partition_the_kernel_does_not_take_stays_stock(bundles, edit, why):
    with pytest.raises(NotStreamable, match=why):
        streamable_graph(_qmoe_graph(bundles, edit))


@pytest.mark.parametrize("kind", ["int8", "fp16"])
def test_int8_and_half_experts_load_as_sessions(bundles, kind):
    bundle = bundles[kind]
    engine = load_bundle(bundle, memory_budget_bytes=_budget(bundle))
    assert engine.experts.streamer is not None  # the library is there, but the kernel takes no such partition
    assert engine.greedy(PROMPTS[0], 6) == load_bundle(bundle).greedy(PROMPTS[0], 6)
    assert engine.experts.stats.misses > 0 and engine.experts.stats.streamed == 0


def test_a_changed_expert_file_is_refused_at_its_first_streamed_miss(bundles, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundles["g128"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    fused = next(g for g in manifest["graphs"] if g["role"] == "layer_experts")
    data = copy / fused["data_files"][0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="sha256|changed|hash"):
        engine = load_bundle(copy, memory_budget_bytes=1)
        engine.greedy(PROMPTS[0], 4)


@pytest.fixture(scope="module")
def avx2_build(tmp_path_factory):
    """The same source built for AVX2 and FMA only (what -march=native gives on a CPU without AVX-512): this
    CPU runs that path too."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "dsedge-kernels is installed, so a C compiler built it"
    source = Path(__file__).resolve().parents[1] / "kernels" / "src" / "vnni_ops.c"
    out = tmp_path_factory.mktemp("avx2") / "libdsedge_kernels_avx2.so"
    subprocess.run([compiler, "-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-o", str(out), str(source), "-lm"],
                   check=True)
    return str(out)


@pytest.mark.parametrize("build", ["installed", "avx2"])
@pytest.mark.parametrize(("tokens", "k", "normalize", "block"), [(1, 2, 0, 128), (5, 2, 0, 128), (3, 3, 1, 128),
                                                                  (4, 2, 0, 32), (21, 2, 1, 128), (9, 1, 0, 128)])
def test_moe_int4_matches_qmoe(tokens, k, normalize, block, build, request):
    """The op itself against onnxruntime's QMoE over the same stored codes (int8 activations both). 21 tokens
    over 4 experts give each expert 4 to 16 routes: the register tiles (4 routes a pass with AVX-512, 2 with
    AVX2) and their remainders."""
    rng = np.random.default_rng(tokens + k)
    experts, hidden, inter = 4, 256, 128
    c1 = rng.integers(0, 256, (experts, 2 * inter, hidden // 2), dtype=np.uint8)
    s1 = (rng.random((experts, 2 * inter, hidden // block)) * 0.02).astype(np.float32)
    c2 = rng.integers(0, 256, (experts, hidden, inter // 2), dtype=np.uint8)
    s2 = (rng.random((experts, hidden, inter // block)) * 0.02).astype(np.float32)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    probs = rng.random((tokens, experts)).astype(np.float32)
    weights = {"c1": c1, "s1": s1, "c2": c2, "s2": s2}

    def run(node, domain, library=None):
        inits = [onnx.numpy_helper.from_array(v, n) for n, v in weights.items()]
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [tokens, hidden]),
                                                helper.make_tensor_value_info("p", 1, [tokens, experts])],
                                  [helper.make_tensor_value_info("y", 1, [tokens, hidden])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])
        options = ort.SessionOptions()
        if library:
            options.register_custom_ops_library(library)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x, "p": probs})[0]

    attrs = {"k": k, "block_size": block, "normalize_routing_weights": normalize}
    qmoe = helper.make_node("QMoE", ["x", "p", "c1", "s1", "", "c2", "s2", "", "", "", "", "", "", "", "p"], ["y"],
                            domain="com.microsoft", activation_type="swiglu", swiglu_fusion=1, expert_weight_bits=4,
                            activation_alpha=1.0, activation_beta=0.0, accuracy_level=4, **attrs)
    ours = helper.make_node("MoEInt4", ["x", "p", "c1", "s1", "c2", "s2", "p"], ["y"], domain=KERNEL_DOMAIN, **attrs)
    library = kernel_library() if build == "installed" else request.getfixturevalue("avx2_build")
    expected, got = run(qmoe, "com.microsoft"), run(ours, KERNEL_DOMAIN, library)
    assert np.abs(expected - got).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("build", ["installed", "avx2"])
@pytest.mark.parametrize(("k", "n", "rows"), [(2048, 64, 1), (2048, 64, 7), (2304, 36, 37), (4352, 8, 21)])
def test_matmul_int4_matches_matmul_nbits(k, n, rows, build, request):
    """MatMulInt4 against MatMulNBits (symmetric int4, accuracy level 4) over the same B: one row, and rows in
    tiles with remainders, K from 16 to 34 blocks."""
    rng = np.random.default_rng(k + rows)
    b = rng.integers(0, 256, (n, k // 128, 64), dtype=np.uint8)
    scales = (rng.random(n * k // 128) * 0.02).astype(np.float32)
    a = rng.standard_normal((1, rows, k)).astype(np.float32)
    library = kernel_library() if build == "installed" else request.getfixturevalue("avx2_build")

    def run(node, domain, lib=None):
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", 1, [1, rows, k])],
                                  [helper.make_tensor_value_info("y", 1, [1, rows, n])],
                                  [onnx.numpy_helper.from_array(b, "b"), onnx.numpy_helper.from_array(scales, "s")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])
        options = ort.SessionOptions()
        if lib:
            options.register_custom_ops_library(lib)
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]

    stock = run(helper.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                                 block_size=128, accuracy_level=4), "com.microsoft")
    ours = run(helper.make_node("MatMulInt4", ["a", "b", "s"], ["y"], domain=KERNEL_DOMAIN, K=k, N=n,
                                block_size=128), KERNEL_DOMAIN, library)
    # both quantize activations to int8 per block; an activation on a rounding boundary may land one step apart
    assert np.abs(stock - ours).max() <= 2e-3 * np.abs(stock).max()
    assert np.median(np.abs(stock - ours)) <= 1e-5 * np.abs(stock).max()


def _kernel_session(node, inputs, library):
    """A one-node session of a dsedge-kernels op; ``inputs`` name → array, all fed at run."""
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype),
                                                                          v.shape) for n, v in inputs.items()],
                              [helper.make_tensor_value_info("y", 1, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(KERNEL_DOMAIN, 1)])
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _moe_inputs(hidden=256, inter=128, experts=2, tokens=1, block=128, scales_block=None):
    sb = scales_block or block
    return {"x": np.ones((tokens, hidden), np.float32), "p": np.ones((tokens, experts), np.float32),
            "c1": np.zeros((experts, 2 * inter, hidden // 2), np.uint8),
            "s1": np.ones((experts, 2 * inter, hidden // sb), np.float32),
            "c2": np.zeros((experts, hidden, inter // 2), np.uint8),
            "s2": np.ones((experts, hidden, inter // sb), np.float32)}


@pytest.mark.parametrize(("inputs", "attrs", "why"), [
    (_moe_inputs(hidden=192), {"k": 1, "block_size": 64}, "multiples of 128"),
    (_moe_inputs(inter=96), {"k": 1, "block_size": 32}, "multiples of 128"),
    (_moe_inputs(), {"k": 1, "block_size": 2048}, "block_size must be"),
    (_moe_inputs(), {"k": 0, "block_size": 128}, "k must be"),
    (_moe_inputs(), {"block_size": 128}, "k must be"),
    (_moe_inputs(scales_block=64), {"k": 1, "block_size": 128}, "codes and scales do not match"),
])
@pytest.mark.parametrize("tokens", [1, 3])
def test_moe_int4_refuses_a_layout_it_does_not_take_with_the_reason(inputs, attrs, why, tokens):
    """A shape the kernel does not take is an error that names the op and the reason (KernelComputeV2's status),
    never an output left unset or computed from the wrong layout."""
    inputs = dict(inputs, x=np.ones((tokens, inputs["x"].shape[1]), np.float32),
                  p=np.ones((tokens, inputs["p"].shape[1]), np.float32))
    node = helper.make_node("MoEInt4", ["x", "p", "c1", "s1", "c2", "s2", "p"], ["y"], domain=KERNEL_DOMAIN, **attrs)
    session = _kernel_session(node, inputs, kernel_library())
    with pytest.raises(ORT_ERRORS, match=f"dsedge-kernels MoEInt4: .*{why}"):
        session.run(None, inputs)


def test_moe_int4_router_inputs_must_match_the_tokens():
    inputs = _moe_inputs(tokens=2)
    inputs["p"] = np.ones((3, 2), np.float32)
    node = helper.make_node("MoEInt4", ["x", "p", "c1", "s1", "c2", "s2", "p"], ["y"], domain=KERNEL_DOMAIN, k=1,
                            block_size=128)
    with pytest.raises(ORT_ERRORS, match="MoEInt4: router probabilities and weights must be"):
        _kernel_session(node, inputs, kernel_library()).run(None, inputs)


@pytest.mark.parametrize(("k", "n", "block", "a_width", "why"), [
    (256, 8, 128, 128, "last dimension must be K"), (192, 8, 64, 192, "multiple of 128"),
    (256, 6, 128, 256, "N of 4"), (256, 8, 96, 256, "whole number of blocks")])
def test_matmul_int4_refuses_a_shape_it_does_not_take(k, n, block, a_width, why):
    inputs = {"a": np.ones((1, a_width), np.float32), "b": np.zeros((n, max(k // block, 1), block // 2), np.uint8),
              "s": np.ones(n * max(k // block, 1), np.float32)}
    node = helper.make_node("MatMulInt4", ["a", "b", "s"], ["y"], domain=KERNEL_DOMAIN, K=k, N=n, block_size=block)
    with pytest.raises(ORT_ERRORS, match=f"dsedge-kernels MatMulInt4: .*{why}"):
        _kernel_session(node, inputs, kernel_library()).run(None, inputs)


def test_a_refused_call_leaves_the_session_usable():
    """After an error status the same session runs a fitting input (the error path frees what it took)."""
    node = helper.make_node("MoEInt4", ["x", "p", "c1", "s1", "c2", "s2", "p"], ["y"], domain=KERNEL_DOMAIN, k=1,
                            block_size=128)
    good = _moe_inputs()
    session = _kernel_session(node, good, kernel_library())
    bad = dict(good, p=np.ones((1, 3), np.float32))
    with pytest.raises(ORT_ERRORS):
        session.run(None, bad)
    assert session.run(None, good)[0].shape == (1, 256)


def test_the_vector_path_follows_the_cpu_flags():
    flags = "flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512vl avx512_vnni\n"
    assert dsedge_kernels.vector_path(flags) == "avx512-vnni"
    assert dsedge_kernels.vector_path(flags.replace(" avx512_vnni", "")) == "avx2"
    assert dsedge_kernels.vector_path(flags.replace(" fma", "").replace(" avx512_vnni", "")) is None
    assert not dsedge_kernels.supported("processor : 0\n")


def test_kernels_off_by_environment(monkeypatch):
    monkeypatch.setenv("DSEDGE_KERNELS", "off")
    assert kernel_library() is None
    monkeypatch.setenv("DSEDGE_KERNELS", "1")
    assert kernel_library() == str(dsedge_kernels.library_path())


def test_prefaulted_misses_give_the_same_tokens(bundles, monkeypatch):
    """Where the experts would not stay in the page cache each miss asks for its pages first (madvise over
    page-aligned ranges of the mapped file); the result is the same."""
    bundle = bundles["g128"]
    monkeypatch.setenv("DSEDGE_STREAM_PREFAULT", "1")
    engine = load_bundle(bundle, memory_budget_bytes=_budget(bundle))
    assert engine.experts.streamer.__self__.prefault
    assert engine.greedy(PROMPTS[0], 8) == load_bundle(bundle).greedy(PROMPTS[0], 8)
    streamed = [s for s in engine.experts.streamer.__self__.sessions.values() if s is not None]
    assert streamed and all(len(s._ranges) == 4 and all(start % mmap.PAGESIZE == 0 for _, start, _ in s._ranges)
                            for s in streamed)


def test_prefault_is_for_experts_that_do_not_fit_the_page_cache(monkeypatch):
    from dsedge.runtime.streamed import _expect_disk_reads

    monkeypatch.delenv("DSEDGE_STREAM_PREFAULT", raising=False)
    assert not _expect_disk_reads(1 << 20)
    assert _expect_disk_reads(1 << 50)
    monkeypatch.setenv("DSEDGE_STREAM_PREFAULT", "0")
    assert not _expect_disk_reads(1 << 50)


def test_a_library_onnxruntime_refuses_leaves_every_miss_stock(bundles, tmp_path, monkeypatch):
    import dsedge.runtime.partitioned as partitioned

    broken = tmp_path / "libbroken.so"
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr(partitioned, "kernel_library", lambda: str(broken))
    bundle = bundles["g128"]
    engine = load_bundle(bundle, memory_budget_bytes=_budget(bundle))
    assert engine.greedy(PROMPTS[0], 6) == load_bundle(bundle).greedy(PROMPTS[0], 6)
    assert engine.experts.stats.misses > 0 and engine.experts.stats.streamed == 0
    assert engine.experts.streamer.__self__.library is None


def test_the_avx2_build_streams_misses_with_the_stock_tokens(bundles, avx2_build, monkeypatch):
    bundle = bundles["g128"]
    monkeypatch.setenv("DSEDGE_KERNELS", avx2_build)  # a library path: that build
    engine = load_bundle(bundle, memory_budget_bytes=_budget(bundle))
    assert engine.experts.streamer.__self__.library == avx2_build
    monkeypatch.setenv("DSEDGE_KERNELS", "0")
    stock = load_bundle(bundle, memory_budget_bytes=_budget(bundle))
    for prompt in PROMPTS:
        assert engine.greedy(prompt, 8) == stock.greedy(prompt, 8)
        a, b = _logits(stock, prompt), _logits(engine, prompt)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    assert engine.experts.stats.streamed == engine.experts.stats.misses > 0


def test_a_kernel_path_that_is_not_a_file_is_refused(monkeypatch, tmp_path):
    from dsedge.errors import UserError

    monkeypatch.setenv("DSEDGE_KERNELS", str(tmp_path / "missing.so"))
    with pytest.raises(UserError, match="not a file"):
        kernel_library()
