"""One benchmark run: for every workload and batch, the reference output first, then every
contender: build, correctness gate, timing, peak memory, roofline. Returns the JSON-ready
result (fused_res.bench.schema documents it)."""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from ..backends.auto import autotune, recording_uses
from ..testing import TOLERANCES, rel_err
from . import contenders as C
from .config import TORCH_DTYPE, BenchConfig, ConfigError
from .env import environment
from .roofline import Peaks, measure_peaks, trace_costs, work
from .schema import SCHEMA
from .timing import (
    L2Flush,
    autocast_for,
    capture_graph,
    math_mode,
    rotation_count,
    summarize,
    time_loop,
)
from .workloads import Workload, calibrate_bn, expand, get_workload

# A contender passes the gate when its output's error against the reference is within the
# dtype's DESIGN.md §4 tolerance or within twice the error of eager channels_last at the same
# precision, whichever is looser: a whole network in bf16 legitimately drifts further from
# float64 than one op, and eager autocast defines what users accept. The baseline itself only
# has to be finite: on an H100, eager bf16 ResNet-50 was 12% off the fp32 reference in eval and
# 100% off in train gradients, which marked the baseline wrong and left no speedup to report.
# Above SANITY the row says that the gate is loose there; block- and unit-level rows stay
# strict. Train mode gates the gradients the same way (all of them together, 2x eager's error)
# and each parameter's gradient on its own (PARAM_FACTOR x eager's error on that parameter):
# depth makes the early layers' gradients ill-conditioned (eager bf16 ResNet-50: conv1.weight
# and every conv weight ~1.1-1.3 off float64, fp32 ~2%, from mask flips summed over large
# reductions) while the last layers' stay within a few percent, so one total over all
# parameters let any gradient pass (a tolerance of 2.0 admits zeros), and per parameter the
# well-conditioned ones still catch a wrong backward. Rounding alone moved a parameter's error
# by at most 1.24x between two eager bf16 runs (channels_last against contiguous, CPU).
SANITY = 0.1
PARAM_FACTOR = 4
# The float64 reference costs this many FLOPs at most (else fp32 with TF32 off).
FP64_BUDGET = {"cpu": 2e11, "cuda": 2e12}


class Progress:
    """What the runner reports while it works (the CLI shows a bar or log lines)."""

    def begin(self, total: int) -> None: ...
    def step(self, label: str) -> None: ...
    def done(self, row: dict) -> None: ...
    def end(self) -> None: ...


def loss_of(out: torch.Tensor) -> torch.Tensor:
    """The training loss: mean square of the output, in fp32 (fp64 for the reference)."""
    return (out if out.dtype == torch.float64 else out.float()).square().mean()


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (zeros where none), flattened float64 on the CPU, by
    parameter name (names survive conversion), in name order."""
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().double()
            .flatten().cpu() for n, p in sorted(module.named_parameters(), key=lambda kv: kv[0])}


def _cat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    parts = list(grads.values())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def _running_stats(module: nn.Module | dict) -> dict[str, torch.Tensor]:
    """Every BatchNorm running statistic of a module (or of a state_dict), flattened float64
    on the CPU, by state-dict name (names survive conversion, as checkpoints do)."""
    state = module if isinstance(module, dict) else module.state_dict()
    return {k: v.detach().double().flatten().cpu() for k, v in state.items()
            if k.rsplit(".", 1)[-1] in _STAT_NAMES}


def _gate_outputs(forward: Callable, module: nn.Module, x: torch.Tensor, mode: str,
                  dtype: str, device: str
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None,
                             dict[str, torch.Tensor] | None]:
    """(output, parameter gradients, running statistics after the step); the last two None
    in eval."""
    if mode == "eval":
        with torch.no_grad(), autocast_for(dtype, device):
            return forward(x).detach(), None, None
    module.zero_grad(set_to_none=True)
    with autocast_for(dtype, device):
        out = forward(x)
    loss_of(out).backward()
    grads = _grads(module)
    module.zero_grad(set_to_none=True)
    return out.detach(), grads, _running_stats(module)


def make_step(forward: Callable, module: nn.Module, mode: str, dtype: str,
              device: str) -> Callable[[torch.Tensor], object]:
    """The timed step: eval = forward under no_grad; train = zero_grad, forward, mean-square
    loss, backward, SGD-momentum step."""
    if mode == "eval":
        def step(x):
            with torch.no_grad(), autocast_for(dtype, device):
                return forward(x)
        return step
    opt = torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9)

    def train_step(x):
        opt.zero_grad(set_to_none=True)
        with autocast_for(dtype, device):
            out = forward(x)
        loss = loss_of(out)
        loss.backward()
        opt.step()
        return loss
    return train_step


def set_speedups(rows: list[dict]) -> None:
    """Each timed row's speedup over the baseline, like with like: a CUDA-graph row over
    eager-cl's own graph row (the launch cost a graph removes would otherwise count as the
    contender's speedup); none where that baseline row is missing or was not timed."""
    base = {r["cuda_graph"]: r for r in rows
            if r["contender"].removesuffix("+graph") == C.BASELINE and r["status"] == "ok"
            and r["time_s"] is not None}
    for r in rows:
        b = base.get(r["cuda_graph"])
        if b is not None and r["time_s"] is not None:
            r["speedup"] = b["time_s"]["median"] / r["time_s"]["median"]


