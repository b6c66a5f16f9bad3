"""Bundle manifest: the typed contract (graphs, cache, placement), read, write, sha256 and path checks.

Stdlib only (the runtime imports it). Every file of a bundle is listed under ``files`` with its sha256 and
size; graphs and the tokenizer refer to those paths. A path must be relative, stay inside the bundle after
resolving links, and be listed. What the runtime relies on (layout, context, cache, graphs with their
declared inputs/outputs, placement) is parsed into dataclasses when the manifest is read, so a missing or
mistyped key fails at load with its name, not as a KeyError mid-generation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from dsedge import safe_json
from dsedge.contract import DTYPES, EXPERT_ROLES, ROLES, TRUNK_ROLES, TensorSpec, past_name, present_name
from dsedge.errors import UserError
from dsedge.verified import VerifiedFiles, check_table, regular_path, scan_tree, sha256_file

# 2: graphs carry role and typed inputs/outputs (TensorSpec), every graph its bytes, placement a ranking.
MAX_JSON_DEPTH = 32  # a manifest nests about 6 levels deep
SCHEMA_VERSION = 2
MANIFEST_FILE = "manifest.json"
LAYOUTS = ("monolithic", "partitioned")
REEXPORT = "re-export the bundle with this version of dsedge (`dsedge export`)"
TAMPERED = "re-export or re-copy the bundle; never edit bundle files by hand"
MAX_MANIFEST_BYTES = 64 << 20  # a manifest lists files and graphs: megabytes at most, never gigabytes


class BundleError(UserError):
    """A bundle is missing, tampered with, or points outside itself."""


def file_entry(root: Path, rel: str) -> dict[str, Any]:
    path = root / rel
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def resolve_inside(root: Path, rel: str, *, what: str = "path") -> Path:
    """``root / rel``, refusing absolute paths, ``..`` and links that lead outside ``root``."""
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or "\\" in rel or ".." in pure.parts or Path(rel).is_absolute():
        raise BundleError(f"{what} {rel!r} is not a relative path inside the bundle", where=str(root),
                          hint="the manifest was edited or produced by something else; re-export the bundle")
    path = (root / pure).resolve()
    base = root.resolve()
    if path != base and base not in path.parents:
        raise BundleError(f"{what} {rel!r} resolves outside the bundle (to {path})", where=str(root),
                          hint="a link or path in the bundle leaves it; re-export the bundle")
    return path


# --- the typed contract -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphEntry:
    """One ONNX graph of the bundle: its role, files, size and declared inputs/outputs."""

    name: str
    role: str  # one of dsedge.contract.ROLES
    file: str
    data_files: tuple[str, ...]
    bytes: int  # graph file + external data
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    layer: int | None = None  # layer graphs and expert partitions
    experts: tuple[int, int] | None = None  # expert partitions: ids [first, last)
    sha256: str | None = None  # filled in by write_manifest
    data_sha256: tuple[str, ...] = ()

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "role": self.role,
            "kind": self.role,  # the schema-1 key, still read by runtime/profile.py; drop once it reads "role"
            "file": self.file, "data_files": list(self.data_files), "bytes": self.bytes,
            "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}
        if self.layer is not None:
            out["layer"] = self.layer
        if self.experts is not None:
            out["experts"] = list(self.experts)
        if self.sha256 is not None:
            out |= {"sha256": self.sha256, "data_sha256": list(self.data_sha256)}
        return out


@dataclass(frozen=True)
class CacheLayout:
    """The per-layer cache the graphs read (``past``) and return (``present``)."""

    kind: str  # "mla_latent" | "kv"
    tensors: tuple[str, ...]
    shape: tuple[int | str, ...]  # with "B" and "S"
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "tensors": list(self.tensors), "shape": list(self.shape), "dtype": self.dtype,
                "input": past_name("{layer}", "{tensor}"), "output": present_name("{layer}", "{tensor}")}


@dataclass(frozen=True)
class RankedPartition:
    name: str
    bytes: int
    resident: bool  # loaded at start under the export target's budget


@dataclass(frozen=True)
class Placement:
    """Export's ranking of the expert partitions, hottest first, and which of them the target keeps resident."""

    budget_bytes: int | None
    trunk_bytes: int
    kv_cache_bytes: int
    expert_bytes: int
    resident_expert_bytes: int
    frequencies: str  # "measured" or "uniform (no calibration data)"
    ranking: tuple[RankedPartition, ...]

    @property
    def resident(self) -> list[str]:
        return [p.name for p in self.ranking if p.resident]

    def resident_within(self, room: int) -> list[str]:
        """The runtime's resident set under an explicit budget: the same policy, applied to ``room``."""
        return longest_prefix(((p.name, p.bytes) for p in self.ranking), room)

    def to_json(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget_bytes, "trunk_bytes": self.trunk_bytes,
                "kv_cache_bytes": self.kv_cache_bytes, "expert_bytes": self.expert_bytes,
                "resident_expert_bytes": self.resident_expert_bytes, "frequencies": self.frequencies,
                "ranking": [{"name": p.name, "bytes": p.bytes, "resident": p.resident} for p in self.ranking]}


