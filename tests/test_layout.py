"""The layout DESIGN.md describes, checked on the source: what each folder may import, no
import cycles, Ray's private APIs in one module, and the Ray-free modules really Ray-free."""
import ast
import re
import subprocess
import sys

from conftest import ROOT

PACKAGES = ("mae", "cluster", "pipelines")


def our_imports() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (anywhere in the file)."""
    graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            names = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module)
                    names.update(f"{node.module}.{alias.name}" for alias in node.names)
            graph[module] = {n for n in names if n.split(".")[0] in PACKAGES} - {module}
    return {m: {n for n in deps if n in graph} for m, deps in graph.items()}


def all_imports(package: str) -> set[str]:
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_mae_and_cluster_sit_at_the_bottom():
    assert not all_imports("mae") & {"ray", "cluster", "pipelines"}
    assert not all_imports("cluster") & {"mae", "pipelines"}


def test_the_import_graph_has_no_cycle():
    graph = our_imports()
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(module):] + [module])}")
        if module in done:
            return
        path.append(module)
        for dep in graph[module]:
            visit(dep)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


COMMANDS = {"pretrain", "finetune", "linprobe", "prepare_shards", "export", "evaluate", "visualize", "results",
            "compare_loss"}
SUB_PACKAGES = {"common", "driver", "worker", "data", "output"}


def test_pipelines_top_holds_only_commands_and_the_library_sits_by_where_it_runs():
    """The commands at the top of pipelines/, each with a main() run as a script; the library
    below them in one folder per place where its code runs."""
    top = {path.stem for path in (ROOT / "pipelines").glob("*.py")} - {"__init__"}
    assert top == COMMANDS
    for name in COMMANDS:
        tree = ast.parse((ROOT / "pipelines" / f"{name}.py").read_text())
        assert any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body), name
        assert any(isinstance(n, ast.ImportFrom) and any(a.name == "main" for a in n.names) or
                   isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), name
    folders = {p.name for p in (ROOT / "pipelines").iterdir() if (p / "__init__.py").exists()}
    assert folders == SUB_PACKAGES


def test_the_floors_between_the_sub_packages():
    """No library module imports a command; the worker reaches the data side only through what
    it consumes (the lanes and the skip ledger), never the driver; the data and output sides
    never import the driver or the worker."""
    graph = our_imports()
    commands = {f"pipelines.{name}" for name in COMMANDS}
    for module, deps in graph.items():
        parts = module.split(".")
        if parts[0] != "pipelines" or len(parts) < 3:
            continue
        assert not deps & commands, f"{module} imports a command: {sorted(deps & commands)}"
        folders = {d.split(".")[1] for d in deps if d.startswith("pipelines.") and d.count(".") >= 2}
        if parts[1] == "worker":
            data = {d for d in deps if d.startswith("pipelines.data.")}
            assert data <= {"pipelines.data.lanes", "pipelines.data.skips"}, f"{module} imports {sorted(data)}"
            assert "driver" not in folders, module
        if parts[1] in ("data", "output"):
            assert not folders & {"driver", "worker"}, f"{module} imports {sorted(folders)}"


def test_private_ray_apis_only_in_ray_compat():
    private = re.compile(r"ray(\.\w+)*\._\w+|\._(execution_idx|resource_manager|data_context)\b|worker_group\.execute")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for package in (*PACKAGES, "benchmarks")
                 for path in (ROOT / package).rglob("*.py") if path.name != "ray_compat.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert not offenders


def test_reading_imports_no_ray_the_train_loop_no_data_module_and_the_driver_no_model_code(digits):
    """(The driver builds no model and decodes no image: timm and torchvision cost each run's
    driver ~2 s of CPU. Its probe also does what the driver does with the config and the
    data before the run: the decoders' view of the config, the figures' held-out images.)"""
    driver = (f"from pipelines.common.config import load_config; from pipelines.data.reading import open_source; "
              f"load_config('configs/debug.yaml', ['data.path={digits}']).augment.view; "
              f"assert len(open_source('imagefolder', '{digits}').held_out(8)) == 32")
    probes = {"pipelines.data.reading": ("ray", "pass"),
              "pipelines.worker.loop": (("pipelines.data.reading", "pipelines.data.stream"), "pass"),
              "pipelines.driver.launch": (("timm", "torchvision", "mae.model", "mae.transforms"), driver)}
    running = {module: subprocess.Popen(  # each in a fresh interpreter, all at once
        [sys.executable, "-c", f"import sys, {module}; {then}; "
                               f"print([m for m in sys.modules if m.startswith({unwanted!r})])"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for module, (unwanted, then) in probes.items()}
    for module, proc in running.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        assert stdout.strip() == "[]", f"{module} imports {stdout.strip()}"