def _auto_summary(choices: dict) -> str:
    """'reference x3, cuda x12': how many op signatures each backend won."""
    won: dict[str, int] = {}
    for entry in choices.values():
        won[entry["backend"]] = won.get(entry["backend"], 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(won.items())) or "no signatures"


def _reason(e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [""])[0]
    return f"failed: {type(e).__name__}: {msg[:300]}"


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class Case:
    """One workload at one batch: shared model, inputs, reference and roofline numbers."""

    def __init__(self, workload: Workload, batch: int, config: BenchConfig, peaks) -> None:
        dev = config.device
        self.workload, self.batch, self.config = workload, batch, config
        torch.manual_seed(config.seed)
        self.model = workload.build().to(dev)
        shape = workload.input_shape(batch)
        calib = torch.randn(min(batch, 8) if batch > 1 else 2, *shape[1:], device=dev)
        calibrate_bn(self.model, calib)
        self.model.train(config.mode == "train")
        costs = trace_costs(self.model, workload.sample_shape)
        self.flops, self.bytes_min = work(costs, batch, config.mode, config.element_bytes)
        self.floor_s = peaks.floor_s(self.flops, self.bytes_min)
        # A block or unit inside the network receives autocast's dtype: fp32 inputs would add
        # cast passes to eager's time and ours (eager's add and ReLU then even run in fp32)
        # that no block in the network makes, larger than the floor itself at rn50-l1. A
        # model's input is the fp32 image a data loader gives.
        low = config.dtype in ("bf16", "fp16") and workload.kind != "model"
        in_dtype = config.torch_dtype if low else torch.float32
        n = rotation_count(in_dtype.itemsize * int(torch.Size(shape).numel()), dev,
                           config.rotate)
        self.inputs = {torch.contiguous_format: [torch.randn(shape, device=dev).to(in_dtype)
                                                 for _ in range(n)]}
        self.inputs[torch.channels_last] = [x.contiguous(memory_format=torch.channels_last)
                                            for x in self.inputs[torch.contiguous_format]]
        # Reference: float64 where affordable, else fp32 with TF32 off (math_mode("fp32")).
        self.reference = "float64" if self.flops <= FP64_BUDGET[dev] else "float32"
        self.ref_dtype = TORCH_DTYPE["fp32"] if self.reference == "float32" else torch.float64
        ref_model = copy.deepcopy(self.model).to(self.ref_dtype)
        # The gate compares each running statistic's update (after - before) with the
        # reference's: one momentum-0.1 update moves a statistic by a tenth of its distance
        # to the batch's, far inside a bf16 tolerance on the statistic itself, so a BN that
        # never updated passed (a probe).
        self.stats_before = _running_stats(self.model)
        x0 = self.inputs[torch.contiguous_format][0]
        with math_mode("fp32"):
            self.ref_out, self.ref_grads, self.ref_stats = _gate_outputs(
                ref_model, ref_model, x0.to(self.ref_dtype), config.mode, "fp32", dev)
        # One more input, none of the timed ones, for a call after the timed calls
        # (check_later). Eval: with its reference output. Train: its reference is a step of
        # the reference model from the state the contender has reached by then.
        x = torch.randn(shape, device=dev).to(in_dtype)
        self.later_inputs = {torch.contiguous_format: x,
                             torch.channels_last: x.contiguous(memory_format=torch.channels_last)}
        self.ref_later = None
        # Train: the state every contender starts from, for the state each has reached by
        # its later step (check_later_step: held to eager-cl's after as many steps).
        self.initial_state = ({k: v.detach().to("cpu", copy=True)
                               for k, v in self.model.state_dict().items()}
                              if config.mode == "train" else {})
        if config.mode == "eval":
            with math_mode("fp32"):
                self.ref_later = _gate_outputs(ref_model, ref_model, x.to(self.ref_dtype),
                                               "eval", "fp32", dev)[0]
        del ref_model
        self.baseline_out: float | None = None
        self.baseline_grad: float | None = None
        self.baseline_params: dict[str, float] = {}
        self.baseline_stats: float | None = None
        self.baseline_stat_errs: dict[str, float] = {}
        self.baseline_cos: dict[str, float] = {}
        # Train: eager-cl's errors on its later steps (check_later_step) and the state it had
        # reached before each, by whether the timed steps were graph replays.
        self.baseline_later: tuple | None = None
        self.baseline_states: dict[bool, dict] = {}

    def common(self) -> dict:
        w, c = self.workload, self.config
        return {"workload": w.name, "kind": w.kind, "spec": w.spec,
                "input_shape": list(w.input_shape(self.batch)), "batch": self.batch,
                "mode": c.mode, "dtype": c.dtype, "device": c.device,
                "flops": self.flops, "bytes_min": self.bytes_min, "floor_s": self.floor_s,
                "reference": self.reference}

    def check(self, name: str, out: torch.Tensor, grads: dict[str, torch.Tensor] | None,
              stats: dict[str, torch.Tensor] | None = None) -> dict:
        """The gate's verdict on one contender's output (and, in train mode, its parameter
        gradients and the BatchNorm running statistics after its step, by name): the fields of
        its result row. eager-cl, checked first, only has to be finite; its errors set the
        others' budgets."""
        verdict, errs = self._judge(
            name, (out, grads, stats),
            (self.ref_out, self.ref_grads, getattr(self, "ref_stats", None)),
            getattr(self, "stats_before", {}), self._baseline())
        if name == C.BASELINE:
            (self.baseline_out, self.baseline_grad, self.baseline_params,
             self.baseline_stats, self.baseline_stat_errs, self.baseline_cos) = errs
        return verdict

    def _dtype_tol(self) -> float:
        """The DESIGN.md §4 tolerance of the run's dtype."""
        return TOLERANCES["tf32" if self.config.dtype == "tf32"
                          else TORCH_DTYPE[self.config.dtype]]

    def _baseline(self) -> tuple:
        """eager-cl's errors at the gate: (output, gradients, per parameter, running
        statistics, per statistic, each parameter gradient's cosine with the reference's);
        None and {} before it ran."""
        return (self.baseline_out, self.baseline_grad, getattr(self, "baseline_params", {}),
                getattr(self, "baseline_stats", None), getattr(self, "baseline_stat_errs", {}),
                getattr(self, "baseline_cos", {}))

    def _judge(self, name: str, got: tuple, ref: tuple, before: dict[str, torch.Tensor],
               base: tuple, out_label: str = "output") -> tuple[dict, tuple]:
        """(verdict fields, errors as _baseline() orders them) of got = (out, grads, stats)
        against ref = (ref_out, ref_grads, ref_stats), the running statistics' updates taken
        from `before`, each budget from the baseline errors `base`."""
        out, grads, stats = got
        ref_out, ref_grads, ref_stats = ref
        base_out, base_grad, base_params, base_stats, base_stat_errs, base_cos = base
        shapes = _shape_problems(out, ref_out, grads, ref_grads, stats, ref_stats)
        if shapes:
            # A wrong shape or a renamed parameter (which would break checkpoints) is a
            # failure, not a crash of the gate or a comparison of unrelated tensors.
            return (self._verdict(math.inf, math.inf, None, math.inf, None, None, shapes),
                    (math.inf, None, {}, None, {}, {}))
        err_out = rel_err(out, ref_out)
        err_grad, params, cos = None, {}, {}
        if grads is not None:
            err_grad = rel_err(_cat(grads), _cat(ref_grads))
            # A parameter whose reference gradient is exactly zero (unused, behind a zero
            # gamma) has no relative error to hold (rel_err is then an absolute norm): it is
            # held only by the total.
            params = {n: rel_err(g, ref_grads[n]) for n, g in grads.items()
                      if bool(ref_grads[n].any())}
            cos = {n: _cosine(grads[n], ref_grads[n]) for n in params}
        err_stats, stat_errs, counts = None, {}, []
        if stats is not None and ref_stats:
            floats = [n for n in sorted(stats) if not n.endswith("num_batches_tracked")]
            got_d = {n: stats[n] - before[n] if n in before else stats[n] for n in floats}
            want = {n: ref_stats[n] - before[n] if n in before else ref_stats[n]
                    for n in floats}
            err_stats = rel_err(_cat(got_d), _cat(want))
            stat_errs = {n: rel_err(got_d[n], want[n]) for n in floats if bool(want[n].any())}
            counts = [n for n in sorted(stats) if n.endswith("num_batches_tracked")
                      and not torch.equal(stats[n], ref_stats[n])]
        err = max([err_out] + [e for e in (err_grad, err_stats) if e is not None])
        gated = None
        extra = {}
        if name == C.BASELINE:
            tol = tol_grad = tol_stats = math.inf  # NaN still fails: NaN <= inf is False
            problems = [] if math.isfinite(err) else [f"relative error {err:.3e} is not finite"]
        else:
            dtype_tol = self._dtype_tol()
            tol, tol_grad, tol_stats = (_loosened(dtype_tol, 2, b) for b in (
                base_out, base_grad, base_stats))
            problems = [] if err_out <= tol else [
                f"{out_label}: relative error {err_out:.3e} > tolerance {tol:.1e}"]
            if err_grad is not None and not err_grad <= tol_grad:
                problems.append(f"gradients: relative error {err_grad:.3e} > tolerance "
                                f"{tol_grad:.1e}")
            if params:
                problems += _per_tensor("gradient", params, base_params, dtype_tol)
                budgets = {n: _loosened(dtype_tol, PARAM_FACTOR, base_params.get(n))
                           for n in params}
                gated = f"{sum(b < 1 for b in budgets.values())}/{len(budgets)}"
                problems += _pointing_away(cos, base_cos, budgets,
                                           {n: grads[n].numel() for n in params})
            if err_stats is not None and not err_stats <= tol_stats:
                problems.append(f"running statistics: relative error {err_stats:.3e} > "
                                f"tolerance {tol_stats:.1e}")
            if stat_errs:
                problems += _per_tensor("running statistic", stat_errs, base_stat_errs,
                                        dtype_tol)
            if not math.isfinite(err):
                problems.append(f"relative error {err:.3e} is not finite")
        if counts:
            problems.append(f"num_batches_tracked differs from the reference's at {counts[0]} "
                            f"({len(counts)} BatchNorms)")
        if err_stats is not None:
            extra = {"rel_err_stats": err_stats, "tolerance_stats": _finite(tol_stats)}
        verdict = {**self._verdict(err, err_out, err_grad, tol, tol_grad, gated, problems),
                   **extra}
        return verdict, (err_out, err_grad, params, err_stats, stat_errs, cos)

    def check_later(self, name: str, later) -> str | None:
        """Why a call made after the timed ones (on later_inputs, none of the timed inputs)
        fails the tolerance the first call was held to (eager-cl: only finite), or None: the
        timed calls may take another path than the gated first one (Triton's inference plans
        replay their first launch; a graph replays its capture), and a stale output would
        pass the first gate. Eval: `later` is that call's output. Train: a LaterStep, judged
        against the reference model's step from the same state (check_later_step)."""
        if isinstance(later, LaterStep):
            return self.check_later_step(name, later)
        ref = self.ref_later
        err = rel_err(later, ref) if later.shape == ref.shape else math.inf
        if name == C.BASELINE:
            tol = math.inf
        else:
            tol = _loosened(self._dtype_tol(), 2, self.baseline_out)
        if err <= tol:  # (NaN never passes)
            return None
        return (f"a call after the timed ones: output relative error {err:.3e} > tolerance "
                f"{tol:.1e} (its first call passed)")

    def check_later_step(self, name: str, later: LaterStep) -> str | None:
        """A train step after the timed ones: its loss, parameter gradients and running-
        statistics update against the reference model's step from the state the contender
        had just before it (its parameters and buffers, loaded by name: names survive
        conversion). The budgets are the gate's, loosened to eager-cl's own errors on its
        later step where those are larger (the state has moved by the timed steps)."""
        model = copy.deepcopy(self.model).to(self.ref_dtype)
        model.load_state_dict(later.before)
        x = self.later_inputs[torch.contiguous_format].to(self.ref_dtype)
        with math_mode("fp32"):
            ref_out, ref_grads, ref_stats = _gate_outputs(model, model, x, "train", "fp32",
                                                          self.config.device)
        del model
        before = _running_stats(later.before)
        base = self._baseline()
        if name != C.BASELINE:
            base = _larger(base, self.baseline_later)
        verdict, errs = self._judge(name, (later.loss, later.grads, later.stats),
                                    (loss_of(ref_out).detach(), ref_grads, ref_stats), before,
                                    base, out_label="loss")
        problems = [] if verdict["status"] == "ok" else [verdict["reason"]]
        if name == C.BASELINE:
            self.baseline_later = _larger(errs, self.baseline_later)
            self.baseline_states[later.graph] = later.before
        elif later.graph in self.baseline_states:
            problems += _drifted(later.before, self.baseline_states[later.graph],
                                 self.initial_state, self._dtype_tol())
        if not problems:
            return None
        return f"a step after the timed ones: {'; '.join(problems)} (its first step passed)"

    @staticmethod
    def _verdict(err, err_out, err_grad, tol, tol_grad, gated, problems) -> dict:
        ok = not problems  # NaN and inf never pass
        return {"rel_err": err, "rel_err_output": err_out, "rel_err_grad": err_grad,
                "tolerance": _finite(tol),
                "tolerance_grad": _finite(tol_grad) if err_grad is not None else None,
                "grads_gated": gated, "status": "ok" if ok else "wrong",
                "reason": None if ok else "; ".join(problems)}

    @property
    def baseline_err(self) -> float | None:
        """eager-cl's error (output, or gradients where worse); None before it ran."""
        errs = [e for e in (self.baseline_out, self.baseline_grad) if e is not None]
        return max(errs) if errs else None

    def gate_note(self) -> str:
        """'' or why this workload's gate is loose (eager itself far from the reference)."""
        e = self.baseline_err or 0.0
        notes = [f"gate loose: eager-cl is {e:.2g} off the reference"] if e > SANITY else []
        params = getattr(self, "baseline_params", {})
        tight = sum(PARAM_FACTOR * v < 1 for v in params.values())
        if tight < len(params):
            notes.append(f"{tight}/{len(params)} parameter gradients gated (eager-cl is "
                         f"{1 / PARAM_FACTOR:.2g}+ off on the rest: held to their direction)")
        return "; ".join(notes)