def longest_prefix(ranked: Iterable[tuple[str, int]], room: float) -> list[str]:
    """The placement policy: the longest prefix of the ranking (hottest first) whose bytes fit in ``room``."""
    kept, used = [], 0
    for name, size in ranked:
        if used + size > room:
            break
        kept.append(name)
        used += size
    return kept


@dataclass(frozen=True)
class BundleContract:
    """What the runtime reads from a manifest, typed. Everything else stays in ``Manifest.data``."""

    layout: str
    max_context: int
    model: dict[str, Any]  # ModelSpec.to_json(); the runtime reads num_hidden_layers and vocab_size
    cache: CacheLayout
    graphs: tuple[GraphEntry, ...]
    placement: Placement | None = None
    schema_version: int = SCHEMA_VERSION

    def graphs_in(self, role: str, **match) -> list[GraphEntry]:
        return [g for g in self.graphs if g.role == role and all(getattr(g, k) == v for k, v in match.items())]

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "layout": self.layout, "max_context": self.max_context,
                "model": self.model, "cache": self.cache.to_json(), "graphs": [g.to_json() for g in self.graphs],
                **({"placement": self.placement.to_json()} if self.placement is not None else {})}


# --- parsing --------------------------------------------------------------------------------------


class _Fields:
    """Typed reads of one JSON object of the manifest; errors name the key path (``graphs[3].bytes``)."""

    def __init__(self, raw: Any, key: str, file: Path | str):
        self.key, self.file = key, str(file)
        if not isinstance(raw, dict):
            self._fail(f"{MANIFEST_FILE} key '{key}' must be an object, got {type(raw).__name__}")
        self.raw = raw

    def _fail(self, what: str):
        raise BundleError(what, where=self.file, hint=f"the manifest is incomplete or was edited; {REEXPORT}")

    def path(self, key: str | int) -> str:
        return f"{self.key}[{key}]" if isinstance(key, int) else f"{self.key}.{key}" if self.key else key

    def need(self, key: str, *types: type) -> Any:
        if key not in self.raw:
            self._fail(f"{MANIFEST_FILE} lacks key '{self.path(key)}'")
        return self.check(self.raw[key], self.path(key), types)

    def opt(self, key: str, *types: type) -> Any:
        value = self.raw.get(key)
        return None if value is None else self.check(value, self.path(key), types)

    def check(self, value: Any, path: str, types: tuple[type, ...]) -> Any:
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join(t.__name__ for t in types)
            self._fail(f"{MANIFEST_FILE} key '{path}' must be {wanted}, got {type(value).__name__} {value!r:.60}")
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.need(key, str)
        if value not in choices:
            self._fail(f"{MANIFEST_FILE} key '{self.path(key)}' is {value!r}, not one of {', '.join(choices)}")
        return value

    def items(self, key: str, *types: type) -> list[Any]:
        return [self.check(v, f"{self.path(key)}[{i}]", types) for i, v in enumerate(self.need(key, list))]

    def objects(self, key: str) -> list[_Fields]:
        return [_Fields(v, f"{self.path(key)}[{i}]", self.file) for i, v in enumerate(self.need(key, list))]


def _check_schema(data: dict, file: Path | str) -> None:
    version = _Fields(data, "", file).need("schema_version", int)
    if version < SCHEMA_VERSION:
        raise BundleError(f"this bundle was written by an older dsedge (schema {version}); re-export it with this "
                          f"version (it reads schema {SCHEMA_VERSION})", where=str(file), hint=REEXPORT)
    if version > SCHEMA_VERSION:
        raise BundleError(f"this bundle was written by a newer dsedge (schema {version}; this version reads "
                          f"schema {SCHEMA_VERSION})", where=str(file), hint="upgrade dsedge, or re-export with it")


