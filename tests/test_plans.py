"""Inference plans (fused_res/ops/plans.py): after one eval call of a conv unit, the Triton
backend launches the same kernel again without the layers above it, for as long as nothing
the first call worked out could have changed. Run in Triton's CPU interpreter, in a child
process as tests/test_triton_kernels.py does (fp32 and fp16; the kernels really run): the
planned call returns exactly what the unplanned path returns, and steps aside for every change
that would make it wrong."""

import contextlib
import copy
import importlib.util
import os

import pytest
import torch
from helpers import randomize_bn, run_cases_interpreted
from torch import nn

from fused_res import ops
from fused_res.backends import registry
from fused_res.testing import TOLERANCES, rel_err

CHILD = os.environ.get("TRITON_INTERPRET") == "1"
HAVE_TRITON = importlib.util.find_spec("triton") is not None

if not CHILD:
    @pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
    def test_plan_cases_in_a_child_process():
        run_cases_interpreted(__file__)

    def test_backends_without_plans_return_none_and_the_same_output():
        """The reference backend has no plans: conv_unit_planned is conv_unit there."""
        from fused_res.backends.constants import mark_constant
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 5, 5, generator=g)
        w = mark_constant(torch.randn(6, 4, 3, 3, generator=g))
        b = mark_constant(torch.randn(6, generator=g))
        with torch.no_grad():
            y, plan = ops.conv_unit_planned(x, w, padding=1, out_shift=b, act_mid="relu",
                                            backend="reference")
            ref = ops.conv_unit(x, w, padding=1, out_shift=b, act_mid="relu",
                                backend="reference")
        assert plan is None and torch.equal(y, ref)

    def test_same_compares_by_type():
        from fused_res.ops.plans import _same
        t = torch.zeros(1)
        assert _same(t, t) and not _same(t, t.clone())
        assert _same([1, 2], [1, 2]) and not _same([1, 2], (1, 2))
        assert not _same([True, 1], [1, 1]) and not _same(True, 1) and not _same(1.0, 1)
        assert not _same(float("nan"), float("nan"))  # (a NaN plans nothing)

