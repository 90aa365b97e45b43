"""`add --engine ray`: a local Ray on this machine, real Redis (embedded and the 3-master
Cluster), BUSI and the real model; workers and the driver killed mid-run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from cbir import api
from cbir.pipeline.distributed import RayCluster
from cbir.store import lock
from cbir.store.database import VectorStore
from cbir.store.redis.connect import connect

from .conftest import ROOT, TEST_INPUT_SIZE, record_fault
from .test_pipeline import _every_busi_image_once, _once_stored

pytest.importorskip("ray")
ONE_WORKER = RayCluster(workers=1)


def _vectors_by_name(store: VectorStore) -> dict[str, tuple[str, np.ndarray]]:
    ids, vectors, records = store.load_with_records()
    return {record.name: (record.label, vector) for record, vector in zip(records, vectors)}


@pytest.fixture(scope="module")
def local_busi(embedded_client, busi):
    """BUSI indexed by a local `add`: the reference of the Ray runs."""
    store = VectorStore(embedded_client, "ray-reference")
    api.start_over(store)
    report = api.add(store, api.load_items(busi), api.model_for_add(store, input_size=TEST_INPUT_SIZE), progress=False)
    assert report.new == 780
    yield _vectors_by_name(store)
    store.drop()


@pytest.mark.parametrize("where", ["embedded", "cluster"])
def test_ray_stores_what_a_local_add_stores(where, request, local_busi, busi, db_name):
    url = request.getfixturevalue("cluster_url") if where == "cluster" else None
    client = connect(url) if url else request.getfixturevalue("embedded_client")
    store = VectorStore(client, db_name)
    try:
        report = api.add(store, api.load_items(busi), api.model_for_add(store, input_size=TEST_INPUT_SIZE),
                         progress=False, ray=ONE_WORKER, redis_url=url)
        assert (report.new, report.unchanged, report.failures) == (780, 0, [])
        found = _vectors_by_name(store)
        assert found.keys() == local_busi.keys()
        assert all(found[name][0] == local_busi[name][0] for name in found)  # labels
        difference = max(float(np.abs(found[name][1] - local_busi[name][1]).max()) for name in found)
        assert difference <= 1e-5
        again = api.add(store, api.load_items(busi), api.model_for_add(store), progress=False, ray=ONE_WORKER,
                        redis_url=url)
        assert (again.new, again.unchanged) == (0, 780)  # stored images skipped before the model
    finally:
        store.drop()


def test_a_ray_run_whose_first_results_outlast_the_lock_time_out_keeps_its_lock(embedded_client, busi, db_name,
                                                                                  monkeypatch):
    """The driver renewed its writer lock only when it wrote: Ray's workers took over 120 s to send
    their first results on a busy machine (the suite beside a training run) and the run stopped
    with "Redis no longer holds this run's writer lock". Here the time-out is shorter than
    starting Ray's workers takes."""
    monkeypatch.setattr(lock, "LOCK_TTL_SECONDS", 2)
    store = VectorStore(embedded_client, db_name)
    items = api.load_items(busi)[:40]
    try:
        report = api.add(store, items, api.model_for_add(store, input_size=TEST_INPUT_SIZE), progress=False,
                         ray=ONE_WORKER)
        assert (report.new, report.failures) == (40, [])
    finally:
        store.drop()


