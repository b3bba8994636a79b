"""Ahead-of-time compile of the Triton kernels for sm_80 and sm_90 on a CPU-only machine
(DESIGN.md §5 rung 3). The quick subset (one config per kernel family, bf16) runs here; the full
sweep of every kernel x config x dtype is `python -m fused_res.triton.aot` (run it in CI).

Runs in a child process without TRITON_INTERPRET, so the kernels are real JIT functions even
when another test module set the interpreter up in this process."""

import importlib.util
import os
import subprocess
import sys

import pytest

from fused_res.triton import configs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")


def test_aot_subset_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "fused_res.triton.aot", "--subset", "--json",
                           str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    import json
    rows = json.loads(out.read_text())
    kernels = {r["kernel"] for r in rows}
    assert {"conv_unit_kernel", "conv_pair_kernel", "conv1x1_tma_kernel", "epilogue_fwd_kernel",
            "epilogue_bwd_kernel", "stats_partial_kernel", "stats_finalize_kernel",
            "stats_bwd_kernel"} <= kernels
    assert {r["sm"] for r in rows} == {80, 90}
    # TMA needs sm_90: the TMA conv is compiled for it alone.
    assert {r["sm"] for r in rows if r["kernel"] == "conv1x1_tma_kernel"} == {90}
    for r in rows:
        assert r["ok"] and r["shared"] is not None, r


