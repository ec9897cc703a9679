"""The model's processes keep freed memory: without it each image's activations are paged in afresh."""
import subprocess
import sys

import pytest

PROBE = r"""
import io, resource, sys
import numpy as np
from PIL import Image
import pipelines.extractor as ex
from pipelines.config import ExtractConfig
if sys.argv[1] == "off":
    ex.keep_freed_memory = lambda: False  # the extractor as it would be without the call
e = ex.DescriptorExtractor(ExtractConfig(max_side=224, torch_threads=1))
rng = np.random.default_rng(0)
px = [rng.integers(0, 256, (224, 168, 3), dtype=np.uint8) for _ in range(8)]
geo = [np.array([168, 224, 0, 0], np.float32)] * len(px)
e.embed(px[:2], geo[:2])  # warm-up
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    e.embed(px, geo)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / (3 * len(px)))
"""


def _faults_per_image(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_the_extractor_keeps_freed_memory_between_images():
    from pipelines.allocator import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("not glibc: its malloc thresholds are not set")
    on, off = _faults_per_image("on"), _faults_per_image("off")
    assert on < 200 and off > 5 * on, (on, off)  # here: a few pages an image against ~3,000
