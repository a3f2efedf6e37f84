"""The accelerator table, the preflight arithmetic, storage, and the order in which a
worker prepares its device and joins the process group (on the real local cluster)."""
import dataclasses
import json
import re

import pytest
import ray.train
import torch
from ray.train.torch import TorchTrainer

from cluster.accelerators import ACCELERATORS, prepare_device, resolve
from cluster.preflight import fit_errors
from cluster.storage import open_storage
from cluster.torch_backend import AcceleratorTorchConfig

EXPECTED_ROWS = {
    # name: (device type, plugin, backend, Ray resource, visible-devices variable)
    "cpu": ("cpu", None, "gloo", None, None),
    "cuda": ("cuda", None, "nccl", "GPU", "CUDA_VISIBLE_DEVICES"),
    "sdaa": ("sdaa", "torch_sdaa", "tccl", "sdaa", "SDAA_VISIBLE_DEVICES"),
    "npu": ("npu", "torch_npu", "hccl", "NPU", "ASCEND_RT_VISIBLE_DEVICES"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_accelerator_rows(name):
    row = ACCELERATORS[name]
    assert (row.device_type, row.plugin, row.backend, row.resource, row.visible_devices) == EXPECTED_ROWS[name]
    assert "fp32" in row.amp_dtypes and "bf16" in row.amp_dtypes
    assert ("fp16" in row.amp_dtypes) == (name != "cpu")


def test_scalers_per_row():
    assert ACCELERATORS["sdaa"].scaler == "torch.sdaa.amp.GradScaler"
    assert ACCELERATORS["npu"].scaler == "torch.npu.amp.GradScaler"
    scaler = ACCELERATORS["cpu"].make_scaler(enabled=False)
    assert isinstance(scaler, torch.amp.GradScaler) and not scaler.is_enabled()
    assert ACCELERATORS["cuda"].make_scaler(enabled=False)._device == "cuda"


def test_device_type_override_keeps_the_resource():
    row = resolve("sdaa", "cpu")
    assert (row.name, row.resource, row.device_type, row.plugin, row.backend) == ("sdaa", "sdaa", "cpu", None, "gloo")
    assert resolve("sdaa") is ACCELERATORS["sdaa"]


def test_missing_plugin_is_one_clear_error():
    with pytest.raises(RuntimeError, match="scaling.accelerator=sdaa: cannot import its torch plugin 'torch_sdaa'"):
        prepare_device(ACCELERATORS["sdaa"], 0)


@pytest.mark.parametrize("workers,per_worker,data_cpus,nodes,message", [
    (4, {"CPU": 1, "sdaa": 1}, 1, [{"CPU": 16, "sdaa": 2}], r"4 workers x 1 sdaa need 4 sdaa; the cluster has 2 sdaa"),
    (2, {"CPU": 2}, 1, [{"CPU": 4}], r"2 workers x 2 CPU \+ 1 CPU for decoding \(data.min_cpus\) need 5 CPU; "
                                     r"the cluster has 4 CPU on 1 node"),
    (2, {"CPU": 1, "GPU": 1}, 0, [{"CPU": 8}], r"need 2 GPU; the cluster has 0 GPU"),
    (4, {"CPU": 4, "GPU": 1}, 0, [{"CPU": 8, "GPU": 1}] * 2 + [{"CPU": 0, "GPU": 2}],
     r"each worker needs \{'CPU': 4, 'GPU': 1\} on one node; only 2 such bundles fit"),
])
def test_fit_errors_name_the_resource_and_numbers(workers, per_worker, data_cpus, nodes, message):
    errors = fit_errors(workers, per_worker, data_cpus, nodes)
    assert len(errors) == 1
    assert re.search(message, errors[0]), errors[0]


def test_fits():
    assert fit_errors(8, {"CPU": 1, "sdaa": 1}, 4, [{"CPU": 32, "sdaa": 4}, {"CPU": 32, "sdaa": 4}]) == []
    assert fit_errors(2, {"CPU": 0.5}, 1, [{"CPU": 2}]) == []


def test_local_and_s3_storage_write_read_and_leave_nothing_on_failure(tmp_path, s3_server):
    for uri, endpoint in ((str(tmp_path / "runs"), None), ("s3://runs/storage-test", s3_server)):
        run = open_storage(uri, endpoint).child("r1")
        run.write("a/b.txt", "hello")
        run.write("a/b.txt", b"hello again")  # whole-file replacement
        assert run.read("a/b.txt") == b"hello again" and run.read("missing") is None
    (tmp_path / "run" / "c").mkdir(parents=True)
    (tmp_path / "run" / "c" / "kept").write_text("x")
    with pytest.raises(OSError):  # the rename fails: a folder holds the name
        open_storage(str(tmp_path / "run")).write("c", b"lost")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["c"]  # no temporary file left
    assert [p.name for p in (tmp_path / "run" / "c").iterdir()] == ["kept"]
    with pytest.raises(ValueError, match="unsupported storage 'gs://x'"):
        open_storage("gs://x")


@pytest.mark.slow  # a Ray Train worker group on the cluster
def test_plugin_imported_and_device_set_before_the_process_group(ray_client, tmp_path):
    """A row whose plugin is a real module that records, as it is imported, whether the
    process group exists yet: every worker imports it before init_process_group, and the
    group exists when the loop runs. Scheduled on the custom `sdaa` resource: one worker per unit."""
    plugin = tmp_path / "probe_plugin"
    plugin.mkdir()
    (plugin / "__init__.py").write_text(
        "import json, os\nimport torch.distributed\n"
        f"with open(os.path.join({str(tmp_path)!r}, f'import-{{os.getpid()}}.json'), 'w') as f:\n"
        "    json.dump({'process_group_initialized': torch.distributed.is_initialized()}, f)\n")

    def report_preparation(config):  # defined here so that Ray ships it by value
        import json
        import os
        seen = {"pid": os.getpid(), "initialized_in_loop": torch.distributed.is_initialized(),
                "resources": ray.get_runtime_context().get_assigned_resources()}
        rank = ray.train.get_context().get_world_rank()
        (config["out"] / f"rank{rank}.json").write_text(json.dumps(seen))

    row = dataclasses.replace(resolve("sdaa", "cpu"), plugin="probe_plugin")
    trainer = TorchTrainer(
        report_preparation, train_loop_config={"out": tmp_path}, torch_config=AcceleratorTorchConfig(accelerator=row),
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25, "sdaa": 1}),
        run_config=ray.train.RunConfig(name="order", storage_path=str(tmp_path),
                                       worker_runtime_env={"env_vars": {"PYTHONPATH": str(tmp_path)}}))
    trainer.fit()
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        imported = json.loads((tmp_path / f"import-{seen['pid']}.json").read_text())  # in this worker's process
        assert imported == {"process_group_initialized": False}
        assert seen["initialized_in_loop"] is True
        assert seen["resources"] == {"CPU": 0.25, "sdaa": 1.0}


