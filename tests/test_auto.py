"""'auto' chooses per call signature among backends it measured and verified; never an
unmeasured or wrong one."""

import json
import time
import warnings

import pytest
import torch

import fused_res
from fused_res import models, ops
from fused_res.backends import (
    CudnnBackend,
    ReferenceBackend,
    auto,
    prepare,
    register_backend,
)
from fused_res.testing import rel_err


class _WrongBackend(ReferenceBackend):
    """Runs everywhere and is off by 1% in the apply pass."""

    name = "cudnn"

    def status(self):
        return fused_res.backends.BackendStatus(True, "")

    def unsupported_reason(self, x, weight, groups, dilation):
        return None

    def epilogue_forward(self, *args):
        return super().epilogue_forward(*args) * 1.01


class _SameAsReference(_WrongBackend):
    def epilogue_forward(self, *args):
        return ReferenceBackend.epilogue_forward(self, *args)


class _SlowReference(ReferenceBackend):
    def epilogue_forward(self, *args):
        time.sleep(0.004)
        return super().epilogue_forward(*args)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSED_RES_AUTO_CACHE", str(tmp_path / "auto.json"))
    auto.reset()
    yield tmp_path / "auto.json"
    auto.reset()
    register_backend("reference", ReferenceBackend)
    register_backend("cudnn", CudnnBackend)


def _model():
    torch.manual_seed(0)
    return models.cifar_resnet(8, shortcut="B")


def _epilogue_entries(cache):
    return [v for k, v in cache.items() if "|epilogue|" in k]


def test_unmeasured_signatures_use_the_reference(fresh_cache):
    x = torch.randn(2, 4, 5, 5)
    assert auto.lookup(auto.signature("epilogue", {"z": x}, ())) == "reference"


def test_tuning_records_every_signature_and_persists(fresh_cache):
    model, x = _model(), torch.randn(4, 3, 16, 16)
    fused = fused_res.convert(model, backend="auto")
    for train in (False, True):
        model.train(train)
        fused.train(train)
        with fused_res.autotune() as cache:
            y = fused(x)
        assert rel_err(y, model(x)) <= 1e-5
    on_disk = json.loads(fresh_cache.read_text())
    assert on_disk and set(on_disk) == set(cache)
    assert {"conv_unit", "conv_bn_stats", "epilogue"} <= {k.split("|")[1] for k in on_disk}
    for entry in on_disk.values():
        assert entry["backend"] in entry["seconds"]
        assert "reference" in entry["seconds"]
    auto.reset()
    key = next(iter(on_disk))
    assert auto.lookup(key) == on_disk[key]["backend"]


def test_a_wrong_backend_is_never_chosen(fresh_cache):
    register_backend("cudnn", _WrongBackend)
    model, x = _model().train(), torch.randn(4, 3, 16, 16)
    fused = fused_res.convert(model, backend="auto")
    with fused_res.autotune() as cache:
        y = fused(x)
    entries = _epilogue_entries(cache)
    assert entries and all(e["backend"] != "cudnn" for e in entries)
    assert all("relative error" in e["failed"]["cudnn"] for e in entries)
    assert rel_err(y, model(x)) <= 1e-5


def test_the_fastest_verified_backend_wins_and_is_used_afterwards(fresh_cache):
    register_backend("reference", _SlowReference)
    register_backend("cudnn", _SameAsReference)
    model, x = _model().train(), torch.randn(4, 3, 16, 16)
    fused = fused_res.convert(model, backend="auto")
    with fused_res.autotune() as cache:
        fused(x)
    entries = _epilogue_entries(cache)
    assert entries
    for e in entries:
        assert e["backend"] == min(e["seconds"], key=e["seconds"].get) != "reference"
    key = next(k for k in cache if "|epilogue|" in k)
    assert auto.lookup(key) == cache[key]["backend"]
    # A recorded winner that cannot run here any more is not used.
    cache[key]["backend"] = "cudnn"
    register_backend("cudnn", CudnnBackend)  # the real one: unavailable without CUDA
    if not torch.cuda.is_available():
        assert auto.lookup(key) == "reference"


