"""The architecture of docs/architecture.md, checked on the source: no import cycles (function-local and
TYPE_CHECKING imports counted), packages import only layers below them, bookkeeping collectives only
through llmtrain.distributed, functions stay short, and nothing points outside the repository."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "llmtrain"

# bottom -> top; a package may import itself and any package of a lower layer (docs/architecture.md)
LAYERS: list[list[str]] = [
    ["config", "paths"],
    ["distributed"],
    ["models", "data", "optim"],
    ["checkpoint"],
    ["parallel"],
    ["peft"],
    ["objectives"],
    ["tracking"],
    ["resilience"],
    ["train"],
    ["plan"],
    ["launch"],
    ["cli"],
    ["testing"],
]
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "gather",
    "gather_object",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "monitored_barrier",
}
# modules that run collectives on *model* tensors on their own device (not bookkeeping values)
MODEL_TENSOR_COLLECTIVES = {
    "llmtrain.parallel.data_parallel": "gradient all-reduce (TP/PP without ZeRO)",
    "llmtrain.parallel.backends.megatron": "tensor-parallel weight gather for export",
    "llmtrain.parallel.expert_parallel": "token dispatch/combine all-to-all of activations (and their counts)",
    "llmtrain.parallel.context_parallel": "K/V all-gather and its gradient reduce-scatter",
}
MAX_FUNCTION_LINES = 70


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    """llmtrain modules imported anywhere in `module` (top level, functions, TYPE_CHECKING blocks)."""
    out = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            r = _resolve(t) if t.split(".")[0] == "llmtrain" else None
            # importing a module imports its package __init__ too: that edge is not a cycle of ours
            if r and r != module and not module.startswith(r + "."):
                out.add(r)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_cycle_finder_sees_a_cycle():
    """The checker itself: a two-module loop and a three-module loop are found, a chain is not."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(_cycles(graph)) == [["a", "b"], ["c", "d", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(GRAPH) == [], "import cycles (function-local and TYPE_CHECKING imports count)"


def test_packages_import_only_lower_layers():
    layer = {pkg: i for i, pkgs in enumerate(LAYERS) for pkg in pkgs}
    packages = {_package(m) for m in MODULES} - {"__init__"}
    assert packages <= set(layer), f"packages missing from LAYERS: {sorted(packages - set(layer))}"
    bad = defaultdict(list)
    for m, deps in GRAPH.items():
        src = _package(m)
        for d in deps:
            dst = _package(d)
            if dst != src and dst != "__init__" and layer[dst] >= layer[src]:
                bad[f"{src} -> {dst}"].append(f"{m} imports {d}")
    assert not bad, "upward or sideways imports:\n" + "\n".join(f"{k}: {v}" for k, v in sorted(bad.items()))


def _collective_calls(path: Path) -> list[str]:
    """`dist.<collective>(...)` / `torch.distributed.<collective>(...)` calls in a file."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in COLLECTIVES
        ):
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed", "c10d"):
                calls.append(f"{path.relative_to(ROOT)}:{node.lineno} {owner}.{node.func.attr}")
    return calls


def test_bookkeeping_collectives_only_in_distributed():
    """Loss sums, token counts, norms, flags and small objects are reduced by llmtrain.distributed
    (correct on NCCL and gloo); elsewhere only listed modules reduce model tensors on their device."""
    offenders = []
    for m, path in MODULES.items():
        if m.startswith("llmtrain.distributed") or m in MODEL_TENSOR_COLLECTIVES:
            continue
        offenders += _collective_calls(path)
    assert offenders == [], "use llmtrain.distributed.collectives instead:\n" + "\n".join(offenders)
    for m in MODEL_TENSOR_COLLECTIVES:  # the allowance is not stale
        assert _collective_calls(MODULES[m]), f"{m} no longer needs its collective allowance"


def test_functions_are_short():
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


@pytest.mark.parametrize(
    "folder", ["llmtrain", "tools", "conf", "launchers", "docs", "bench", "tests", ".ci", "README.md"]
)
def test_repository_stands_alone(folder):
    """No file points at the shared folder outside the repository (its facts live in docs/)."""
    needles = ("../shared", "STYLE.md", "FACTS.md", "DESIGN.md")
    top = ROOT / folder
    hits = [
        f"{p.relative_to(ROOT)}"
        for p in ([top] if top.is_file() else top.rglob("*"))
        if p.is_file()
        and p.suffix in (".py", ".md", ".yaml", ".sh", ".toml")
        and p.name != "test_architecture.py"
        and any(n in p.read_text(errors="ignore") for n in needles)
    ]
    assert hits == []
