"""Device targets: built-ins load and are sane, user files are read strictly, errors name the problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsedge.errors import ConfigError
from dsedge.targets import (
    ALLOWED_KEYS,
    Target,
    builtin_target_names,
    list_targets,
    load_target,
    parse_target,
)

GiB = 1024**3

# Every built-in target with a test, mapped to the physical memory (bytes) that holds its weights:
# the budget must stay below it. A new built-in without an entry here fails test_every_builtin_is_tested.
TESTED_TARGETS = {
    "x86-cpu-16g": 16 * GiB,
    "arm-sbc-8g": 8 * GiB,
    "jetson-orin-nano-8g": 8 * GiB,
    "gpu-24g": 24 * GiB,
    "gpu-12g": 12 * GiB,
}


def valid_target_data() -> dict:
    """A minimal valid user target, as parsed from a file."""
    return {
        "schema_version": 1,
        "name": "my-board",
        "description": "test board",
        "kind": "cpu",
        "memory_budget_bytes": 3 * GiB,
        "memory_bandwidth_gbps": 25.6,
        "host_memory_bytes": 3 * GiB,
        "execution_providers": ["CPUExecutionProvider"],
        "precisions": ["int4", "fp32"],
        "threads": 4,
        "max_context": 2048,
        "default_recipe": "int4",
    }


def to_toml(data: dict) -> str:
    # JSON scalars, strings and string lists are valid TOML values; enough for these flat files.
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in data.items())


def write_target(tmp_path: Path, data: dict, suffix: str = ".toml") -> Path:
    path = tmp_path / f"target{suffix}"
    path.write_text(to_toml(data) if suffix == ".toml" else json.dumps(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------- built-ins


def test_every_builtin_is_tested():
    untested = set(builtin_target_names()) - set(TESTED_TARGETS)
    assert not untested, f"built-in targets without a test: add them to TESTED_TARGETS: {sorted(untested)}"


def test_tested_targets_all_exist():
    assert set(TESTED_TARGETS) <= set(builtin_target_names())


@pytest.mark.parametrize("name", sorted(TESTED_TARGETS))
def test_builtin_loads_and_is_sane(name):
    target = load_target(name)
    physical_bytes = TESTED_TARGETS[name]
    assert target.name == name
    assert target.source.endswith(f"{name}.toml")
    assert 0 < target.memory_budget_bytes < physical_bytes
    assert target.memory_bandwidth_gbps > 0
    assert target.threads >= 1 and target.max_context >= 1
    assert all(p.endswith("ExecutionProvider") for p in target.execution_providers)
    assert target.default_recipe
    if target.kind in ("cpu", "soc"):
        # One memory pool: "host" memory is the same RAM, so it cannot exceed physical.
        assert target.host_memory_bytes <= physical_bytes
    if target.kind == "cpu":
        assert "CPUExecutionProvider" in target.execution_providers
    if target.kind in ("gpu", "soc"):
        assert target.execution_providers[0] == "CUDAExecutionProvider"
        assert target.execution_providers[-1] == "CPUExecutionProvider"


def test_builtin_values_match_their_devices():
    by_name = {target.name: target for target in list_targets()}
    assert by_name["x86-cpu-16g"].precisions == ("int4", "int8", "fp32")
    assert 60 <= by_name["x86-cpu-16g"].memory_bandwidth_gbps <= 80
    assert by_name["arm-sbc-8g"].threads == 4
    assert 16 <= by_name["arm-sbc-8g"].memory_bandwidth_gbps <= 18
    assert by_name["jetson-orin-nano-8g"].kind == "soc"
    assert set(by_name["jetson-orin-nano-8g"].precisions) == {"fp16", "int8", "int4"}
    assert by_name["gpu-24g"].memory_bandwidth_gbps == 1008.0
    assert 360 <= by_name["gpu-12g"].memory_bandwidth_gbps <= 504


def test_list_targets_matches_names():
    assert [t.name for t in list_targets()] == builtin_target_names()


@pytest.mark.parametrize("name", sorted(TESTED_TARGETS))
def test_to_json_round_trips(name):
    target = load_target(name)
    as_json = json.loads(json.dumps(target.to_json()))
    assert "source" not in as_json and as_json["schema_version"] == 1
    assert parse_target(as_json, where=target.source) == target


def test_target_instance_is_returned_as_is():
    target = load_target("gpu-24g")
    assert load_target(target) is target


def test_import_is_light():
    code = ("import sys, dsedge.targets; dsedge.targets.list_targets(); "
            "print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- user files


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_user_file_by_path(tmp_path, suffix):
    path = write_target(tmp_path, {**valid_target_data(), "notes": "hi"}, suffix)
    for given in (path, str(path)):
        target = load_target(given)
        assert isinstance(target, Target)
        assert target.name == "my-board" and target.notes == "hi"
        assert target.precisions == ("int4", "fp32")
        assert target.source == str(path)


def test_relative_toml_name_is_a_path(tmp_path, monkeypatch):
    write_target(tmp_path, valid_target_data())
    monkeypatch.chdir(tmp_path)
    assert load_target("target.toml").name == "my-board"


def test_integer_bandwidth_is_accepted():
    data = {**valid_target_data(), "memory_bandwidth_gbps": 100}
    assert parse_target(data, where="inline").memory_bandwidth_gbps == 100.0


# ---------------------------------------------------------------- bad input

BAD_VALUES = [
    # (key, value or DELETE, words the message must contain)
    ("schema_version", "DELETE", "schema_version"),
    ("schema_version", 2, "schema_version"),
    ("schema_version", True, "schema_version"),
    ("name", "DELETE", "name"),
    ("threads", "DELETE", "threads"),
    ("threads", True, "threads"),
    ("threads", 4.0, "threads"),
    ("threads", 0, "threads"),
    ("max_context", "4096", "max_context"),
    ("memory_budget_bytes", 0, "memory_budget_bytes"),
    ("memory_budget_bytes", -1, "memory_budget_bytes"),
    ("memory_budget_bytes", False, "memory_budget_bytes"),
    ("host_memory_bytes", -1, "host_memory_bytes"),
    ("memory_bandwidth_gbps", 0, "memory_bandwidth_gbps"),
    ("memory_bandwidth_gbps", -3.5, "memory_bandwidth_gbps"),
    ("memory_bandwidth_gbps", "fast", "memory_bandwidth_gbps"),
    ("kind", "npu", "kind"),
    ("description", 7, "description"),
    ("precisions", ["int3"], "int3"),
    ("precisions", [], "precisions"),
    ("precisions", "int4", "precisions"),
    ("precisions", ["int4", "int4"], "precisions"),
    ("execution_providers", ["CUDA"], "CUDA"),
    ("execution_providers", ["CUDAExecutionProvider"], "CPUExecutionProvider"),  # cpu kind without CPU EP
    ("default_recipe", "int2", "default_recipe"),
    ("name", "has space", "name"),
    ("notes", 3, "notes"),
    ("memry_budget_bytes", 1, "memry_budget_bytes"),  # unknown key
]


@pytest.mark.parametrize("suffix", [".toml", ".json"])
@pytest.mark.parametrize(("key", "value", "expected"), BAD_VALUES)
def test_bad_value_is_a_config_error(tmp_path, suffix, key, value, expected):
    data = valid_target_data()
    if value == "DELETE":
        del data[key]
    else:
        data[key] = value
    path = write_target(tmp_path, data, suffix)
    with pytest.raises(ConfigError) as info:
        load_target(path)
    assert info.value.exit_code == 3
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_key_lists_allowed_keys(tmp_path):
    path = write_target(tmp_path, {**valid_target_data(), "memry_budget_bytes": 1})
    with pytest.raises(ConfigError) as info:
        load_target(path)
    assert all(key in info.value.hint for key in ALLOWED_KEYS)
    assert "did you mean 'memory_budget_bytes'" in info.value.hint


def test_unknown_builtin_suggests_close_name():
    with pytest.raises(ConfigError) as info:
        load_target("x86-cpu")
    assert info.value.exit_code == 3
    assert "did you mean 'x86-cpu-16g'" in str(info.value)
    assert all(name in str(info.value) for name in builtin_target_names())


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_target(path)
    assert info.value.exit_code == 3
    assert "not found" in str(info.value) and str(path) in str(info.value)


def test_missing_file_given_as_string_with_separator():
    with pytest.raises(ConfigError, match="not found"):
        load_target("some/dir/x86-cpu-16g")


def test_directory_is_not_a_target(tmp_path):
    folder = tmp_path / "board.toml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="not a file"):
        load_target(folder)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "board.yaml"
    path.write_text("name: x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unsupported target file type"):
        load_target(path)


@pytest.mark.parametrize(("suffix", "text"), [(".toml", "schema_version = 1\nname = \n"),
                                              (".json", '{"schema_version": 1,\n "name": }')])
def test_syntax_error_reports_line(tmp_path, suffix, text):
    path = tmp_path / f"broken{suffix}"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_target(path)
    assert info.value.exit_code == 3
    assert "line 2" in str(info.value) and str(path) in str(info.value)


def test_json_top_level_must_be_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="table/object"):
        load_target(path)


# ---------------------------------------------------------------- --target auto (detected)


def test_auto_target_describes_this_process(monkeypatch):
    from dsedge.targets import detect, load_target

    target = load_target("auto")
    assert target.name == "auto" and target.kind in ("cpu", "gpu")
    assert target.threads == detect.usable_cores()
    assert target.execution_providers[-1] == "CPUExecutionProvider"
    assert 0 < target.memory_budget_bytes <= detect.physical_memory_bytes()


def test_the_runtime_takes_auto_without_the_bandwidth_probe(tiny_checkpoint, tmp_path, monkeypatch):
    """Loading a bundle reads a target's providers and threads only; the copy probe (two 64 MiB buffers) would
    add 100 MiB to every `dsedge run`'s peak memory and 0.1 s to its start."""
    from dsedge.export.bundle import export_bundle
    from dsedge.runtime import load_bundle
    from dsedge.targets import detect

    export_bundle(tiny_checkpoint("qwen2"), tmp_path / "b", max_context=16, validate=False)

    def probe(*args, **kwargs):
        raise AssertionError("the runtime probed memory bandwidth")

    monkeypatch.setattr(detect, "copy_bandwidth_gbps", probe)
    engine = load_bundle(tmp_path / "b", target="auto")
    assert engine.session_config.threads == detect.usable_cores()