def _tensor(f: _Fields) -> TensorSpec:
    dims = tuple(f.items("dims", int, str))
    return TensorSpec(f.need("name", str), f.choice("dtype", DTYPES), dims)


def _graph(f: _Fields) -> GraphEntry:
    experts = f.opt("experts", list)
    if experts is not None:
        experts = tuple(f.items("experts", int))
        if len(experts) != 2:
            f._fail(f"{MANIFEST_FILE} key '{f.path('experts')}' must be [first, last)")
    role = f.choice("role", ROLES)
    if role in EXPERT_ROLES and experts is None:
        f.need("experts", list)
    return GraphEntry(
        name=f.need("name", str), role=role, file=f.need("file", str),
        data_files=tuple(f.items("data_files", str)), bytes=f.need("bytes", int),
        inputs=tuple(_tensor(t) for t in f.objects("inputs")), outputs=tuple(_tensor(t) for t in f.objects("outputs")),
        layer=f.need("layer", int) if role in ("layer", *EXPERT_ROLES) else f.opt("layer", int), experts=experts,
        sha256=f.opt("sha256", str), data_sha256=tuple(f.items("data_sha256", str)) if "data_sha256" in f.raw else ())


def _cache(f: _Fields) -> CacheLayout:
    return CacheLayout(f.need("kind", str), tuple(f.items("tensors", str)), tuple(f.items("shape", int, str)),
                       f.choice("dtype", ("float32", "float16")))


def _placement(f: _Fields) -> Placement:
    ranking = tuple(RankedPartition(r.need("name", str), r.need("bytes", int), r.need("resident", bool))
                    for r in f.objects("ranking"))
    return Placement(f.opt("budget_bytes", int), f.need("trunk_bytes", int), f.need("kv_cache_bytes", int),
                     f.need("expert_bytes", int), f.need("resident_expert_bytes", int), f.need("frequencies", str),
                     ranking)


def _model(f: _Fields) -> dict[str, Any]:
    f.need("num_hidden_layers", int)
    f.need("vocab_size", int)
    return f.raw


def parse_contract(data: Any, file: Path | str = MANIFEST_FILE) -> BundleContract:
    """The typed contract of a manifest dict (BundleError naming the first missing or mistyped key)."""
    top = _Fields(data, "", file)
    _check_schema(data, file)
    placement = top.opt("placement", dict)
    contract = BundleContract(
        layout=top.choice("layout", LAYOUTS), max_context=top.need("max_context", int),
        model=_model(_Fields(top.need("model", dict), "model", file)),
        cache=_cache(_Fields(top.need("cache", dict), "cache", file)),
        graphs=tuple(_graph(g) for g in top.objects("graphs")),
        placement=_placement(_Fields(placement, "placement", file)) if placement is not None else None,
        schema_version=data["schema_version"])
    _check_graph_set(contract, top)
    _check_context(contract, top)
    return contract


def _check_context(contract: BundleContract, top: _Fields) -> None:
    """max_context sizes the cache and must fit the model's positions (the graphs' RoPE tables hold exactly
    max_context rows: ``runtime/bundle.py`` checks that when it opens the graph)."""
    limit = contract.model.get("max_position_embeddings")
    if contract.max_context < 1:
        top._fail(f"{MANIFEST_FILE} key 'max_context' is {contract.max_context}; it must be at least 1")
    if isinstance(limit, int) and not isinstance(limit, bool) and contract.max_context > limit:
        top._fail(f"{MANIFEST_FILE} key 'max_context' is {contract.max_context}, more than the model's "
                  f"max_position_embeddings ({limit})")


def _check_graph_set(contract: BundleContract, top: _Fields) -> None:
    """The graphs a layout runs are all there (one decoder; or prelude, a graph per layer, head)."""
    roles = [g.role for g in contract.graphs]
    if contract.layout == "monolithic":
        missing = [] if roles.count("decoder") == 1 else ["one 'decoder' graph"]
    else:
        layers = {g.layer for g in contract.graphs_in("layer")}
        missing = [f"one '{r}' graph" for r in TRUNK_ROLES if r != "layer" and roles.count(r) != 1]
        missing += [f"layer graph {i}" for i in range(contract.model["num_hidden_layers"]) if i not in layers]
    if missing:
        top._fail(f"{MANIFEST_FILE} 'graphs' of this {contract.layout} bundle lack {', '.join(missing)}")