def _ray_workers() -> list[psutil.Process]:
    """The processes of this machine's Ray actors that embed (Ray titles them ray::MapWorker...)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any("MapWorker" in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


def test_a_worker_killed_mid_run_is_replaced_and_every_image_is_stored_once(embedded_client, busi, db_name):
    store = VectorStore(embedded_client, db_name)
    killed = []

    def kill_a_worker_once_100_are_stored() -> None:
        watcher = VectorStore(embedded_client, db_name)
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            watcher.refresh()
            workers = _ray_workers()
            if watcher.exists and watcher.count() >= 100 and workers:
                workers[0].send_signal(signal.SIGKILL)
                killed.append(watcher.count())
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_once_100_are_stored, daemon=True)
    try:
        killer.start()
        report = api.add(store, api.load_items(busi), api.model_for_add(store, input_size=TEST_INPUT_SIZE),
                         batch_size=8, progress=False, ray=ONE_WORKER)
        killer.join(timeout=10)
        assert killed and killed[0] < 780, "no worker was killed mid-run"
        assert report.new == 780 and report.failures == []
        stored = _every_busi_image_once(store)
        record_fault("a Ray worker (`add --engine ray`) killed with SIGKILL mid-run", 780,
                     f"{killed[0]} when killed, then {stored}", True,
                     "(nothing: Ray restarted the worker, the run went on)")
    finally:
        store.drop()


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM])
def test_a_ray_run_killed_then_run_again_stores_every_image_once(kill, embedded_home, embedded_client, busi,
                                                                 db_name):
    env = {key: value for key, value in os.environ.items() if key != "CBIR_REDIS_URL"}
    env.update(PYTHONPATH=str(ROOT), CBIR_HOME=str(embedded_home))
    command = [sys.executable, str(ROOT / "add_images.py"), "--db-name", db_name, "--path", str(busi),
               "--input-size", str(TEST_INPUT_SIZE), "--batch-size", "8", "--quiet", "--engine", "ray"]
    store = VectorStore(embedded_client, db_name)
    try:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _once_stored(store, process, 100)
        process.send_signal(kill)
        process.wait(timeout=60)
        told = ""
        if kill == signal.SIGTERM:  # stopped like a local add: what was stored is kept, Ray stopped
            told = process.stderr.read().strip().splitlines()[-1]
            assert process.returncode == 128 + signal.SIGTERM and told.startswith("terminated: what was stored is kept")
        partial = store.count()
        _stop_orphaned_ray()
        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        assert f"{780 - partial} new" in rerun.stdout and f"{partial} unchanged" in rerun.stdout, rerun.stdout
        stored = _every_busi_image_once(store)
        record_fault(f"`add --engine ray` sent {kill.name} mid-run, then run again", 780, f"{partial}, then {stored}",
                     True, told)
    finally:
        store.drop()


def _stop_orphaned_ray() -> None:
    """A local Ray dies with the driver that started it, but for two agents (ray::DashboardAgent,
    ray::RuntimeEnvAgent) left to the init process: stop them, as `ray stop` would."""
    for process in psutil.process_iter(["cmdline", "ppid"]):
        if process.info["ppid"] == 1 and (process.info["cmdline"] or [""])[0].startswith("ray::"):
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


def test_bad_files_are_reported_as_on_the_local_path(embedded_client, busi, tmp_path, db_name):
    folder = tmp_path / "cases" / "benign"
    folder.mkdir(parents=True)
    good = sorted((busi / "benign").glob("*.png"))[:3]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "notes.png").write_text("a clinician's note")
    (folder / "cut.png").write_bytes(good[0].read_bytes()[:300])
    items = api.load_items(tmp_path / "cases")
    reports = {}
    for engine, ray in (("local", None), ("ray", ONE_WORKER)):
        store = VectorStore(embedded_client, f"{db_name}-{engine}")
        try:
            reports[engine] = api.add(store, items, api.model_for_add(store, input_size=TEST_INPUT_SIZE),
                                      progress=False, ray=ray)
        finally:
            store.drop()
    assert reports["ray"].failures == reports["local"].failures and len(reports["ray"].failures) == 2
    assert reports["ray"].new == reports["local"].new == 3
    store = VectorStore(embedded_client, f"{db_name}-nothing")
    try:
        nothing = api.add(store, [], api.model_for_add(store, input_size=TEST_INPUT_SIZE), progress=False,
                          ray=ONE_WORKER)
        assert (nothing.total, nothing.new, nothing.failures) == (0, 0, [])
    finally:
        store.drop()
