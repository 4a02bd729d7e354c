"""Guard rails of the package's shape: every door (the API functions, the PEFT doors, compat, the CLI)
runs through the one engine, and the import graph keeps the layers of docs/implementation.md (no
circles; statistics and solve independent; kernels import nothing of the package, comm only its errors)."""
import ast
import contextlib
import os
import re
import sys

import pytest
from peft import LoraConfig, get_peft_model

from lora_da_fast import LoraDAConfig, engine
from lora_da_fast.solve import solve_local, solve_sharded
from lora_da_fast.statistics import StatisticsPass

from .cli_helpers import args as cli_args
from .cli_helpers import cache, data, run, tiny_cache  # noqa: F401 - fixtures
from .helpers import random_examples, tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "lora_da_fast")

# --------------------------------------------------------------------------------------------------
# Every door reaches the one engine

ENGINE = {f.__code__: name for name, f in (("prepare_run", engine.prepare_run), ("execute", engine.execute),
                                           ("solve_given", engine._solve_given),
                                           ("solve_lora_da", engine.solve_lora_da))}
INNER = {StatisticsPass.__enter__.__code__: "statistics pass", solve_local.__code__: "solve",
         solve_sharded.__code__: "solve"}


@contextlib.contextmanager
def trace_engine():
    """Records the engine's functions as they are called, and every statistics pass or solve together
    with the engine function it runs under (``None``: a door that went around the engine)."""
    seen = []

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if code in ENGINE:
            seen.append(ENGINE[code])
        elif code in INNER:
            up, under = frame.f_back, None
            while up is not None and under is None:
                under = ENGINE.get(up.f_code) if ENGINE.get(up.f_code) in ("execute", "solve_lora_da") else None
                up = up.f_back
            seen.append((INNER[code], under))

    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(None)


def _doors(tmp_path, data, capsys):  # noqa: F811 - the fixture
    from lora_da_fast import (collect_statistics, get_lora_da_state_dict, initialize_lora_da,
                              initialize_lora_da_weights, run_lora_da)
    from lora_da_fast.compat import estimate_lora_da_initializations, estimate_lora_da_initializations_for_betas

    ex = random_examples(4, seed=3)
    cfg = LoraDAConfig(rank=2, population_size=10, batch_size=2, backend="torch")
    lc = dict(r=2, target_modules=["q_proj", "v_proj"])
    compat = dict(target_modules=["q_proj"], rank=2, population_size=10, progress=False)
    return {
        "run_lora_da": lambda: run_lora_da(tiny_llama(), ex, cfg, progress=False),
        "collect_statistics": lambda: collect_statistics(tiny_llama(), ex, cfg, progress=False),
        "initialize_lora_da": lambda: initialize_lora_da(tiny_llama(), ex, LoraConfig(**lc), cfg, progress=False),
        "initialize_lora_da_weights": lambda: initialize_lora_da_weights(get_peft_model(tiny_llama(), LoraConfig(**lc)),
                                                                         ex, cfg, progress=False),
        "get_lora_da_state_dict": lambda: get_lora_da_state_dict(tiny_llama(), ex, cfg, lora_config=LoraConfig(**lc),
                                                                 progress=False),
        "compat": lambda: estimate_lora_da_initializations(tiny_llama(), ex, None, variance_beta=0.1, **compat),
        "compat_for_betas": lambda: estimate_lora_da_initializations_for_betas(tiny_llama(), ex, None,
                                                                               variance_betas=[0.0, 0.1], **compat),
        "cli": lambda: run(cli_args(data, tmp_path / "adapter", "--quiet"), capsys),
        "cli_stats_cache": lambda: run(cli_args(data, tmp_path / "adapter", "--quiet", "--stats-cache",
                                                tmp_path / "s.st"), capsys),
    }


@pytest.mark.parametrize("door", ["run_lora_da", "collect_statistics", "initialize_lora_da",
                                  "initialize_lora_da_weights", "get_lora_da_state_dict", "compat",
                                  "compat_for_betas", "cli", "cli_stats_cache"])
def test_every_door_runs_through_the_engine(door, tmp_path, data, cache, capsys):  # noqa: F811
    call = _doors(tmp_path, data, capsys)[door]
    with trace_engine() as seen:
        got = call()
    if door.startswith("cli"):
        assert got[0] == 0, got[2]
    passes = [s for s in seen if isinstance(s, tuple) and s[0] == "statistics pass"]
    solves = [s for s in seen if isinstance(s, tuple) and s[0] == "solve"]
    assert passes and all(under == "execute" for _, under in passes), seen
    assert all(under == "solve_lora_da" for _, under in solves), seen
    assert (solves == []) == (door == "collect_statistics"), seen
    assert seen.index("prepare_run") < seen.index("execute"), seen  # every check before the pass
    assert seen.count("prepare_run") == 1, seen  # examples sorted, checked and planned once


# --------------------------------------------------------------------------------------------------
# The import graph


def _modules():
    """``{dotted module name: path}`` of the package (the kernels link included)."""
    out = {}
    for folder, _, files in os.walk(PACKAGE, followlinks=True):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _imports(name, path, modules):
    """The package's modules that ``name`` imports (relative or absolute), including under
    ``TYPE_CHECKING`` (a static dependency all the same)."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "lora_da_fast" or mod.startswith("lora_da_fast."):
                for alias in node.names:
                    full = f"{mod}.{alias.name}"
                    found.add(full if full in modules else mod)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lora_da_fast")}
    return found - {name}


def _unit(name):
    """The unit of the layer table: a top-level module, or a subpackage as a whole."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer_table():
    """``{unit: layer}`` from the table of docs/implementation.md ("| N | `module` (what it is), `subpackage/` |")."""
    text = open(os.path.join(ROOT, "docs", "implementation.md")).read()
    section = text.split("## One engine, layered modules", 1)[1].split("\n## ", 1)[0]
    table = {}
    for layer, cells in re.findall(r"^\| (\d+) \| (.+) \|$", section, flags=re.M):
        for unit in re.findall(r"`([a-z_]+)/?`", re.sub(r"\([^()]*\)", "", cells)):  # not the (descriptions)
            table[unit] = int(layer)
    return table


def test_import_graph_has_no_circles_and_keeps_the_layers():
    modules = _modules()
    graph = {n: _imports(n, p, modules) for n, p in modules.items()}
    # no circles (a depth-first search over the module graph)
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for d in graph.get(n, ()):
            assert state.get(d) != "open", "import circle: " + " -> ".join(stack + [n, d])
            if d not in state:
                visit(d, stack + [n])
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n, [])
    table = _layer_table()
    units = {_unit(n) for n in modules} - {"__init__", "__main__"}
    assert units - set(table) == set(), "modules missing from docs/implementation.md's layer table"
    assert set(table) - units == set(), "the layer table names modules that do not exist"
    for n, deps in graph.items():
        u = _unit(n)
        if u in ("__init__", "__main__"):  # the package's face and the launcher: above everything
            continue
        for d in deps:
            v = _unit(d)
            assert v == u or table[v] < table[u], f"{n} (layer {table[u]}) imports {d} (layer {table[v]})"
    by_unit = {}
    for n, deps in graph.items():
        by_unit.setdefault(_unit(n), set()).update(_unit(d) for d in deps)
    assert "solve" not in by_unit["statistics"] and "statistics" not in by_unit["solve"]
    assert by_unit["kernels"] - {"kernels"} == set(), "kernels/ imports the package"
    assert by_unit["comm"] <= {"errors"}, "comm imports more of the package than its errors"
