"""The installed package is the library alone: no import cycle, nothing imported from the recipe, the scripts or
the benchmarks, a wheel without them but with the bundled model and configs, and an architecture page whose
module diagram is the package's real one."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import package_imports
import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIR = REPO / "piip_llava"
# Top-level names that live beside the package in the repository, never inside it.
OUTSIDE_THE_PACKAGE = ("demo_recipe", "scripts", "benchmarks", "tests", "eval", "train_demo_model", "piip_experiment",
                       "run_benchmarks", "bench_demo_schedule", "bench_training", "perception_flops", "package_imports")


def test_the_package_has_no_import_cycle():
    graph = package_imports.import_graph(PACKAGE_DIR)
    assert len(graph) > 50 and "piip_llava.models.piip.modeling_piip" in graph
    assert package_imports.import_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert package_imports.import_cycles(graph) == [["a", "b", "c"]]


def test_relative_imports_resolve_to_the_modules_they_name():
    graph = package_imports.import_graph(PACKAGE_DIR)
    assert "piip_llava.training.precision" in graph["piip_llava.training.trainer"]
    assert "piip_llava.models.piip_llava.projector" in graph["piip_llava.models.piip_llava"]
    assert "piip_llava.commands.train" in graph["piip_llava.cli"]


def test_nothing_in_the_package_imports_the_recipe_scripts_or_benchmarks():
    assert package_imports.outside_imports(PACKAGE_DIR, OUTSIDE_THE_PACKAGE) == []


def test_the_import_check_sees_an_import_of_the_recipe(tmp_path):
    package = tmp_path / "piip_llava"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "leaky.py").write_text("def run():\n    from demo_recipe.pipeline import Recipe\n    return Recipe\n")
    assert package_imports.outside_imports(package, OUTSIDE_THE_PACKAGE) == [
        "piip_llava/leaky.py:2 demo_recipe.pipeline", "piip_llava/leaky.py:2 demo_recipe.pipeline.Recipe"]


def test_the_architecture_page_shows_the_real_module_diagram():
    page = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    diagram = package_imports.mermaid(package_imports.import_graph(PACKAGE_DIR))
    assert f"```mermaid\n{diagram}\n```" in page, "regenerate it: python scripts/package_imports.py"


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> list[str]:
    """The file list of a wheel built from the package's sources, copied so the build leaves the checkout alone."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in ("piip_llava", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(root / "dist"), str(source)],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (root / "dist").glob("piip_llava-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_the_wheel_holds_the_library_the_bundled_model_and_the_configs(wheel_files):
    tracked = subprocess.run(["git", "ls-files", "piip_llava"], cwd=REPO, capture_output=True, text=True, check=True)
    package_files = [line for line in tracked.stdout.splitlines() if line]
    if not package_files:  # a copy of the sources without git: the files on disk
        package_files = [str(path.relative_to(REPO)) for path in PACKAGE_DIR.rglob("*")
                         if path.is_file() and "__pycache__" not in path.parts]
    assert sorted(set(package_files) - set(wheel_files)) == []
    assert {"piip_llava/assets/demo_model/model.safetensors", "piip_llava/assets/demo_model/tokenizer.json",
            "piip_llava/configs/demo_piip_vision.json"} <= set(wheel_files)
    assert any(name.startswith("piip_llava/configs/perception/") for name in wheel_files)


def test_the_wheel_holds_no_recipe_script_or_benchmark_module(wheel_files):
    top_level = {name.split("/")[0] for name in wheel_files}
    assert top_level == {"piip_llava", *(name for name in top_level if name.endswith(".dist-info"))}
    stray = [name for name in wheel_files if Path(name).stem in OUTSIDE_THE_PACKAGE
             or any(part in OUTSIDE_THE_PACKAGE for part in Path(name).parts)]
    assert stray == []
    assert not any(name.startswith("piip_llava/synthetic/") and Path(name).stem in ("pipeline", "pretraining")
                   for name in wheel_files)