def test_ray_outside_the_tested_versions_is_refused_at_import():
    """The private Ray APIs are pinned: another Ray stops with one line naming the range."""
    import subprocess
    import sys
    from conftest import ROOT
    probe = "import ray; ray.__version__ = '2.59.0'; import cluster.ray_compat"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "cluster.ray_compat.RayVersionError: Ray 2.59.0 is installed; this pipeline uses private Ray APIs tested "
        "only on ray>=2.60,<2.61 (cluster/ray_compat.py): install a version in that range")


def test_cluster_files_declare_sdaa_token_auth_and_the_entry_point():
    import yaml
    from conftest import ROOT
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    starts = " ".join(launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"])
    assert starts.count("""--resources='{"sdaa": 8}'""") == 2 and starts.count("RAY_AUTH_MODE=token") == 2
    assert "--dashboard-host=127.0.0.1" in starts
    assert {".venv", "data", "runs", "build", "*.so", "*.egg-info"} <= set(launcher["rsync_exclude"])
    assert launcher["rsync_filter"] == [".gitignore"]
    assert "chmod 600 ~/.ray/auth_token" in launcher["setup_commands"]
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and "pipelines/pretrain.py" in job["spec"]["entrypoint"]
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token" and spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert json.loads(json.loads(spec["workerGroupSpecs"][0]["rayStartParams"]["resources"])) == {"sdaa": 8}


def test_every_ray_command_the_operator_files_name_exists():
    """`ray <command> --flag` in cluster/ray-cluster.yaml and cluster/README.md: each command
    and each of its long flags is in the installed Ray's own --help, as `ray <command> --help`
    prints it: the `ray` script's click group (`ray.scripts.scripts:main` calls `cli()`), run
    here by click's test runner (a `ray` process per command was 2 s of CPU each)."""
    from click.testing import CliRunner
    from ray.scripts.scripts import cli

    from conftest import ROOT
    readme = (ROOT / "cluster" / "README.md").read_text()
    code = re.findall(r"```(.*?)```", readme, re.S)  # README's code blocks and `inline code`, not its prose
    code += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", readme, flags=re.S))
    code = [re.sub(r"(^|\s)#.*", "", line) for block in code for line in block.splitlines()]  # comments: prose
    text = (ROOT / "cluster" / "ray-cluster.yaml").read_text() + "\n".join(code)
    named = {}
    for m in re.finditer(r"\bray ([a-z][a-z-]+)([^\n`|#]*)", text):
        own = m.group(2).split(" -- ")[0]  # after " -- " come the entry point's own arguments
        named.setdefault(m.group(1), set()).update(re.findall(r"(--[a-z][a-z-]*)", own))
    assert {"up", "start", "stop", "dashboard", "job", "get-auth-token"} <= set(named)
    for command, flags in named.items():
        args = [command, "submit", "--help"] if command == "job" else [command, "--help"]
        out = CliRunner().invoke(cli, args, prog_name="ray")
        assert out.exit_code == 0, f"ray {command}: {out.output[-500:]}"
        assert not [f for f in flags if f not in out.output], f"ray {command} has no {flags}"