else:
    from fused_res import nn as fnn
    from fused_res.backends.constants import mark_constant
    from fused_res.backends.triton_backend import TritonBackend
    from fused_res.nn import eval_fold
    from fused_res.triton import conv as tconv

    @pytest.fixture(autouse=True)
    def triton_backend():
        old = registry._factories["triton"]
        registry.register_backend("triton", TritonBackend)
        eval_fold.clear()
        yield
        registry.register_backend("triton", old)

    @pytest.fixture
    def launches(monkeypatch):
        """A one-element list counting conv_launch and conv_pair_launch calls (the unplanned
        path's)."""
        from fused_res.triton import conv_pair
        count = [0]
        for module, name in ((tconv, "conv_launch"), (conv_pair, "conv_pair_launch")):
            real = getattr(module, name)

            def counted(*args, _real=real, **kwargs):
                count[0] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)
        return count

    def _block(kind, dtype):
        torch.manual_seed(0)
        if kind == "bottleneck":
            b = fnn.Bottleneck(16, 4, backend="triton")
        elif kind == "preact":  # (its first BN's affine, kept constant: conv1 plans too)
            b = fnn.PreActBottleneck(16, 4, backend="triton")
        elif kind == "bottleneck_down":
            down = nn.Sequential(nn.Conv2d(32, 64, 1, 2, bias=False), nn.BatchNorm2d(64))
            b = fnn.Bottleneck(32, 16, stride=2, downsample=down, backend="triton")
        elif kind == "basic":
            b = fnn.BasicBlock(16, 16, backend="triton")
        else:  # a downsampling basic block: its last conv and projection run as one op
            # (the pair kernel takes 16 input channels and more, its own and the shortcut's)
            down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
            b = fnn.BasicBlock(16, 32, stride=2, downsample=down, backend="triton")
        return randomize_bn(b).eval().to(dtype)

    def _input(block, dtype, fmt=torch.channels_last, n=2, hw=7, seed=1):
        c = block.conv1.in_channels
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, c, hw, hw, generator=g).to(dtype).contiguous(memory_format=fmt)

    def _unplanned(block, x):
        """What the block computes with no plan (each unit through conv_unit)."""
        _forget_plans()
        with torch.no_grad():
            y = block(x)
        _forget_plans()
        return y

    def _forget_plans():
        eval_fold.PLANS.clear()
        eval_fold.PAIR_PLANS.clear()

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("kind", ["bottleneck", "basic", "downsample", "preact"])
    @pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
    def test_planned_call_returns_what_the_unplanned_one_does(kind, dtype, fmt, launches):
        block = _block(kind, dtype)
        x = _input(block, dtype, fmt)
        expect = _unplanned(block, x)
        with torch.no_grad():
            first = block(x)  # plans
            n_first = launches[0]
            second = block(x)  # runs them
        # Every conv planned: the downsampling block's last conv and projection as one pair.
        assert len(eval_fold.PLANS) == {"bottleneck": 3, "basic": 2, "downsample": 1,
                                        "preact": 3}[kind]
        assert len(eval_fold.PAIR_PLANS) == (kind == "downsample")
        assert launches[0] == n_first
        assert torch.equal(first, expect) and torch.equal(second, expect)
        # ... and that is the block's value (the float64 reference of the unfused block).
        ref = copy.deepcopy(block).double()
        ref.backend = None
        with torch.no_grad(), ops_backend("reference"):
            want = ref(x.double())
        assert rel_err(second, want) < TOLERANCES[dtype]

    @contextlib.contextmanager
    def ops_backend(name):
        with registry.use_backend(name):
            yield

    CHANGES = ["weight_in_place", "running_stats", "batch_size", "memory_format", "strided_view",
               "autocast", "reference_backend", "unfused", "tma_env", "grad_mode"]

    @pytest.mark.parametrize("kind", ["bottleneck", "bottleneck_down"])
    @pytest.mark.parametrize("change", CHANGES)
    def test_plan_steps_aside_where_the_call_changed(kind, change, launches, monkeypatch):
        """After a planned call, each change makes the next call what the unplanned path
        computes (a new fold, shape or layout plans anew; a mode or switch the plan cannot
        honour runs the ordinary path). bottleneck_down: conv1, conv2 and the pair (conv3
        with the projection) are its three launches."""
        dtype = torch.float32
        block = _block(kind, dtype)
        # (strided_view: an NCHW view of a larger map, whose layout the fold sees as the
        # planned NCHW input's: only the plan's own check of the strides tells them apart.)
        fmt = torch.contiguous_format if change == "strided_view" else torch.channels_last
        x = _input(block, dtype, fmt)
        with torch.no_grad():
            block(x)
            block(x)
        ctx = contextlib.nullcontext()
        if change == "weight_in_place":
            with torch.no_grad():
                block.conv2.weight.mul_(-1.5)
        elif change == "running_stats":
            with torch.no_grad():
                block.bn3.running_var.mul_(4.0)
        elif change == "batch_size":
            x = _input(block, dtype, n=3)
        elif change == "memory_format":
            x = x.contiguous()
        elif change == "strided_view":
            x = _input(block, dtype, fmt, hw=9)[:, :, 1:-1, 1:-1]
        elif change == "autocast":
            ctx = torch.autocast("cpu", dtype=torch.float16)
        elif change == "reference_backend":
            block.backend = None
            ctx = registry.use_backend("reference")
        elif change == "unfused":
            ctx = registry.get_backend_object("triton").unfused()
        elif change == "tma_env":
            monkeypatch.setenv("FUSED_RES_TRITON_TMA", "1")
        with ctx:
            # The same block, never planned, computes what the call must return.
            with (torch.enable_grad() if change == "grad_mode" else torch.no_grad()):
                expect = copy.deepcopy(block)(x)
            before = launches[0]
            with torch.no_grad(), (torch.enable_grad() if change == "grad_mode"
                                   else contextlib.nullcontext()):
                got = block(x)  # with the plans of before the change at hand
            first = launches[0] - before
            with torch.no_grad():
                expect_again = copy.deepcopy(block)(x) if change == "grad_mode" else expect
                block(x)
                before = launches[0]
                again = block(x)
        assert torch.equal(got, expect) and torch.equal(again, expect_again)
        # The units whose plan the change voids take conv_launch: only conv2 (its weight),
        # bn3 (its statistics), the first and last units (their input and residual are the
        # strided block input, the middle one's its own output); the reference backend none.
        # (Unfused, or with gradients, the downsampling block runs its shortcut as a unit
        # of its own: four launches.)
        down = kind == "bottleneck_down"
        assert first == {"weight_in_place": 1, "running_stats": 1, "strided_view": 2,
                         "reference_backend": 0, "unfused": 4 if down else 3,
                         "grad_mode": 4 if down else 3}.get(change, 3)
        # Then a change a plan covers is planned anew and runs without conv_launch, and a
        # mode the plans do not cover takes it on every call. (Under autocast the last unit
        # does not plan: its float32 residual, the block input, is cast per call; the first
        # unit repeats autocast's cast of that input. With FUSED_RES_TRITON_TMA=1 the kernels
        # plan under the new switch where TMA does not apply, as in the interpreter: how
        # many depends on the device.)
        if change != "tma_env":
            assert launches[0] - before == {"autocast": 1,
                                            "unfused": 4 if down else 3}.get(change, 0)

    def test_plans_off_every_call_takes_the_op(launches, monkeypatch):
        """FUSED_RES_PLANS=0 (plans.ENABLED): no plan is made, none made before is run."""
        from fused_res.ops import plans
        block = _block("bottleneck", torch.float32)
        x = _input(block, torch.float32)
        with torch.no_grad():
            block(x)
            monkeypatch.setattr(plans, "ENABLED", False)
            before = launches[0]
            y = block(x)
            assert launches[0] - before == 3
            _forget_plans()
            block(x)
            assert not eval_fold.PLANS
        assert torch.equal(y, _unplanned(block, x))

    def test_plans_are_dropped_with_the_folds_and_for_a_new_backend_object(launches):
        """eval_fold.clear() forgets the plans with the folds (they hold the folds' tensors);
        a backend registered anew under the plan's name is the one that runs (a plan of the
        old object would launch its kernels, its switches unread)."""
        block = _block("bottleneck", torch.float32)
        x = _input(block, torch.float32)
        with torch.no_grad():
            block(x)
            assert len(eval_fold.PLANS) == 3
            eval_fold.clear()
            assert not eval_fold.PLANS and not eval_fold.PAIR_PLANS
            block(x)
            registry.register_backend("triton", TritonBackend)
            before = launches[0]
            block(x)
            assert launches[0] - before == 3
            before = launches[0]
            block(x)  # (planned again, with the new object)
            assert launches[0] == before

    def test_plan_with_tma_holds_to_the_input_alignment_it_was_made_with():
        """With TMA asked for, a 1x1 conv of a 16-byte aligned input takes the TMA kernel; a
        plan made from a misaligned input (the pointer kernel) serves no aligned one."""
        g = torch.Generator().manual_seed(0)
        cl = torch.channels_last
        base = torch.randn(2 * 24 * 6 * 6 + 1, generator=g)
        x_mis = base[1:].view(2, 6, 6, 24).permute(0, 3, 1, 2)  # NHWC, 4 bytes off
        assert x_mis.is_contiguous(memory_format=cl) and x_mis.data_ptr() % 16
        # (24 input channels: no TMA weight tiles either, so the pointer kernel plans.)
        w = mark_constant(torch.randn(32, 24, 1, 1, generator=g))
        plans = []
        tconv.conv_launch(x_mis, w, None, (1, 1), (0, 0), None, None, None, "none",
                          memory_format=cl, tma=True, cache_weight=True, plan_out=plans)
        assert plans and plans[0].x_aligned is False
        aligned = torch.randn(2, 24, 6, 6, generator=g).contiguous(memory_format=cl)
        assert plans[0](aligned, None) is None
        base2 = torch.randn(2 * 24 * 6 * 6 + 1, generator=g)
        other_mis = base2[1:].view(2, 6, 6, 24).permute(0, 3, 1, 2)
        assert torch.equal(plans[0](other_mis, None),
                           tconv.conv_launch(other_mis, w, None, (1, 1), (0, 0), None, None,
                                             None, "none", memory_format=cl, tma=True,
                                             cache_weight=True)[0])

    def test_the_fused_stem_plans_too():
        """A converted ResNet's stem (FusedStemConv: conv1, bn1, relu as the model calls them)
        takes its plan on the second call, with the unplanned call's result."""
        import fused_res
        from fused_res.models.imagenet import BasicBlock, ResNet

        model = randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=4)).eval()
        fused = fused_res.convert(copy.deepcopy(model), backend="triton").eval()
        x = _input(fused, torch.float32, hw=12)

        def stem(m):
            with torch.no_grad():
                return m.relu(m.bn1(m.conv1(x)))

        expect = stem(copy.deepcopy(fused))
        first, second = stem(fused), stem(fused)
        assert fused.conv1 in eval_fold.PLANS
        assert torch.equal(first, expect) and torch.equal(second, expect)
        assert rel_err(second, stem(model)) < TOLERANCES[torch.float32]
        # The model's float32 input under autocast: the plan repeats autocast's cast.
        with torch.autocast("cpu", dtype=torch.float16):
            expect = stem(copy.deepcopy(fused))
            first, second = stem(fused), stem(fused)
        assert fused.conv1 in eval_fold.PLANS and eval_fold.PLANS[fused.conv1].cast == torch.float16
        assert second.dtype == torch.float16
        assert torch.equal(first, expect) and torch.equal(second, expect)

    def test_ops_level_plan_checks_every_argument():
        """ConvUnitPlan returns None (the caller then runs conv_unit, which validates) for
        any argument that is not the planned call's: other tensors, a bool for a float, a
        residual that aliases the input where the planned one did not."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
        r = torch.randn(2, 6, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
        w = mark_constant(torch.randn(6, 4, 3, 3, generator=g))
        b = mark_constant(torch.randn(6, generator=g))
        kw = dict(padding=[1, 1], out_shift=b, act_mid="relu", residual=r, res_scale=0.5,
                  act_out="relu", backend="triton")
        with torch.no_grad():
            y, plan = ops.conv_unit_planned(x, w, **kw)
            assert plan is not None
            assert torch.equal(plan(x, w, **kw), y)
            x2 = torch.randn_like(x)
            assert torch.equal(plan(x2, w, **kw), ops.conv_unit(x2, w, **kw))
            assert plan(x, w.clone(), **kw) is None
            assert plan(x, w, **{**kw, "res_scale": True}) is None
            assert plan(x, w, **{**kw, "padding": [True, True]}) is None
            assert plan(x, w, **{**kw, "act_out": "none"}) is None
            assert plan(x, w, **{**kw, "out_shift": b.clone()}) is None
            assert plan(x, w, **{**kw, "residual": r.half()}) is None
            assert plan(x, w, **{**kw, "backend": None}) is None
            # A caller's list changed in place since: its new value counts.
            pad = [1, 1]
            _, plan_pad = ops.conv_unit_planned(x, w, **{**kw, "padding": pad})
            pad[0] = 0
            assert plan_pad(x, w, **{**kw, "padding": pad}) is None
            with torch.enable_grad():
                assert plan(x, w, **kw) is None
            with torch.autocast("cpu", dtype=torch.float16):  # (conv_unit would cast x, w)
                assert plan(x, w, **kw) is None
            # Planned under autocast, a float32 input is cast as the op casts it, and the
            # plan serves no call without autocast, nor one under another dtype's.
            w16 = mark_constant(w.half())
            kw16 = {**kw, "residual": r.half()}
            with torch.autocast("cpu", dtype=torch.float16):
                y16, plan16 = ops.conv_unit_planned(x, w16, **kw16)
                assert plan16 is not None and plan16.cast == torch.float16
                assert torch.equal(plan16(x2, w16, **kw16), ops.conv_unit(x2, w16, **kw16))
                assert plan16(x.half(), w16, **kw16) is None
            assert plan16(x, w16, **kw16) is None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert plan16(x, w16, **kw16) is None
            sq = torch.randn(2, 6, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
            w6 = mark_constant(torch.randn(6, 6, 3, 3, generator=g))
            kw6 = {**kw, "residual": sq}
            _, plan6 = ops.conv_unit_planned(sq, w6, **kw6)
            assert plan6 is not None and plan6(sq, w6, **kw6) is not None
            assert plan6(sq, w6, **{**kw6, "residual": sq.clone()}) is None  # aliasing
        with pytest.raises(TypeError, match="res_scale"):
            ops.conv_unit(x, w, **{**kw, "res_scale": True})

    def test_no_plan_for_tensors_that_are_not_fused_res_constants():
        """A weight nobody marked constant may be written behind the plan's back (its weight
        matrix would go stale): the Triton backend plans only for the eval fold's."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 6, 6, generator=g)
        w = torch.randn(6, 4, 3, 3, generator=g)
        with torch.no_grad():
            _, plan = ops.conv_unit_planned(x, w, padding=1, backend="triton")
            assert plan is None
            _, plan = ops.conv_unit_planned(x, mark_constant(w.clone()), padding=1,
                                            backend="triton")
            assert plan is not None
            _, plan = ops.conv_unit_planned(x, mark_constant(w.clone()), padding=1,
                                            out_scale=torch.rand(6) + 1, backend="triton")
            assert plan is None
        _, plan = ops.conv_unit_planned(x, mark_constant(w.clone()), padding=1,
                                        backend="triton")
        assert plan is None  # grad mode on: nothing is planned