class LaterStep(NamedTuple):
    """A train step made after the timed ones (check_later_step): the contender's state
    (state_dict, on the CPU) just before it, its loss, then its parameter gradients and
    running statistics (as _grads and _running_stats give them); graph: whether the timed
    steps were CUDA-graph replays."""

    before: dict
    loss: torch.Tensor
    grads: dict
    stats: dict
    graph: bool = False


def _larger(a: tuple, b: tuple | None) -> tuple:
    """Baseline errors (Case._baseline()'s order) item by item the larger finite one of a
    and b (per name in the dicts), the cosines the smaller: a budget loosened by a second
    measurement, never switched off by an inf or NaN in it."""
    if b is None:
        return a

    def pick(x, y, best):
        xs = [v for v in (x, y) if v is not None and math.isfinite(v)]
        return best(xs) if xs else x

    def merge(x, y, best):
        if isinstance(x, dict):
            return {n: pick(x.get(n), y.get(n), best) for n in x.keys() | y.keys()}
        return pick(x, y, best)

    *errors, cos = zip(a, b, strict=True)
    return (*(merge(x, y, max) for x, y in errors), merge(*cos, min))


def _drifted(state: dict, eager: dict, initial: dict, dtype_tol: float) -> list[str]:
    """What is wrong with the state a contender reached after its timed steps, against the
    state eager-cl reached after as many steps on the same inputs (both from `initial`): a
    tensor that moved more than 4x as far as eager-cl's (at least the dtype's tolerance of
    its size), or a count that differs. The later step is judged from the contender's own
    state, so a fault that struck once during the timed steps (a weight or running statistic
    overwritten) would otherwise pass."""
    over, counts = [], []
    for k, start in initial.items():
        got, want = state.get(k), eager.get(k)
        if got is None or want is None or got.shape != start.shape:
            counts.append(k)
            continue
        if not start.is_floating_point():
            if not torch.equal(got, want):
                counts.append(k)
            continue
        start64 = start.double()
        moved = float((got.double() - start64).norm())
        bound = max(PARAM_FACTOR * float((want.double() - start64).norm()),
                    dtype_tol * float(start64.norm()), dtype_tol * float(want.double().norm()))
        if bound > 0 and not moved <= bound:  # (NaN never passes)
            over.append((moved / bound if math.isfinite(moved) else math.inf, k, moved, bound))
    problems = []
    if counts:
        problems.append(f"its state after the timed steps differs from eager-cl's at {counts[0]} "
                        f"({len(counts)} such)")
    if over:
        _, k, moved, bound = max(over)
        problems.append(f"its state after the timed steps: {k} moved {moved:.3e}, over "
                        f"{bound:.3e} (4x eager-cl's move, at least the dtype's tolerance of its "
                        f"size; {len(over)} such)")
    return problems


