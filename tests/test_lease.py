"""One writer per run (cluster/lease.py), on a real folder and on a real S3 server (moto)."""
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from cluster import lease as lease_module
from cluster.lease import LEASE_FILE, Lease, LeaseHeld, LeaseLost, UnsafeStore, claim_path
from cluster.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]

# A holder in a child process: acquires with ttl=3, keeps the lease alive, then sleeps.
HOLDER_SCRIPT = """
import sys, time
from cluster.lease import Lease
from cluster.storage import open_storage
Lease.acquire(open_storage(sys.argv[1], sys.argv[2] or None), ttl=3.0).keep_alive()
time.sleep(600)
"""


@pytest.fixture(params=["local", "s3"])
def run_dir(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "runs" / "demo"))
    return open_storage(f"s3://runs/lease-{uuid.uuid4().hex}", request.getfixturevalue("s3_server"))


@pytest.fixture
def caplog(caplog):
    caplog.set_level(logging.WARNING, logger="cluster.lease")
    return caplog


def holder(pid: int, submission_id: str | None = None) -> dict:
    return {"job_id": "01000000", "submission_id": submission_id, "cluster": "10.0.0.1:6379", "host": "node-a",
            "pid": pid}


def on_disk(storage) -> dict:
    return json.loads(storage.read(LEASE_FILE))


def write_stale_lease(storage, pid: int = 777) -> None:
    """The lease of a holder that renews no more, with a ttl of 1 s: a reader takes it over
    after watching it unchanged for 1 s."""
    storage.write(LEASE_FILE, json.dumps({**holder(pid), "acquired": time.time() - 20, "renewed": time.time() - 10,
                                          "ttl": 1.0, "token": "old-holder"}))


def released(storage) -> bool:
    """lease.json given back: gone (a folder), or marked released (S3: a conditional put)."""
    data = storage.read(LEASE_FILE)
    return data is None or json.loads(data).get("released") is True


def test_second_acquire_is_refused_naming_the_job_and_how_to_stop_it(run_dir):
    """Refused once the lease changes under its eyes: within a quarter of the ttl."""
    with Lease.acquire(run_dir, holder(123, "raysubmit_abc"), ttl=5.0) as first:
        t0 = time.monotonic()
        with pytest.raises(LeaseHeld) as refused:
            Lease.acquire(run_dir, holder(456))
        assert time.monotonic() - t0 < 5.0
        assert str(refused.value) == (
            f"run directory {run_dir.uri} is in use by Ray job raysubmit_abc (driver pid 123 on host node-a, cluster "
            "10.0.0.1:6379), its lease renewed while this process watched it; stop it with `ray job stop "
            "raysubmit_abc`, or wait for it to end")
        record = on_disk(run_dir)
        assert set(record) == {"job_id", "submission_id", "cluster", "host", "pid", "acquired", "renewed", "ttl",
                               "token"}
        assert record["token"] == first.token and record["pid"] == 123 and record["ttl"] == 5.0


def test_holder_without_a_submission_is_told_to_kill_the_process(run_dir):
    with Lease.acquire(run_dir, holder(123), ttl=5.0):
        with pytest.raises(LeaseHeld, match=r"in use by the driver of Ray job 01000000 \(pid 123 on host node-a, "
                                            r"cluster 10\.0\.0\.1:6379\).*stop it with `kill 123` on node-a"):
            Lease.acquire(run_dir, holder(456))


def test_release_lets_the_next_acquire_in(run_dir):
    Lease.acquire(run_dir, holder(123)).release()
    assert released(run_dir)
    t0 = time.monotonic()
    second = Lease.acquire(run_dir, holder(456))  # at once: nothing to watch
    assert on_disk(run_dir)["token"] == second.token and time.monotonic() - t0 < 5


