"""Shared fixtures: one real local Ray cluster for the whole session, real JPEG files."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))  # the venv's ray, so workers use its python

# Token auth turns on when ~/.ray/auth_token exists; the CLI, the cluster, this process and
# the entry points started by the tests must agree, so the tests run without it.
os.environ["RAY_AUTH_MODE"] = "disabled"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """`ray start --head` from the project's venv; yields its address (also set as
    RAY_ADDRESS, so entry points started by tests join it)."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([RAY, "start", "--head", f"--port={address.split(':')[1]}", "--node-ip-address=127.0.0.1",
                    "--num-cpus=4", f"--object-store-memory={400 * 2**20}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={_free_port()}",
                    f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True)
    os.environ["RAY_ADDRESS"] = address
    try:
        yield address
    finally:
        import ray
        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)
        os.environ.pop("RAY_ADDRESS", None)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_client(ray_cluster):
    """This process connected to the shared cluster (for tests that run Ray Data here)."""
    import ray
    ray.init(address=ray_cluster, ignore_reinit_error=True, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The real demo dataset (scikit-learn digits as JPEG files), written once."""
    from pipelines.demo_data import write_digits
    return write_digits(tmp_path_factory.mktemp("data") / "digits")