def _cosine(g: torch.Tensor, ref: torch.Tensor) -> float:
    """cos(g, ref) of two flat float64 gradients; 0 for a zero g (it points nowhere)."""
    norm = float(g.norm() * ref.norm())
    return float(g @ ref) / norm if norm > 0 else 0.0


def _pointing_away(cos: dict[str, float], base_cos: dict[str, float],
                   budgets: dict[str, float], sizes: dict[str, int]) -> list[str]:
    """Where a parameter's error budget is 1 or more (eager-cl itself a quarter or more off:
    an ill-conditioned early layer in bf16), an error within it may be a zero or sign-flipped
    gradient; there the gradient must also point the reference's way: not zero, and its
    cosine with the reference's at least a quarter of eager-cl's less 3/sqrt(elements).
    Noise within the budget passes: |g - r| <= 4e|r| with eager's noise e gives a mean cosine
    1/sqrt(1 + 16e^2) >= 1/(4 sqrt(1 + e^2)), about which a random direction moves it by
    at most 1/sqrt(elements) per standard deviation; a flipped gradient does not (nor, where
    the parameter has elements enough, an unrelated one)."""
    over = []
    for n, b in budgets.items():
        if b < 1 or not base_cos.get(n, 0.0) > 0:
            continue
        floor = base_cos[n] / PARAM_FACTOR - 3 / math.sqrt(sizes[n])
        if cos[n] == 0.0 or not cos[n] >= floor:  # (exactly 0: a zero gradient)
            over.append((cos[n], floor, n))
    if not over:
        return []
    c, floor, n = min(over)
    why = ("is zero (the reference's is not)" if c == 0.0 and floor <= 0 else
           f"does not point the reference's way: cosine {c:.3f} < {floor:.3f} (a quarter of "
           "eager-cl's, less 3/sqrt(elements))")
    return [f"gradient of {n} {why}; {len(over)} such"]


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _shape_problems(out, ref_out, grads, ref_grads, stats, ref_stats) -> list[str]:
    """What makes a contender's results incomparable with the reference's: a different
    output shape, parameter or statistic names, or tensor sizes."""
    problems = []
    if out.shape != ref_out.shape:
        problems.append(f"output shape {tuple(out.shape)}, the reference's "
                        f"{tuple(ref_out.shape)}")
    for what, got, want in (("parameter", grads, ref_grads),
                            ("running statistic", stats, ref_stats)):
        if got is None or want is None:
            continue
        if got.keys() != want.keys():
            diff = sorted(got.keys() ^ want.keys())
            problems.append(f"{what} names differ from the reference's: {diff[:4]}")
            continue
        sizes = [n for n in got if got[n].numel() != want[n].numel()]
        if sizes:
            problems.append(f"{what} {sizes[0]} has {got[sizes[0]].numel()} elements, the "
                            f"reference's {want[sizes[0]].numel()} ({len(sizes)} differ)")
    return problems