def test_stale_lease_is_taken_over_with_a_warning(run_dir, caplog):
    write_stale_lease(run_dir, pid=777)
    taker = Lease.acquire(run_dir, holder(456))
    assert on_disk(run_dir)["token"] == taker.token
    assert "from the driver of Ray job 01000000 (pid 777 on host node-a" in caplog.text
    assert "not renewed while this process watched it for 1 s, its ttl" in caplog.text


def test_unrenewed_lease_is_taken_over_after_a_ttl_of_watching(run_dir, caplog):
    Lease.acquire(run_dir, holder(123), ttl=1.0)  # never renewed
    t0 = time.monotonic()
    Lease.acquire(run_dir, holder(456))
    assert 1.0 <= time.monotonic() - t0 < 3.0 and "pid 123" in caplog.text


@pytest.mark.slow  # waits out real ttls: in `make test`, not the inner loop
def test_a_live_holder_whose_clock_is_an_hour_behind_is_not_taken_over(run_dir):
    """Its `renewed` times say an hour ago; it renews all the same, and that is what is judged."""
    with Lease.acquire(run_dir, holder(123), ttl=5.0, clock=lambda: time.time() - 3600) as behind:
        assert on_disk(run_dir)["renewed"] < time.time() - 3500
        for _ in range(3):
            with pytest.raises(LeaseHeld, match="pid 123"):
                Lease.acquire(run_dir, holder(456))
        assert on_disk(run_dir)["token"] == behind.token and behind.lost is None


def test_corrupt_lease_is_taken_over(run_dir, caplog):
    run_dir.write(LEASE_FILE, b'{"token": "half writ')
    taker = Lease.acquire(run_dir, holder(456), ttl=1.0)  # watched for this ttl: its own is unknown
    assert on_disk(run_dir)["token"] == taker.token
    assert "is not a lease" in caplog.text


@pytest.mark.slow  # waits out real ttls: in `make test`, not the inner loop
def test_keep_alive_renews_past_the_ttl(run_dir):
    with Lease.acquire(run_dir, holder(123), ttl=5.0) as held:  # 5 s: renewals fsync, on a busy disk too
        acquired = on_disk(run_dir)["renewed"]
        time.sleep(6.0)  # past the ttl
        with pytest.raises(LeaseHeld):
            Lease.acquire(run_dir, holder(456))
        assert on_disk(run_dir)["renewed"] > acquired + 4.0
        assert held.lost is None
    assert released(run_dir)  # on leaving the block


@pytest.mark.slow  # waits out real ttls: in `make test`, not the inner loop
def test_killed_holder_is_taken_over_after_its_ttl(run_dir, caplog):
    child = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, run_dir.uri, run_dir.endpoint or ""], cwd=ROOT,
                             env=os.environ, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while run_dir.read(LEASE_FILE) is None:
            assert child.poll() is None, child.stderr.read()
            assert time.monotonic() < deadline, "the holder never wrote its lease"
            time.sleep(0.05)
        with pytest.raises(LeaseHeld, match=f"pid {child.pid} on host .*stop it with `kill {child.pid}`"):
            Lease.acquire(run_dir, holder(456))
    finally:
        child.kill()  # SIGKILL: no release, no last renewal
        child.wait()
    t0 = time.monotonic()
    taker = Lease.acquire(run_dir, holder(456))  # dead: its lease does not change for a ttl
    assert on_disk(run_dir)["token"] == taker.token and time.monotonic() - t0 >= 3.0
    assert f"taking over the lease of run directory {run_dir.uri} from process pid {child.pid}" in caplog.text