def _check_files(data: dict, file: Path | str) -> dict[str, dict[str, Any]]:
    if "files" not in data:
        raise BundleError(f"{MANIFEST_FILE} lacks key 'files'", where=str(file), hint=REEXPORT)
    return check_table(data["files"], where=str(file), error=BundleError, hint=f"the manifest was edited; {REEXPORT}")


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict[str, Any]  # the raw JSON, for fields outside the contract (tokenizer, quantization, validation…)
    contract: BundleContract = field(compare=False)
    checked: VerifiedFiles = field(compare=False, repr=False, default=None)  # the one door to the bundle's files

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.data["files"]

    @property
    def mode(self) -> str:
        """How files are verified: "recorded", "full" or "off" (``dsedge.verified``)."""
        return self.checked.mode

    def path(self, rel: str, *, what: str = "file") -> Path:
        """A listed file, verified (listed, inside, no link, regular, sha256 matched once): the only way the
        runtime reaches a bundle file."""
        return self.checked.path(rel, what=what)

    def verify(self) -> None:
        """Hash every listed file now (``--verify``), whatever the verification record says."""
        self.checked.verify_all()


def read_manifest(root: str | Path, *, verify: bool | str = "off") -> Manifest:
    """Parse and check a bundle's manifest; ``verify`` (``dsedge.verified.verify_mode``) says how its files are
    verified as they are opened through ``Manifest.path`` ("off": links, kinds and sizes only)."""
    root = Path(root)
    if not (root / MANIFEST_FILE).exists() and not (root / MANIFEST_FILE).is_symlink():
        raise BundleError(f"no {MANIFEST_FILE} found", where=str(root),
                          hint="pass a bundle directory written by `dsedge export`")
    path = regular_path(root, MANIFEST_FILE, what="bundle manifest", error=BundleError, hint=TAMPERED)
    raw = path.read_bytes() if path.stat().st_size <= MAX_MANIFEST_BYTES else None
    if raw is None:
        raise BundleError(f"{MANIFEST_FILE} is larger than {MAX_MANIFEST_BYTES} bytes", where=str(path), hint=REEXPORT)
    try:  # depth-limited: a crafted manifest of nested brackets must be a clear error, not a RecursionError
        data = safe_json.loads(raw.decode("utf-8"), max_depth=MAX_JSON_DEPTH)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise BundleError(f"{MANIFEST_FILE} is not valid JSON: {exc}", where=str(path),
                          hint="the manifest is damaged or was not written by `dsedge export`; re-export") from exc
    contract = parse_contract(data, path)
    table = _check_files(data, path)
    checked = VerifiedFiles(root, table, raw, mode=verify, label="bundle", error=BundleError, hint=TAMPERED,
                            ignore=(MANIFEST_FILE,))
    return Manifest(root, data, contract, checked)


def bundle_files(root: Path) -> list[str]:
    """Every file a bundle's manifest must list: all regular files but the manifest itself (a nested
    ``retriever/manifest.json`` is listed like any other); a link or special file anywhere is refused."""
    return [rel for rel in scan_tree(root, error=BundleError, hint="a bundle holds plain files only")
            if rel not in (MANIFEST_FILE, MANIFEST_FILE + ".tmp")]


def write_manifest(root: Path, data: dict[str, Any]) -> BundleContract:
    """Write the manifest after hashing every file under ``root`` (the top-level manifest itself excluded).

    ``data`` holds the contract's parts (GraphEntry, Placement, CacheLayout, or their JSON forms, which are
    parsed and so checked) and any other fields, written as they are. Returns the contract as written.
    """
    files = bundle_files(root)
    table = {rel: file_entry(root, rel) for rel in files}
    contract = parse_contract(_as_json({**data, "schema_version": SCHEMA_VERSION}), root / MANIFEST_FILE)
    graphs = tuple(replace(g, sha256=table[g.file]["sha256"],  # each graph carries its own hashes, for readers
                           data_sha256=tuple(table[f]["sha256"] for f in g.data_files)) for g in contract.graphs)
    contract = replace(contract, graphs=graphs)
    out = {**{k: _as_json(v) for k, v in data.items()}, **contract.to_json(), "files": table}
    out = {"schema_version": SCHEMA_VERSION, **out}
    tmp = root / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST_FILE)
    return contract


def _as_json(value: Any) -> Any:
    """Contract dataclasses → their JSON form (recursively through dicts and lists)."""
    if hasattr(value, "to_json") and not isinstance(value, type):
        return value.to_json()
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_json(v) for v in value]
    return value