def _per_tensor(what: str, errs: dict[str, float], baseline: dict[str, float],
                dtype_tol: float) -> list[str]:
    """One problem naming the tensor furthest over its budget (PARAM_FACTOR x eager's error
    on it, at least the dtype's tolerance), or none."""
    budgets = {n: _loosened(dtype_tol, PARAM_FACTOR, baseline.get(n)) for n in errs}
    over = sorted(((e / budgets[n] if math.isfinite(e) else math.inf, n)
                   for n, e in errs.items() if not (math.isfinite(e) and e <= budgets[n])),
                  reverse=True)
    if not over:
        return []
    n = over[0][1]
    return [f"{what} of {n}: relative error {errs[n]:.3e} > {budgets[n]:.1e} ({len(over)} over "
            "budget)"]


def _loosened(dtype_tol: float, factor: float, baseline: float | None) -> float:
    """max(dtype_tol, factor x eager's error); dtype_tol alone where eager's error is unknown
    or not finite (an inf in eager's output must not switch the gate off for the others)."""
    if baseline is None or not math.isfinite(baseline):
        return dtype_tol
    return max(dtype_tol, factor * baseline)


def _row(case: Case, name: str, graph: bool, **kw) -> dict:
    row = {**case.common(), "contender": name + ("+graph" if graph else ""), "cuda_graph": graph,
           "memory_format": None, "status": "skipped", "reason": None, "note": "",
           "rel_err": None, "rel_err_output": None, "rel_err_grad": None, "tolerance": None,
           "tolerance_grad": None, "grads_gated": None,
           "time_s": None, "images_per_s": None, "speedup": None, "peak_memory_bytes": None,
           "roofline_pct": None, "build_s": None}
    row.update(kw)
    return row