def _run_in_child(code: str) -> None:
    """Run `code` in a fresh interpreter without TRITON_INTERPRET (real JIT kernels)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_aot_reports_a_compile_error_as_a_failure():
    """The check must be able to fail: a tl.dot below the GPU minimum block size."""
    code = ("from fused_res.triton import aot, configs\n"
            "import dataclasses\n"
            "j = [x for x in aot.jobs(subset=True) if x.kernel == 'conv_unit_kernel'][0]\n"
            "cx = dict(j.constexprs, BLOCK_M=8, BLOCK_N=8, BLOCK_K=8)\n"
            "bad = dataclasses.replace(j, config='bad', constexprs=cx)\n"
            "r = aot.compile_one(bad, 90, None)\n"
            "assert not r.ok and r.error, r\n")
    _run_in_child(code)


def test_config_exclusion_rule():
    ok = configs.ConvConfig(64, 64, 32, 4, 4)
    assert configs.conv_config_excluded(ok, 2, 9) is None
    assert "minimum" in configs.conv_config_excluded(configs.ConvConfig(8, 64, 32, 4, 3), 2, 9)
    assert "shared" in configs.conv_config_excluded(configs.ConvConfig(256, 256, 64, 8, 5), 4, 1)
    assert "miscompile" in configs.conv_config_excluded(
        configs.ConvConfig(256, 128, 32, 8, 4), 2, 9)
    assert configs.conv_config_excluded(configs.ConvConfig(256, 128, 32, 8, 4), 2, 1) is None
    for elt in (2, 4):
        for taps in (1, 9, 49):
            for c_in, c_out in ((3, 64), (64, 64), (256, 512)):
                picked = configs.conv_configs_for(elt, taps, c_in, c_out,
                                                   configs.flat_k(c_in, taps))
                assert picked and all(
                    configs.conv_config_excluded(c, elt, taps) is None for c in picked)


def test_untuned_config_is_an_autotune_candidate_that_fits_the_problem():
    sms = 132
    for elt in (2, 4):
        for m, c_in, c_out, taps in ((64 * 56 * 56, 64, 64, 9), (64 * 28 * 28, 128, 128, 9),
                                     (64 * 7 * 7, 512, 512, 9), (256 * 7 * 7, 512, 2048, 1),
                                     (64 * 112 * 112, 3, 64, 49), (2 * 8 * 8, 16, 16, 9),
                                     (128 * 32 * 32, 16, 16, 9), (64 * 32 * 32, 3, 64, 1)):
            cfg = configs.default_conv_config(m, c_in, c_out, elt, taps,
                                              configs.flat_k(c_in, taps), sms)
            allowed = configs.conv_configs_for(elt, taps, c_in, c_out,
                                               configs.flat_k(c_in, taps))
            assert cfg in allowed, (cfg, m, c_in, c_out, taps)  # never wider than autotuning
            assert cfg in configs.CONV_CONFIGS, cfg
            assert configs.conv_config_excluded(cfg, elt, taps) is None, cfg
    # Big problems get the Hopper-sized tile in 16-bit; 64 channels never a 128-wide N tile;
    # a small batch gets tiles small enough to give every SM two of them.
    big = configs.default_conv_config(256 * 7 * 7, 512, 2048, 2, 1, False, sms)
    assert (big.block_m, big.block_n) == (128, 128)
    assert configs.default_conv_config(64 * 56 * 56, 64, 64, 2, 9, False, sms).block_n == 64
    small = configs.default_conv_config(64 * 7 * 7, 512, 512, 2, 9, False, sms)
    assert -(-64 * 7 * 7 // small.block_m) * -(-512 // small.block_n) >= 2 * sms
    # float32 tiles twice the bytes: the 128x128x64 tile's pipeline does not fit sm_80.
    assert configs.default_conv_config(256 * 7 * 7, 512, 2048, 4, 1, False, sms) != big


def test_untuned_picks_the_best_tiles_of_run3():
    """The picks the ladder was set from (run 3's conv-configs table, bf16, batch 64, 132 SMs):
    128x64x64 for 64->64 3x3 56x56; 64x128x64 where 128x128 would leave a fourth wave of 4
    tiles (512->2048 1x1 7x7), but 128x128 where its tail is one wave in 95 (batch 256);
    the wider N of two equal areas (1024->256 1x1 14x14)."""
    sms = 132
    pick = lambda m, ci, co, taps: str(configs.default_conv_config(  # noqa: E731
        m, ci, co, 2, taps, configs.flat_k(ci, taps), sms))
    assert pick(64 * 56 * 56, 64, 64, 9) == "128x64x64_w4_s3"
    assert pick(64 * 7 * 7, 512, 2048, 1) == "64x128x64_w4_s3"
    assert pick(256 * 56 * 56, 64, 256, 1) == "128x128x64_w8_s3"
    assert pick(64 * 28 * 28, 128, 128, 9) == "128x128x64_w8_s3"
    assert pick(64 * 14 * 14, 1024, 256, 1) == "64x128x64_w4_s3"
    # float32 operands spill that tile (AOT): never a candidate there.
    tile = next(c for c in configs.CONV_CONFIGS if str(c) == "128x64x64_w4_s3")
    assert configs.conv_config_excluded(tile, 4, 9) is not None
    assert configs.conv_config_excluded(tile, 2, 9) is None


def test_aot_specialises_int_arguments_as_the_jit_does():
    """The AOT check must see the kernel the GPU runs: NHWC strides that are multiples of 16
    marked divisible (so loads vectorise and pipeline), ones as constants."""
    from fused_res.triton import aot
    assert aot.jit_int_specialization(1) == ("constexpr", 1)
    assert aot.jit_int_specialization(64) == ("i32", "D")
    assert aot.jit_int_specialization(3) == ("i32", "")
    ints = aot.conv_int_args(aot.CONV_PROBLEMS["eval_3x3_tail"])
    assert ints["sxc"] == 1 and ints["sxw"] == 64 and ints["M"] == 64 * 56 * 56


def test_aot_fails_a_conv_whose_loads_are_not_pipelined():
    """Compiled with int arguments the JIT would not mark divisible (the first version of the
    check did that), the NHWC loads cannot be vectorised, the K loop is not pipelined, and the
    check must say so."""
    code = ("import dataclasses\n"
            "from fused_res.triton import aot\n"
            "j = [x for x in aot.jobs(subset=True) if x.variant == 'eval_3x3_tail'][0]\n"
            "ok = aot.compile_one(j, 90, None)\n"
            "assert ok.ok and not ok.error, ok\n"
            "odd = {k: (v + 1 if k.startswith('s') and v > 1 else v) for k, v in j.ints.items()}\n"
            "bad = aot.compile_one(dataclasses.replace(j, ints=odd), 90, None)\n"
            "assert not bad.ok and 'pipelined' in bad.error, bad\n")
    _run_in_child(code)


def test_autotune_key_tells_kernel_sizes_and_variants_apart():
    """A 1x1 and a 3x3 conv of one ResNet-50 stage share every size and stride; the kernel
    size and the epilogue/prologue variant must be part of what a tuned config is cached by."""
    conv = pytest.importorskip("fused_res.triton.conv")
    key = set(conv._TUNE_KEY)
    assert {"KH", "KW", "STATS", "PROLOGUE", "HAS_RES"} <= key
    assert key <= set(conv.conv_unit_kernel.arg_names)
    tuned = conv._autotuned_kernel()
    assert list(tuned.keys) == conv._TUNE_KEY
    pair = pytest.importorskip("fused_res.triton.conv_pair")
    assert {"KH", "KW", "C2", "stride2_h"} <= set(pair._TUNE_KEY)
    assert set(pair._TUNE_KEY) <= set(pair.conv_pair_kernel.arg_names)
    assert list(pair._autotuned_kernel().keys) == pair._TUNE_KEY


def test_aot_pair_args_are_what_the_launcher_passes():
    from fused_res.triton import aot
    ints = aot.pair_int_args(aot.PAIR_PROBLEMS["bottleneck_1x1_s2"])
    assert ints["s2c"] == 1 and ints["s2w"] == 256 and ints["s2h"] == 56 * 256
    assert ints["M"] == 64 * 28 * 28 and ints["C2"] == 256 and ints["stride2_h"] == 2
    conv_pair = pytest.importorskip("fused_res.triton.conv_pair")
    names = set(conv_pair.conv_pair_kernel.arg_names)
    ptrs = {n for n in names if n.endswith("_ptr")}
    assert set(ints) | ptrs | {k for k in names if k.isupper()} == names


def test_tma_conv_compiles_to_tma_copies_and_async_wgmma_on_sm90():
    """What conv_tma.py exists for: on sm_90 its operands arrive by TMA (cp.async.bulk.tensor)
    and feed asynchronous wgmma, rather than Triton lowering the descriptors to ordinary
    loads; every AOT job of it passes the launcher's arguments (descriptors, the epilogue's
    tensors, its sizes and strides, its constexprs) and nothing else."""
    code = ("import re, triton\n"
            "from triton.backends.compiler import GPUTarget\n"
            "from triton.compiler import ASTSource\n"
            "from fused_res.triton import aot, conv_tma\n"
            "names = set(conv_tma.conv1x1_tma_kernel.arg_names)\n"
            "jobs = [j for j in aot.jobs(subset=True) if j.kernel == 'conv1x1_tma_kernel']\n"
            "assert {j.variant for j in jobs} == set(aot.TMA_VARIANTS), jobs\n"
            "for j in jobs:\n"
            "    assert j.archs == (90,)\n"
            "    sig, attrs, cx = aot._signature(j.fn, j.dtype, j.maps, j.constexprs, j.ints)\n"
            "    assert set(sig) == names, set(sig) ^ names\n"
            "    assert sig['x_desc'].startswith('tensordesc<bf16['), sig['x_desc']\n"
            "    k = triton.compile(ASTSource(j.fn, sig, constexprs=cx, attrs=attrs),\n"
            "                       target=GPUTarget('cuda', 90, 32), options=j.options)\n"
            "    ptx = k.asm['ptx']\n"
            "    assert 'cp.async.bulk.tensor' in ptx, j.variant\n"
            "    assert 'wgmma.mma_async' in ptx, j.variant\n")
    _run_in_child(code)


def test_tma_b_tiles_load_weights_by_tma_and_inputs_by_cp_async_on_sm90():
    """The implicit-GEMM kernel with TMA weight tiles (configs with tma_b): on sm_90 the
    weight tile arrives by TMA and the input is still gathered by cp.async, feeding
    asynchronous wgmma; compiled for sm_90 only, for every variant but the stem's."""
    code = ("import re, triton\n"
            "from triton.backends.compiler import GPUTarget\n"
            "from triton.compiler import ASTSource\n"
            "from fused_res.triton import aot\n"
            "jobs = [j for j in aot.jobs(subset=True) if j.config.endswith('_tmab')]\n"
            "assert {j.variant for j in jobs} == set(aot.TMA_B_VARIANTS), jobs\n"
            "assert 'stem_7x7_flat_k' not in aot.TMA_B_VARIANTS\n"
            "for j in jobs:\n"
            "    assert j.archs == (90,) and j.constexprs['B_TMA'] is True\n"
            "    sig, attrs, cx = aot._signature(j.fn, j.dtype, j.maps, j.constexprs, j.ints)\n"
            "    assert sig['w_desc'].startswith('tensordesc<bf16['), sig['w_desc']\n"
            "    k = triton.compile(ASTSource(j.fn, sig, constexprs=cx, attrs=attrs),\n"
            "                       target=GPUTarget('cuda', 90, 32), options=j.options)\n"
            "    ptx = k.asm['ptx']\n"
            "    assert 'cp.async.bulk.tensor' in ptx, j.variant\n"
            "    assert re.search(r'cp\\.async\\.c[ag]', ptx), j.variant\n"
            "    assert 'wgmma.mma_async' in ptx, j.variant\n")
    _run_in_child(code)