@pytest.mark.parametrize("start", ["stale", "empty"])
def test_concurrent_acquirers_exactly_one_wins(run_dir, start):
    if start == "stale":
        write_stale_lease(run_dir)
    barrier, winners, refused, errors = threading.Barrier(8), [], [], []

    def contend(pid: int) -> None:
        barrier.wait()
        try:
            winners.append(Lease.acquire(run_dir, holder(pid), ttl=5.0).keep_alive())  # as a driver does
        except LeaseHeld as e:
            refused.append(e)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=contend, args=(1000 + i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(winners) == 1 and len(refused) == 7
    assert on_disk(run_dir)["token"] == winners[0].token
    assert all(f"pid {winners[0].record['pid']} " in str(e) for e in refused)
    winners[0].release()


def test_renewal_after_a_takeover_does_not_clobber_it(run_dir, caplog):
    late = Lease.acquire(run_dir, holder(123), ttl=0.5)
    taker = Lease.acquire(run_dir, holder(456))  # after watching it unchanged for 0.5 s
    with pytest.raises(LeaseLost, match=r"it is now held by the driver of Ray job 01000000 \(pid 456 "):
        late.renew()
    late.keep_alive()  # the renewing thread finds the same, logs it and stops
    deadline = time.monotonic() + 5
    while late.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert late.lost is not None
    assert any(r.levelno == logging.ERROR and "stopped renewing" in r.getMessage() for r in caplog.records)
    late.release()  # not ours any more: left in place
    assert on_disk(run_dir)["token"] == taker.token


def test_a_holder_that_does_not_know_it_was_taken_over_releases_nothing_of_its_successor(run_dir):
    unaware = Lease.acquire(run_dir, holder(123), ttl=0.5)  # not renewing: taken over after 0.5 s
    taker = Lease.acquire(run_dir, holder(456))
    assert unaware.lost is None
    unaware.release()
    assert on_disk(run_dir)["token"] == taker.token and not released(run_dir)


def test_a_holder_whose_writes_fail_counts_its_lease_lost_before_anyone_can_take_it(s3_server):
    """Its renewals answered 503 (through a proxy in front of the S3 server); another process
    reads the server directly and takes the lease once it has not changed for a ttl: by then
    the holder has counted it lost, by its own clock, and said so."""
    from s3_proxy import SLOW_DOWN, S3Proxy
    failing = threading.Event()
    proxy = S3Proxy(s3_server, lambda method, path, headers: SLOW_DOWN if failing.is_set() and method == "PUT"
                    and path.endswith(f"/{LEASE_FILE}") else None)
    uri = f"s3://runs/lease-{uuid.uuid4().hex}"
    lost = []
    held = Lease.acquire(open_storage(uri, proxy.endpoint), holder(123), ttl=2.0)
    held.on_lost(lambda why: lost.append((time.monotonic(), why)))
    held.keep_alive()
    time.sleep(0.6)  # renewed at least once
    failing.set()
    taker = Lease.acquire(open_storage(uri, s3_server), holder(456))
    taken = time.monotonic()
    assert lost and lost[0][0] < taken, (lost, taken)
    assert re.fullmatch(rf"lost the lease of run directory {uri}: not renewed for 1\.\d s \(ttl 2 s\), so another "
                        r"driver may take it over(; last error: ClientError: .*SlowDown.*)?", lost[0][1]), lost[0][1]
    held.release()  # lost: nothing is written
    assert on_disk(open_storage(uri, s3_server))["token"] == taker.token
    proxy.close()


def test_a_store_that_ignores_conditional_writes_is_refused_naming_it_and_the_setting(s3_server, caplog):
    """A proxy in front of the S3 server drops If-None-Match and If-Match, as S3 clones that
    ignore them do: the probe at acquire finds it, and leaves nothing behind."""
    from s3_proxy import S3Proxy
    proxy = S3Proxy(s3_server, drop=["If-None-Match", "If-Match"])
    run_dir = open_storage(f"s3://runs/lease-{uuid.uuid4().hex}", proxy.endpoint)
    with pytest.raises(UnsafeStore, match=rf"^run\.storage_path: the S3 store at {proxy.endpoint} ignores "
                                          r"If-None-Match: \*, If-Match on another ETag, If-Match on a missing key on "
                                          r"PutObject: two drivers of the run could both hold its lease and write it "
                                          r"together; .*set run\.lease_without_conditional_writes=true to accept "
                                          r"that risk$"):
        Lease.acquire(run_dir, holder(123))
    assert run_dir.fs.get_file_info(run_dir.root).type.name == "NotFound" or not [
        i for i in run_dir.fs.get_file_info(__import__("pyarrow.fs").fs.FileSelector(run_dir.root, recursive=True))]
    held = Lease.acquire(run_dir, holder(123), unsafe_store=True)
    assert "(run.lease_without_conditional_writes=true)" in caplog.text and on_disk(run_dir)["token"] == held.token
    held.release()
    proxy.close()


def test_dead_claim_is_removed(tmp_path, caplog):
    """A process that died halfway through changing a local lease leaves its claim file behind."""
    run_dir = open_storage(str(tmp_path / "run"))
    write_stale_lease(run_dir)
    stale = run_dir.read(LEASE_FILE)
    claim = {**holder(888), "acquired": time.time() - 5, "renewed": time.time() - 5, "ttl": 1.0, "token": "dead"}
    Path(claim_path(run_dir.path(LEASE_FILE), stale)).write_text(json.dumps(claim))
    Lease.acquire(run_dir, holder(456))
    assert "left by the driver of Ray job 01000000 (pid 888" in caplog.text
    assert sorted(p.name for p in Path(run_dir.root).iterdir()) == [LEASE_FILE]


def test_live_claim_names_its_claimant(tmp_path, monkeypatch):
    run_dir = open_storage(str(tmp_path / "run"))
    write_stale_lease(run_dir)
    claim = {**holder(999), "acquired": time.time(), "renewed": time.time(), "ttl": 60.0, "token": "busy"}
    Path(claim_path(run_dir.path(LEASE_FILE), run_dir.read(LEASE_FILE))).write_text(json.dumps(claim))
    monkeypatch.setattr(lease_module, "CONTENTION_S", 0.2)
    with pytest.raises(LeaseHeld, match="pid 999 on host node-a"):
        Lease.acquire(run_dir, holder(456))


def test_holder_info_names_this_process_and_its_submission():
    probe = "import json, sys; from cluster.lease import holder_info; print(json.dumps(holder_info())); " \
            "assert 'ray' not in sys.modules"
    env = {k: v for k, v in os.environ.items() if k != "RAY_JOB_CONFIG_JSON_ENV_VAR"}
    plain = json.loads(subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, check=True,
                                      capture_output=True, text=True).stdout)
    assert plain["job_id"] is None and plain["submission_id"] is None and plain["cluster"] is None
    assert isinstance(plain["pid"], int) and plain["host"]
    # What Ray's job supervisor sets for a `ray job submit` entrypoint.
    env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps({"runtime_env": {}, "metadata": {
        "job_submission_id": "raysubmit_xyz", "job_name": "raysubmit_xyz"}})
    submitted = json.loads(subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, check=True,
                                          capture_output=True, text=True).stdout)
    assert submitted["submission_id"] == "raysubmit_xyz"


def test_no_credential_reaches_the_lease_or_a_message(s3_server, tmp_path, caplog):
    credentials = tmp_path / "credentials"
    credentials.write_text("[default]\naws_access_key_id = AKIDLEASETEST\naws_secret_access_key = s3cr3t-lease\n")
    credentials.chmod(0o600)
    run_dir = open_storage(f"s3://runs/lease-{uuid.uuid4().hex}", s3_server, credentials_file=str(credentials))
    write_stale_lease(run_dir)
    held = Lease.acquire(run_dir, {**holder(123), "secret_key": "s3cr3t-lease"}, ttl=5.0).keep_alive()
    with pytest.raises(LeaseHeld) as refused:
        Lease.acquire(run_dir, holder(456))
    held.release()
    seen = run_dir.read(LEASE_FILE) or b""
    for text in (str(refused.value), caplog.text, json.dumps(held.record), seen.decode()):
        assert "AKIDLEASETEST" not in text and "s3cr3t-lease" not in text