def _time(case: Case, step, inputs, flush: L2Flush, graph: bool,
          later_input: torch.Tensor | None = None, module: nn.Module | None = None
          ) -> tuple[dict, int | None, torch.Tensor | LaterStep | None]:
    """Timing stats of `step` (captured first when `graph`), the peak bytes allocated, and
    one more call on later_input after the timed ones where one is given (a contender may
    take another path once warm: Triton's inference plans, a graph replay): its output, or
    with `module` (train: the module step trains) a LaterStep."""
    cfg, dev = case.config, case.config.device
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = flush
    if graph:
        put, step = capture_graph(step, inputs[0])

        def before(x):
            # The copy into the static input first: it would leave the input in L2 after
            # the flush (the graph rows' input was warm, eager's cold, until 2026-11-28).
            put(x)
            flush(x)
    samples = time_loop(step, inputs, device=dev, warmup=cfg.warmup, repeats=cfg.repeats,
                        before=before)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    later = None
    if later_input is not None:
        if graph:
            put(later_input)
        if module is None:
            later = step(later_input).detach().clone()
        else:
            # (on the CPU: on the device it would count in the next variant's peak memory)
            state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
            # (a replayed graph leaves its gradients in the tensors its capture allocated,
            # which the parameters hold since)
            loss = step(later_input).detach().clone()
            later = LaterStep(state, loss, _grads(module), _running_stats(module), graph)
    return summarize(samples), peak, later


