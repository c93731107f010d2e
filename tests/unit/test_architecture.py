"""The package's shape: imports run one way (no cycles, each layer imports only layers below it), nothing imports the
CLI, only `config` reads the environment, and no module grows past about 500 lines. Read from the source with `ast`
by scripts/module_map.py, the same tool that prints the module map."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("module_map", ROOT / "scripts" / "module_map.py")
module_map = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module_map)

# lower number, lower layer: a module may import only modules of a lower layer
LAYERS = {
    "config": 0,
    "lake": 1, "resilience": 1,
    "registry": 2, "cluster": 2, "tables": 2,
    "ingest": 3, "backup": 3,
    "curate": 4,
    "features": 5,
    "engine": 6,
    "feature_store": 6, "predlog": 6,
    "profile": 7, "model": 7, "service": 7, "frame": 7,
    "train": 8, "api": 8, "domain": 8,
    "tune": 9, "serve": 9,
    "retrain": 10,
    "drift": 11,
    "demo": 12,
    "cli": 13,
}
SERVING = {"service", "api", "serve"}
TRAINING = {"frame", "model", "train", "tune", "retrain", "drift", "profile", "feature_store"}


@pytest.fixture(scope="module")
def graph():
    return module_map.graph()


def test_every_module_has_a_layer(graph):
    assert set(graph) <= set(LAYERS), f"modules without a layer: {sorted(set(graph) - set(LAYERS))}"


def test_no_import_cycles(graph):
    assert module_map.cycles(graph) == []


def test_imports_run_downwards(graph):
    upward = [f"{a} -> {b}" for a, deps in graph.items() for b in deps if LAYERS.get(b, 99) >= LAYERS.get(a, -1)]
    assert upward == []


def test_serving_needs_only_the_model_artifact(graph):
    wrong = [f"{a} -> {b}" for a in SERVING & set(graph) for b in graph[a] if b in TRAINING]
    assert wrong == []


def test_nothing_imports_the_cli(graph):
    assert [a for a, deps in graph.items() if "cli" in deps] == []


def test_only_config_reads_the_environment():
    assert module_map.env_reads() == []


def test_modules_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "spam_mlops").glob("*.py") if p.stem != "_modidx"}
    assert {k: v for k, v in sizes.items() if v > 520} == {}


def test_the_checker_sees_a_cycle_and_package_imports():
    "The checks can fail: a made-up cycle is found, and every spelling of a package import is seen."
    assert module_map.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    import ast
    tree = ast.parse("from .b import x\nfrom spam_mlops import c\nimport spam_mlops.d\n")
    assert module_map.imports(tree, {"b", "c", "d", "e"}) == {"b", "c", "d"}


def test_lines_stay_within_120_characters():
    "Every line of the package, tests, benchmarks and scripts, but what nbdev generates (`__all__`, the index files)."
    long = []
    for folder in ("spam_mlops", "tests", "bench", "scripts"):
        for p in (ROOT / folder).rglob("*.py"):
            if p.name == "_modidx.py" or p.relative_to(ROOT).as_posix() == "spam_mlops/__init__.py": continue
            long += [f"{p.relative_to(ROOT)}:{i}" for i, line in enumerate(p.read_text().splitlines(), 1)
                     if len(line) > 120 and not line.startswith("__all__ = ")]
    assert long == []
