"""Python as ComfyUI Manager leaves it for our pack: only what the requirement files name can be imported.

Put this folder first on PYTHONPATH and list requirement files in FASTLIGHTGEN_REQUIREMENTS (os.pathsep
between them). Every installed distribution outside those requirements and their dependencies (dev tools such
as matplotlib, deepspeed, pytest) then fails to import with ModuleNotFoundError, as where it was never
installed (`importlib.util.find_spec` says None, as packages probing for optional ones expect). The blocked names go to stderr, so a test can see the guard was active.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import re
import sys

NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(files: list[str]) -> set[str]:
    names = set()
    for path in files:
        for line in open(path, encoding="utf-8"):
            match = NAME.match(line.split("#", 1)[0])
            if match:
                names.add(_normal(match.group(1)))
    return names


def _closure(names: set[str]) -> set[str]:
    """The distributions `names` need, following each one's requirements (extras left out)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [_normal(m.group(1)) for r in requires if "extra ==" not in r and (m := NAME.match(r))]
    return seen


class _Hiding(importlib.abc.MetaPathFinder):
    """A finder that finds nothing of the blocked packages (modules or metadata), as where they are missing."""

    def __init__(self, inner, blocked: set[str], allowed: set[str]):
        self.inner, self.blocked, self.allowed = inner, blocked, allowed

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.blocked:
            return None
        return self.inner.find_spec(fullname, path, target)

    def find_distributions(self, *args, **kwargs):  # importlib.metadata's view: the allowed ones only
        found = getattr(self.inner, "find_distributions", lambda *a, **k: ())(*args, **kwargs)
        return (d for d in found if _normal(d.metadata["Name"] or "") in self.allowed)

    def invalidate_caches(self):
        getattr(self.inner, "invalidate_caches", lambda: None)()


def _install() -> None:
    files = [f for f in os.environ.get("FASTLIGHTGEN_REQUIREMENTS", "").split(os.pathsep) if f]
    if not files:
        return
    allowed = _closure(_requirements(files))
    blocked = {top for top, dists in importlib.metadata.packages_distributions().items()
               if top not in sys.stdlib_module_names and not any(_normal(d) in allowed for d in dists)}
    builtin = (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter)
    sys.meta_path[:] = [f if f in builtin else _Hiding(f, blocked, allowed) for f in sys.meta_path]
    print(f"FastLightGen install guard: blocked {sorted(blocked)}", file=sys.stderr, flush=True)


_install()