def build_and_gate(case: Case, name: str) -> tuple[C.Built, Callable, dict]:
    """Contender `name` built from a copy of the case's model, and the gate's verdict on its
    first call (Case.check's fields): (built, its forward, verdict). The caller holds the
    run's math_mode; eager-cl goes first, as its errors set the others' budgets."""
    cfg, dev = case.config, case.config.device
    built = C.build(name, copy.deepcopy(case.model), case.workload, cfg)
    fwd = C.call_with(built)
    # 'auto' picks per op among backends it has measured and verified: the gate's run
    # (outside the timed loop) is that measurement.
    tuning = autotune() if name == "fused-auto" else contextlib.nullcontext()
    with tuning as choices, recording_uses() as used:
        out, grads, stats = _gate_outputs(fwd, built.module, case.inputs[built.memory_format][0],
                                          cfg.mode, cfg.dtype, dev)
    if choices is not None:  # (this workload's signatures, not the whole cache's)
        built.note += "; auto: " + _auto_summary({k: choices[k] for k in used if k in choices})
    gate = case.check(name, out, grads, stats)
    if case.gate_note():
        built.note = "; ".join(n for n in (built.note, case.gate_note()) if n)
    return built, fwd, gate


def _measure(case: Case, name: str, flush: L2Flush) -> list[dict]:
    """Rows for contender `name` (and its +graph twin): build, gate, time."""
    cfg, dev = case.config, case.config.device
    rows: list[dict] = []
    built = None
    _free(dev)
    mem0 = torch.cuda.memory_allocated() if dev == "cuda" else 0
    try:
        with math_mode(cfg.dtype):
            t0 = time.perf_counter()
            built, fwd, gate = build_and_gate(case, name)
            build_s = time.perf_counter() - t0  # includes compilation (first call)
            inputs = case.inputs[built.memory_format]
            mf = ("channels_last" if built.memory_format == torch.channels_last
                  else "contiguous")
            variants = [False] + ([True] if cfg.cuda_graphs else [])
            if gate["status"] != "ok":
                return [_row(case, name, g, memory_format=mf, note=built.note, build_s=build_s,
                             **gate) for g in variants]
            step = make_step(fwd, built.module, cfg.mode, cfg.dtype, dev)
            for graph in variants:
                try:
                    stats, peak, later = _time(
                        case, step, inputs, flush, graph,
                        case.later_inputs.get(built.memory_format),
                        built.module if cfg.mode == "train" else None)
                    if peak is not None:  # beyond what was allocated before it was built
                        peak -= mem0
                    why = None if later is None else case.check_later(name, later)
                    del later
                    if why is not None:  # (wrong: not timed, as a first call gated wrong)
                        rows.append(_row(case, name, graph, memory_format=mf,
                                         note=built.note, build_s=build_s,
                                         **{**gate, "status": "wrong", "reason": why}))
                        continue
                    rows.append(_row(case, name, graph, memory_format=mf, note=built.note,
                                     build_s=build_s, time_s=stats,
                                     images_per_s=case.batch / stats["median"],
                                     peak_memory_bytes=peak,
                                     roofline_pct=100 * case.floor_s / stats["median"], **gate))
                except Exception as e:  # noqa: BLE001 - a failed contender must not end the run
                    rows.append(_row(case, name, graph, memory_format=mf, note=built.note,
                                     reason=_reason(e)))
    except Exception as e:  # noqa: BLE001
        rows = [_row(case, name, False, reason=_reason(e))]
    finally:
        del built
        if name in C.COMPILE:
            torch._dynamo.reset()
        _free(dev)
    return rows


