"""The package's layout promises: the test kit stays out of what serves validators, tests stand alone."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "openai_miner"
SERVING = [
    "openai_miner", "openai_miner.cli", "openai_miner.miner", "openai_miner.core",
    "openai_miner.fronts.axon", "openai_miner.sources", "openai_miner.sources.local",
]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.slow
@pytest.mark.parametrize("module", SERVING)
def test_serving_modules_load_nothing_from_the_test_kit(module: str) -> None:
    probe = (
        f"import sys, {module}; "
        "print(sorted(m for m in sys.modules if m.startswith(('openai_miner.testing', 'openai_miner.demo'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_only_the_test_kit_and_the_demo_import_it_and_nothing_imports_unittest() -> None:
    for path in PACKAGE.rglob("*.py"):
        imports = imported_modules(path)
        assert not any(name.split(".")[0] == "unittest" for name in imports), path
        inside = path.is_relative_to(PACKAGE / "testing") or path.name == "demo.py"
        if not inside:
            assert not any(name.startswith("openai_miner.testing") for name in imports), path


def test_no_test_module_imports_another() -> None:
    tests = ROOT / "tests"
    for path in tests.glob("test_*.py"):
        others = {name for name in imported_modules(path) if name.startswith("tests.test_") or name == "tests.conftest"}
        assert not others, f"{path.name} imports {others}: share through tests/helpers.py or a fixture"


@pytest.mark.slow
def test_the_core_fronts_and_drain_load_no_langchain() -> None:
    """The core speaks its own types (:class:`~openai_miner.messages.Message`, a result naming its
    source): only the OpenAI source, which calls LangChain's chat model, loads LangChain."""
    probe = (
        "import sys, openai_miner.core, openai_miner.streaming, openai_miner.fronts.http, "
        "openai_miner.fronts.loosh, openai_miner.fronts.axon; "
        "print(sorted(m for m in sys.modules if m.split('.')[0].startswith('langchain')))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_only_the_openai_source_imports_langchain() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path != PACKAGE / "sources" / "openai.py":
            assert not any(name.split(".")[0].startswith("langchain") for name in imported_modules(path)), path
