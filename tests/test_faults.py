"""Faults the other suites do not inject: a writer paused past its lock's time-out, a full disk,
a machine that dies right after a durable add, a read-only Redis user. Each records its row of
the fault table (docs/RELIABILITY.md)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import redis

from cbir.store.database import VectorStore
from cbir.store.redis.connect import connect

from .conftest import ROOT, TEST_INPUT_SIZE, _free_port, _start_server, _stop, record_fault
from .test_pipeline import _add_busi_command, _every_busi_image_once, _once_stored, _rerun_completes

LOCK_TTL = 2  # seconds: the paused writer's lock expires while it sleeps
# `add` with a short lock time-out, as a writer whose machine pauses it for longer than that.
ADD_WITH_SHORT_LOCK = (
    "import sys; import cbir.store.lock as lock, cbir.store.writer as writer; "
    f"lock.LOCK_TTL_SECONDS = writer.LOCK_TTL_SECONDS = {LOCK_TTL}; "
    "from cbir.cli.main import command; sys.argv[0] = 'add_images.py'; command('add')")


def test_a_writer_paused_past_its_lock_timeout_stops_before_writing_again(standalone_url, db_name, busi):
    """SIGSTOP an `add` mid-run past its lock's time-out; another writer takes the lock; SIGCONT:
    the first must stop before its next write (each write renewed the lock with a bare EXPIRE,
    which renewed the other writer's lock, and both wrote)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CBIR_REDIS_URL=standalone_url)
    add = [sys.executable, "-c", ADD_WITH_SHORT_LOCK, *_add_busi_command(db_name, busi)[2:]]
    store = VectorStore(connect(standalone_url), db_name)
    try:
        process = subprocess.Popen(add, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _once_stored(store, process, 100)
        process.send_signal(signal.SIGSTOP)
        time.sleep(LOCK_TTL + 1)
        other = VectorStore(connect(standalone_url), db_name)
        with other.writing():  # the expired lock is taken by another writer, which holds it a while
            process.send_signal(signal.SIGCONT)
            errors = process.communicate(timeout=120)[1].splitlines()
        assert process.returncode == 2, errors
        assert errors[-1].startswith(f"error: database '{db_name}': Redis no longer holds this run's writer lock ")
        assert "the run was paused or cut off for over 2 s" in errors[-1]
        stored = _rerun_completes(store, _add_busi_command(db_name, busi), env, store.count())
        record_fault(f"`add` paused (SIGSTOP) past its writer lock's time-out ({LOCK_TTL} s here), another writer "
                     "took the lock, SIGCONT, `add` run again", 780, stored, True, errors[-1].replace(db_name, "<db>"))
    finally:
        store.drop()


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB file system (tmpfs, mounted as root; elsewhere the test is skipped)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_error_and_a_rerun_completes_once_there_is_room(small_disk, db_name, busi):
    """The embedded server's append-only file fills its disk mid-`add` (BUSI at full size: 780 x 5
    KB vectors): one error line from Redis; once the disk is larger, the re-run stores the rest."""
    env = {k: v for k, v in os.environ.items() if k != "CBIR_REDIS_URL"}
    env.update(PYTHONPATH=str(ROOT), CBIR_HOME=str(small_disk))
    command = [sys.executable, str(ROOT / "add_images.py"), "--db-name", db_name, "--path", str(busi),
               "--input-size", str(TEST_INPUT_SIZE), "--batch-size", "8", "--quiet"]
    failed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    errors = failed.stderr.splitlines()
    assert failed.returncode == 2, failed.stderr
    assert errors[-1].startswith("error: ") and "No space left on device" in errors[-1], errors
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    client = connect(home=small_disk)
    store = VectorStore(client, db_name)
    partial = store.count() if store.exists else 0
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{780 - partial} new" in rerun.stdout
    stored = _every_busi_image_once(store)
    record_fault("disk full under the embedded Redis mid-`add`, disk enlarged, `add` run again", 780,
                 f"{partial}, then {stored}", True, errors[-1].replace(db_name, "<db>"))
    client.stop()


def test_a_durable_add_loses_nothing_when_the_server_is_killed_right_after(tmp_path, db_name, busi):
    """`add --durable` into the embedded server, whose process is SIGKILLed as soon as `add`
    reports success (a client of the test keeps it running past the command): every image is back
    when the server restarts from its append-only file, and the server wrote each with fsync."""
    home = tmp_path / "home"
    client = connect(home=home)  # keeps the server up after the command, as a second user would
    env = {k: v for k, v in os.environ.items() if k != "CBIR_REDIS_URL"}
    env.update(PYTHONPATH=str(ROOT), CBIR_HOME=str(home))
    done = subprocess.run([*_add_busi_command(db_name, busi), "--durable"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert client.config_get("appendfsync") == {"appendfsync": "always"}
    server = psutil.Process(int(client.info("server")["process_id"]))
    server.kill()
    server.wait(timeout=10)  # reaped, so that the next command starts a server of its own
    client.connection_pool.disconnect()
    restarted = connect(home=tmp_path / "home")
    stored = _every_busi_image_once(VectorStore(restarted, db_name))
    record_fault("Redis killed (SIGKILL) right after a successful `add --durable`", 780, stored, True,
                 done.stdout.strip().splitlines()[-1].replace(db_name, "<db>"))
    restarted.stop()


def test_durable_is_refused_where_a_server_would_acknowledge_before_its_disk(redis_server_binary, tmp_path, db_name,
                                                                             busi):
    port = _free_port()
    servers = [_start_server(redis_server_binary, port, tmp_path / "everysec", "--appendonly", "yes")]
    url = f"redis://127.0.0.1:{port}/0"
    env = dict(os.environ, PYTHONPATH=str(ROOT), CBIR_REDIS_URL=url)
    try:
        refused = subprocess.run([*_add_busi_command(db_name, busi), "--durable"], env=env, capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode == 2
        assert refused.stderr.strip() == (
            f"error: --durable: Redis at 127.0.0.1:{port}/0 acknowledges writes before they reach its disk "
            "(appendonly yes, appendfsync everysec): set appendonly yes and appendfsync always in its "
            "configuration, or leave --durable out")
        assert not VectorStore(connect(url), db_name).exists  # refused before anything was written
    finally:
        _stop(servers)


def test_a_read_only_redis_user_can_search_and_nothing_more(standalone_url, db_name, tmp_path):
    """Searching needs only read commands on cbir:* keys: a deployment can give its search side a
    Redis ACL user that cannot write, so that no one there can plant an index FAISS would load."""
    from PIL import Image

    from .conftest import BREASTMNIST

    admin = connect(standalone_url)
    env = dict(os.environ, PYTHONPATH=str(ROOT), CBIR_REDIS_URL=standalone_url)
    user = f"reader-{db_name}"
    add = [sys.executable, str(ROOT / "add_images.py"), "--db-name", db_name, "--path", str(BREASTMNIST),
           "--split", "val", "--input-size", str(TEST_INPUT_SIZE), "--quiet"]
    try:
        assert subprocess.run(add, env=env, capture_output=True, timeout=300).returncode == 0
        assert subprocess.run([sys.executable, str(ROOT / "train_index.py"), "--db-name", db_name, "--index", "ivf"],
                              env=env, capture_output=True, timeout=300).returncode == 0
        admin.acl_setuser(user, enabled=True, passwords=["+secret"], keys=["cbir:*"],
                          commands=["+@read", "+@connection", "+info", "-@write", "-@dangerous", "+info"])
        host_port = standalone_url.split("//")[1].split("/")[0]
        reader_env = dict(env, CBIR_REDIS_URL=f"redis://{user}:secret@{host_port}/0")
        query = tmp_path / "query.png"
        Image.fromarray(np.load(BREASTMNIST)["val_images"][5]).save(query)
        found = subprocess.run([sys.executable, str(ROOT / "retrieve_images.py"), "--db-name", db_name, "--path",
                                str(query), "--no-picture", "--nrt-neigh", "3"], env=reader_env, capture_output=True,
                               text=True, timeout=300)
        assert found.returncode == 0, found.stderr
        assert "val/05" in found.stdout.splitlines()[3]
        refused = subprocess.run([*add, "--rewrite"], env=reader_env, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert refused.stderr.startswith(f"error: Redis refused (this user has no permissions to run the 'set' "
                                         f"command) while locking database '{db_name}': this Redis user may not "), \
            refused.stderr
        assert VectorStore(admin, db_name).count() == 78  # nothing changed
        record_fault("a read-only Redis user (ACL: +@read on cbir:*) runs `add --rewrite`", 78, 78, True,
                     refused.stderr.strip().replace(db_name, "<db>").replace(user, "<user>"))
    finally:
        try:
            admin.acl_deluser(user)
        except redis.RedisError:
            pass
        VectorStore(admin, db_name).drop()