def test_cgroup_limit_caps_detected_memory(tmp_path, monkeypatch):
    from dsedge.targets import detect

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384000 kB\nMemFree:         1000 kB\n")
    limit = tmp_path / "memory.max"
    limit.write_text(f"{2 * 1024**3}\n")
    unlimited = tmp_path / "v1.limit"
    unlimited.write_text(f"{2**63 - 4096}\n")
    monkeypatch.setattr(detect, "_MEMINFO", meminfo)
    monkeypatch.setattr(detect, "_CGROUP_LIMITS", (unlimited, tmp_path / "absent"))
    assert detect.physical_memory_bytes() == 16384000 * 1024  # "no limit" values are ignored
    monkeypatch.setattr(detect, "_CGROUP_LIMITS", (limit,))
    assert detect.physical_memory_bytes() == 2 * 1024**3
    limit.write_text("max\n")
    assert detect.physical_memory_bytes() == 16384000 * 1024


def test_detected_budget_leaves_the_os_its_share(monkeypatch):
    from dsedge.targets import detect, detect_target

    monkeypatch.setattr(detect, "physical_memory_bytes", lambda: 8 * 1024**3)
    monkeypatch.setattr(detect, "available_providers", lambda: ("CPUExecutionProvider",))
    target = detect_target(probe_bandwidth=False)
    assert target.memory_budget_bytes == 6 * 1024**3 and target.kind == "cpu" and target.max_context == 4096


def test_targets_detect_cli_prints_one_json_object():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dsedge", "targets", "--detect", "--json"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["ok"] and [t["name"] for t in payload["targets"]] == ["auto"]