def test_tma_autotune_key_and_tiles():
    tma = pytest.importorskip("fused_res.triton.conv_tma")
    assert set(tma._TUNE_KEY) <= set(tma.conv1x1_tma_kernel.arg_names)
    assert list(tma._autotuned_kernel().keys) == tma._TUNE_KEY
    assert all(c.tma for c in configs.TMA_SWEEP_CONFIGS)
    assert all(c.tma_b and not c.tma for c in configs.TMA_B_SWEEP_CONFIGS)
    assert not any(c.tma or c.tma_b for c in configs.CONV_CONFIGS + configs.SWEEP_CONFIGS)
    # The name says which loads a tile uses; everything else about the tile is the same.
    tile = configs.CONV_CONFIGS[1]
    assert str(tile.with_tma()) == f"{tile}_tma" and tile.with_tma().meta == tile.meta
    assert str(tile.with_tma_b()) == f"{tile}_tmab" and tile.with_tma_b().meta == tile.meta


def test_reduction_sub_tiles_grow_with_the_problem_but_keep_the_grid_full():
    sms = 132
    block_m = configs.ELEMENTWISE_CONFIG.block_m
    # No SM count (interpreter, CPU): the constant the interpreter tests are sized for.
    assert configs.reduction_sub_tiles(10 ** 7, block_m, 4, None) == configs.STATS_SUB_TILES
    # ResNet-50 layer 1 at batch 128 (401,408 rows, 256 channels = 4 blocks): the most.
    assert configs.reduction_sub_tiles(128 * 56 * 56, block_m, 4, sms) == \
        configs.MAX_SUB_TILES
    # Layer 4 at batch 64 (3,136 rows, 2048 channels): already few programs, no growth.
    assert configs.reduction_sub_tiles(64 * 7 * 7, block_m, 32, sms) == configs.STATS_SUB_TILES
    for m in (1, 1000, 64 * 28 * 28, 128 * 14 * 14, 256 * 56 * 56):
        for c_blocks in (1, 4, 16, 32):
            sub = configs.reduction_sub_tiles(m, block_m, c_blocks, sms)
            assert configs.STATS_SUB_TILES <= sub <= configs.MAX_SUB_TILES
            if sub > configs.STATS_SUB_TILES:  # grown only while the grid stays full
                programs = -(-m // (block_m * sub)) * c_blocks
                assert programs >= configs.PROGRAMS_PER_SM * sms, (m, c_blocks, sub)


def test_sums_in_the_pass_keep_their_fences_and_atomic():
    """The apply backward's hand-off to the last program of a channel block
    (common.last_to_arrive) is only as good as the PTX it becomes, which no CPU test runs: the
    gpu-scope fences (before the count and in the last program before its loads), one
    acquire-release atomic add, and the partials read past L1 (also where those programs take
    a BatchNorm scale's gradient back, BN_BWD). The variant that leaves the sums to
    channel_sums_kernel has none of them."""
    code = ("import triton\n"
            "from triton.backends.compiler import GPUTarget\n"
            "from triton.compiler import ASTSource\n"
            "from fused_res.triton import aot\n"
            "ptx = {}\n"
            "for j in aot.jobs(subset=True):\n"
            "    if j.kernel != 'epilogue_bwd_kernel':\n"
            "        continue\n"
            "    sig, attrs, cx = aot._signature(j.fn, j.dtype, j.maps, j.constexprs, j.ints)\n"
            "    for sm in (80, 90):\n"
            "        k = triton.compile(ASTSource(j.fn, sig, constexprs=cx, attrs=attrs),\n"
            "                           target=GPUTarget('cuda', sm, 32), options=j.options)\n"
            "        ptx[j.variant, sm] = k.asm['ptx']\n"
            "assert {v for v, _ in ptx} == {'all_flags', 'bn_bwd', 'sums_apart'}, "
            "sorted(ptx)\n"
            "for (variant, sm), text in ptx.items():\n"
            "    here = variant != 'sums_apart'\n"
            "    fences = text.count('fence.acq_rel.gpu')\n"
            "    atoms = [l for l in text.splitlines() if 'atom.' in l]\n"
            "    assert fences == (2 if here else 0), (variant, sm, fences)\n"
            "    assert len(atoms) == (1 if here else 0), (variant, sm, atoms)\n"
            "    assert not here or 'atom.global.gpu.acq_rel.add' in atoms[0], atoms\n"
            "    assert ('ld.global.cg' in text) == here, (variant, sm)\n")
    _run_in_child(code)
