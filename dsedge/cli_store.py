"""`dsedge list` and `dsedge rm NAME`: the local bundle store (dsedge.store), as `ollama list` / `ollama rm`."""

from __future__ import annotations

LIST_DESCRIPTION = """\
List the bundles in the local store ($DSEDGE_HOME/bundles, default ~/.cache/dsedge/bundles): the ones
`dsedge run NAME` / `dsedge chat NAME` exported on first use. Also lists the names that would export on
first use: the shipped demo models and the repo ids in the local Hugging Face cache (never downloaded).

examples:
  dsedge list
  dsedge list --json
"""

RM_DESCRIPTION = """\
Delete a stored bundle (the next `dsedge run NAME` exports it again). Only the store is touched: a bundle
directory you exported yourself is yours to delete.

examples:
  dsedge rm deepseek-v3-tiny
  dsedge rm deepseek-ai/DeepSeek-V2-Lite --json
"""


def register(sub, command) -> None:
    """Add `list` and `rm` to the CLI (argparse only)."""
    command(sub, "list", "the bundles in the local store", LIST_DESCRIPTION, _run_list, _render_list)
    cmd = command(sub, "rm", "delete a bundle from the local store", RM_DESCRIPTION, _run_rm, _render_rm)
    cmd.add_argument("name", nargs="+", help="stored bundle name(s), as `dsedge list` shows them")


class StoreListing:
    def __init__(self, store: str, bundles: list, available: dict[str, list[str]]):
        self.store, self.bundles, self.available = store, bundles, available

    def to_json(self) -> dict:
        return {"store": self.store, "bundles": [b.to_json() for b in self.bundles], "available": self.available}


class Removed:
    def __init__(self, removed: list):
        self.removed = removed

    def to_json(self) -> dict:
        return {"removed": [b.to_json() for b in self.removed]}


def _run_list(args) -> StoreListing:
    from dsedge.sources import known_names
    from dsedge.store import list_bundles, store_dir

    available = known_names()
    available.pop("published configs (plan only)", None)
    return StoreListing(str(store_dir()), list_bundles(), available)


def _run_rm(args) -> Removed:
    from dsedge.store import remove_bundle, stored_path

    for name in args.name:  # check every name first: all or nothing
        stored_path(name)
    return Removed([remove_bundle(name) for name in args.name])


def _render_list(listing: StoreListing) -> None:
    from dsedge.render import human_bytes

    if listing.bundles:
        width = max(len(b.name) for b in listing.bundles)
        print(f"{'NAME':{width}s}  {'SIZE':>10s}  {'MODEL':14s} {'LAYOUT':12s} CONTEXT")
        for b in listing.bundles:
            print(f"{b.name:{width}s}  {human_bytes(b.size_bytes):>10s}  {b.model_type:14s} {b.layout:12s} "
                  f"{b.max_context}")
    else:
        print(f"no bundles in {listing.store} yet")
    for group, names in listing.available.items():
        if names:
            print(f"{group} (exported on first `dsedge run NAME`): {', '.join(names)}")


def _render_rm(removed: Removed) -> None:
    for b in removed.removed:
        print(f"removed {b.name} ({b.path})")