def validate(config: BenchConfig) -> list[Workload]:
    """Resolve workloads and contenders before anything runs (ConfigError on bad input)."""
    if config.cuda_graphs and config.device != "cuda":
        from .config import bad
        raise bad("--cuda-graphs", True, "only with --device cuda")
    C.select(config)
    return [get_workload(n) for n in expand(config.models)]


def run_bench(config: BenchConfig, progress: Progress | None = None,
              on_row: Callable[[dict], None] | None = None) -> dict:
    """Run `config`; returns {"schema", "environment", "config", "peaks", "results"}.
    on_row(result) is called after every row (partial results survive a killed run)."""
    progress = progress or Progress()
    workloads = validate(config)
    selection = C.select(config)
    result = {"schema": SCHEMA, "complete": False, "environment": environment(config.device),
              "config": config.to_dict(), "peaks": None, "results": []}
    total = len(workloads) * len(config.batches) * len(selection)
    progress.begin(total + 1)
    progress.step("measuring matmul rate and copy bandwidth")
    result["peaks"] = measure_peaks(config.device, config.dtype, quick=config.quick).to_dict()
    peaks = Peaks(**result["peaks"])
    flush = L2Flush(config.device, config.flush_l2)
    for workload in workloads:
        for batch in config.batches:
            try:
                case = Case(workload, batch, config, peaks)
            except ValueError as e:  # BatchNorm in training with 1 value per channel
                raise ConfigError(f"--batch {batch} with --model {workload.name!r} in "
                                  f"{config.mode} mode: {e}; accepted: a batch and input "
                                  "size that give every BatchNorm more than one value per "
                                  "channel") from e
            rows: list[dict] = []
            for name, left_out in selection:
                progress.step(f"{workload.name} b{batch} {name}")
                if left_out is None:
                    left_out = C.unavailable(name, workload, config)
                new = ([_row(case, name, False, reason=left_out)] if left_out
                       else _measure(case, name, flush))
                rows += new
                # Before on_row writes the file: a step killed by its time limit keeps the
                # speedups of the contenders that finished.
                set_speedups(rows)
                result["results"] += new
                for r in new:
                    progress.done(r)
                if on_row is not None:
                    on_row(result)
            del case
            _free(config.device)
    result["complete"] = True
    progress.end()
    return result