def test_tuning_the_batchnorm_update_updates_the_statistics_once(fresh_cache):
    """'auto' measures bn_update_running on copies of the running statistics: after tuning,
    the buffers hold exactly one update (the reference's), and both BatchNorm ops have a
    recorded, verified winner."""
    g = torch.Generator().manual_seed(4)
    mean, var = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.1
    bufs = [torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.5, torch.tensor(3)]
    want = [b.clone() for b in bufs]
    ReferenceBackend().bn_update_running(mean, var, *want, None, 30)
    with fused_res.autotune() as cache:
        scale = fused_res.ops.bn_scale(mean, var, torch.ones(6), running_mean=bufs[0],
                                       running_var=bufs[1], num_batches_tracked=bufs[2],
                                       momentum=None, count=30, backend="auto")
    for got, exp in zip(bufs, want, strict=True):
        assert torch.equal(got, exp)
    assert rel_err(scale, torch.rsqrt(var + 1e-5)) <= 1e-6
    for op in ("bn_update_running", "bn_scale"):
        entries = [v for k, v in cache.items() if f"|{op}|" in k]
        assert len(entries) == 1 and "reference" in entries[0]["seconds"], (op, entries)


@pytest.mark.parametrize("text", ["[]", '"cuda"', '{"sig": "cuda"}', '{"sig": {"x": 1}}',
                                  "{not json"])
def test_a_malformed_cache_file_is_ignored_with_one_warning(fresh_cache, text):
    """A cache file of the wrong shape (hand-edited, another program's) must not break every
    call on 'auto': its bad entries are ignored, with one warning naming the file."""
    fresh_cache.write_text(text)
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = ops.conv_unit(x, w, padding=1, backend="auto")
        ops.conv_unit(x, w, padding=1, backend="auto")
        prepare("auto")
    msgs = [str(m.message) for m in caught if "auto cache" in str(m.message)]
    assert len(msgs) == 1 and str(fresh_cache) in msgs[0], msgs
    assert rel_err(y, torch.nn.functional.conv2d(x, w, padding=1)) < 1e-6
    with fused_res.autotune():  # saving over it keeps only well-formed entries
        ops.conv_unit(x, w, padding=1, backend="auto")
    saved = json.loads(fresh_cache.read_text())
    assert saved and all(isinstance(v, dict) and "backend" in v for v in saved.values())


def test_recording_uses_sees_only_the_signatures_a_run_looks_up(fresh_cache):
    """What the bench's fused-auto note counts: this run's signatures, not every model's in
    the cache file."""
    fresh_cache.write_text(json.dumps({"another model's signature": {"backend": "reference"}}))
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    with auto.recording_uses() as used:
        ops.conv_unit(x, w, padding=1, backend="auto")
        ops.conv_unit(x, w, padding=1, backend="auto")
        ops.conv_unit(x, w, padding=0, backend="reference")  # not through 'auto'
    assert len(used) == 1 and "another model's signature" not in used
    assert len(auto.cached()) == 1  # (looking up does not record a winner)


def test_a_winner_verified_under_other_versions_is_not_used(fresh_cache, monkeypatch):
    """The key holds the fused_res, torch and Triton versions: after an upgrade a recorded
    winner (verified against the reference with the old kernels) is not trusted; the call
    runs the reference until autotune() measures it again."""
    import json

    x = torch.randn(2, 4, 5, 5)
    key = auto.signature("epilogue", {"z": x}, ())
    assert f"torch {torch.__version__}" in key.split("|")[0]
    old = key.replace(f"torch {torch.__version__}", "torch 0.0.1")
    fresh_cache.write_text(json.dumps({old: {"backend": "reference-twin"}}))
    auto.reset()
    assert auto.signature("epilogue", {"z": x}, ()) == key
    assert key not in auto.cached() and old in auto.cached()
    assert auto.lookup(key) == "reference"
