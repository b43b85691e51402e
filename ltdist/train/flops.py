"""What a training step costs in FLOPs, counted from the modules, and what share of the device's
peak the loop achieves (MFU).

The count runs the task's own forward + backward once at the start, before the model is
wrapped, on a synthetic batch at the configured image size and text length, and adds up every
matrix product and convolution with ``torch.utils.flop_counter``'s formulas (2 m n k per
product; norms, softmax and element-wise work are not counted, as is the convention for MFU).
The products themselves are not computed (the counter answers them with tensors of the right
shape), so a count at the real shapes costs less than one forward pass. It is split into:

- ``frozen_forward``: the forward of modules without a trainable parameter (the frozen CLIP
  tower): no backward runs through them. A run that reads their output from a cache skips it
  (:meth:`StepFlops.without_frozen_forward`).
- ``trainable_forward``: every other forward product (the Q-Former, projections, the losses).
- ``trainable_backward``: what autograd really runs: weight gradients of trainable layers and
  input gradients only where the input needs one (a layer reading frozen tokens gets its weight
  gradient alone, ~1x its forward, not 2x).

Attention is counted as its two products (QK^T, then weights x V) forward and four backward,
whatever kernel runs it (the math path, CPU flash, CUDA flash / memory-efficient / cuDNN):
fused kernels that recompute the scores in backward do that work on top of the model's FLOPs,
which MFU does not credit. PyTorch's fast path of ``nn.MultiheadAttention`` (a frozen open_clip
tower in eval mode) is a single fused op the counter cannot see into; the count turns it off,
so the same products are counted one by one.

The count is made at micro-batches 1 and 2: FLOPs = fixed + batch x per sample. The fixed part
is work done once per step whatever the batch (DP-VLPA adaptation re-encodes every class prompt
each step); terms that grow with the square of the batch (the contrastive losses' b x B
similarities, ~1e-5 of a step at the papers' shapes) are extrapolated linearly, and the small
negative fixed part they leave is dropped.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ltdist.train.config import TrainConfig

log = logging.getLogger(__name__)


# -- peaks ------------------------------------------------------------------------------------

Precision = str  # "bf16" | "fp16" | "tf32" | "fp32"

# Dense (no structured sparsity) peak TFLOP/s from NVIDIA's data sheets, per precision of the
# matrix units (16-bit inputs with fp32 accumulation, as PyTorch runs them). The first pattern
# that matches torch.cuda.get_device_name() wins; None: the chip has no such units.
PEAKS: tuple[tuple[str, str, dict[Precision, float | None]], ...] = (
    (r"H100 PCIe", "H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"H100 NVL", "H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100", "H100 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H200 NVL", "H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", "H200 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", "L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"L40\b", "L40", {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", "A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"RTX A6000", "RTX A6000", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    (r"RTX 4090", "RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"RTX 3090", "RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"V100.*PCIE", "V100 PCIe", {"bf16": None, "fp16": 112.0, "tf32": None, "fp32": 14.0}),
    (r"V100", "V100 SXM2", {"bf16": None, "fp16": 125.0, "tf32": None, "fp32": 15.7}),
    (r"\bT4\b", "T4", {"bf16": None, "fp16": 65.0, "tf32": None, "fp32": 8.1}),
)


@dataclass(frozen=True)
class Peak:
    """The peak a run is measured against: TFLOP/s (None: unknown), and where it came from."""

    tflops: float | None
    source: str  # "H100 SXM bf16 dense", "config peak_tflops", or why there is none


def matmul_precision(mixed_precision: str) -> Precision:
    """The precision the matrix units run at: the autocast dtype, else TF32 when PyTorch allows
    it for fp32 matrix products (``torch.set_float32_matmul_precision``), else fp32."""
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def device_peak(device_name: str, precision: Precision, override: float = 0.0) -> Peak:
    """The dense peak of ``device_name`` (``torch.cuda.get_device_name()``; "cpu" has none) at
    ``precision``; ``override`` (the config's ``peak_tflops``) wins when set."""
    if override:
        return Peak(override, "config peak_tflops")
    if device_name == "cpu":
        return Peak(None, "a CPU has no peak in the table; peak_tflops sets one")
    for pattern, label, peaks in PEAKS:
        if re.search(pattern, device_name, re.IGNORECASE):
            value = peaks.get(precision)
            if value is None:
                return Peak(None, f"{label} has no dense {precision} matrix units in the table")
            return Peak(value, f"{label} {precision} dense")
    return Peak(None, f"no peak for {device_name!r} in the table; set peak_tflops")


def run_peak(device: torch.device, mixed_precision: str, override: float = 0.0) -> Peak:
    """The peak a run on ``device`` at ``mixed_precision`` is measured against (``device_peak``
    of the device's name)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return device_peak(name, matmul_precision(mixed_precision), override)


def throughput(
    flops_per_sample: float, samples_per_s: float, world_size: int, peak: Peak
) -> dict[str, float]:
    """Achieved TFLOP/s of all devices and of one, and MFU = one device's / its peak (only
    where the peak is known)."""
    total = flops_per_sample * samples_per_s / 1e12
    out = {"tflops": total, "tflops_per_device": total / world_size}
    if peak.tflops:
        out["mfu"] = out["tflops_per_device"] / peak.tflops
    return out


# -- counting ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopSplit:
    """FLOPs of one forward + backward, split by what autograd does with them."""

    frozen_forward: float = 0
    trainable_forward: float = 0
    trainable_backward: float = 0

    @property
    def total(self) -> float:
        return self.frozen_forward + self.trainable_forward + self.trainable_backward

    def combine(self, other: FlopSplit, a: float = 1, b: float = 1) -> FlopSplit:
        """a x self + b x other, part by part."""
        return FlopSplit(
            a * self.frozen_forward + b * other.frozen_forward,
            a * self.trainable_forward + b * other.trainable_forward,
            a * self.trainable_backward + b * other.trainable_backward,
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "frozen_forward": self.frozen_forward,
            "trainable_forward": self.trainable_forward,
            "trainable_backward": self.trainable_backward,
        }


@dataclass(frozen=True)
class StepFlops:
    """A micro-step's FLOPs: ``sample`` per sample, plus ``fixed`` once per step."""

    sample: FlopSplit
    fixed: FlopSplit
    frozen_modules: tuple[str, ...]  # the frozen modules that did forward work
    seconds: float = 0.0  # what counting took

    def per_sample(self, batch_size: int) -> FlopSplit:
        """FLOPs per sample at a micro-batch of ``batch_size`` (the fixed part shared)."""
        return self.sample.combine(self.fixed, 1, 1 / batch_size)

    def without_frozen_forward(self) -> StepFlops:
        """The step of a run that reads the frozen modules' outputs from a cache."""
        return replace(
            self,
            sample=replace(self.sample, frozen_forward=0),
            fixed=replace(self.fixed, frozen_forward=0),
            frozen_modules=(),
        )

    def describe(self, batch_size: int) -> str:
        p = self.per_sample(batch_size)
        frozen = f" ({', '.join(self.frozen_modules)})" if self.frozen_modules else ""
        return (
            f"{p.total / 1e9:.2f} GFLOP per sample at micro-batch {batch_size} = frozen forward "
            f"{p.frozen_forward / 1e9:.2f}{frozen} + trainable forward "
            f"{p.trainable_forward / 1e9:.2f} + backward {p.trainable_backward / 1e9:.2f}"
        )

    def record(self, batch_size: int) -> dict:
        """The metrics.json entry: per sample at ``batch_size``, and the fixed part."""
        p = self.per_sample(batch_size)
        return {
            "per_sample": p.total,
            **p.as_dict(),
            "fixed_per_step": self.fixed.total,
            "micro_batch": batch_size,
            "frozen_modules": list(self.frozen_modules),
        }


def _sdpa_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Four products (dV, dP, dQ, dK): twice the forward; a kernel's recompute is not counted."""
    from torch.utils.flop_counter import sdpa_flop_count

    return 2 * sdpa_flop_count(query, key, value)


def _formulas() -> dict:
    aten = torch.ops.aten
    backward = [
        aten._scaled_dot_product_flash_attention_for_cpu_backward,
        aten._scaled_dot_product_flash_attention_backward,
        aten._scaled_dot_product_efficient_attention_backward,
        aten._scaled_dot_product_cudnn_attention_backward,
    ]
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward,
        **dict.fromkeys(backward, _sdpa_backward),
    }


# ops that do matrix work: one of them without a formula is work the count misses
_HEAVY = re.compile(r"mm|conv|attention|matmul|einsum|linear")


def _shape_only_ops() -> set:
    aten = torch.ops.aten
    return {
        aten.mm,
        aten.addmm,
        aten.bmm,
        aten.baddbmm,
        aten.convolution,
        aten.convolution_backward,
        aten._scaled_dot_product_flash_attention_for_cpu,
        aten._scaled_dot_product_flash_attention_for_cpu_backward,
    }


class _Counter(torch.utils._python_dispatch.TorchDispatchMode):
    """Adds up the FLOPs of every op with a formula (``torch.utils.flop_counter``'s, with the
    attention ones above) and records heavy ops that have none.

    Unless ``compute``, it answers the matrix products with uninitialised tensors of their
    output's shape (found on the meta device) instead of computing them: the count needs
    shapes alone, and no value they produce steers control flow in these models (masks come
    from the inputs), so a count at the real shapes costs a fraction of a step on a CPU.
    """

    def __init__(self, compute: bool) -> None:
        from torch.utils.flop_counter import flop_registry, shape_wrapper

        super().__init__()
        self.formulas = {
            **flop_registry,
            **{op: shape_wrapper(f) for op, f in _formulas().items()},
        }
        self.skip = set() if compute else _shape_only_ops()
        self.total, self.missed = 0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet in self.skip and not func._schema.is_mutable:
            out = _empty_like_output(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        formula = self.formulas.get(packet)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        elif _HEAVY.search(packet.__name__):
            self.missed[str(packet)] += 1
        return out


def _empty_like_output(func, args, kwargs):
    """``func``'s output as uninitialised tensors: shapes from a run on the meta device."""
    from torch.utils._pytree import tree_leaves, tree_map

    device = next(t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))

    def meta(x):
        return x.to("meta") if isinstance(x, torch.Tensor) else x

    def empty(x):
        if not isinstance(x, torch.Tensor):
            return x
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)

    return tree_map(empty, func(*tree_map(meta, args), **tree_map(meta, kwargs)))


def frozen_roots(module: nn.Module) -> dict[str, nn.Module]:
    """The outermost submodules that hold parameters, none of them trainable."""
    roots: dict[str, nn.Module] = {}

    def visit(prefix: str, mod: nn.Module) -> None:
        params = list(mod.parameters())
        if params and not any(p.requires_grad for p in params):
            roots[prefix] = mod
            return
        for name, child in mod.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", module)
    return roots


def count_flops(
    module: nn.Module, loss_fn: Callable[[], torch.Tensor], compute: bool = False
) -> tuple[FlopSplit, dict]:
    """One ``loss_fn()`` (a forward of ``module`` to a scalar) and its backward, counted:
    (the split, FLOPs per frozen root module). The backward is that of ``module``'s trainable
    parameters (what training computes), and leaves their ``.grad`` alone. The matrix products
    are not computed unless ``compute`` (their values are garbage)."""
    roots = frozen_roots(module)
    frozen = dict.fromkeys(roots, 0)
    counter = _Counter(compute)
    starts: dict[str, int] = {}
    hooks = []
    for name, mod in roots.items():

        def pre(_m, _a, name=name):
            starts[name] = counter.total

        def post(_m, _a, _o, name=name):
            frozen[name] += counter.total - starts.pop(name)

        hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    flush = torch.set_flush_denormal(True)  # leftover bytes must not slow what still runs
    try:
        with counter:
            loss = loss_fn()
            forward = counter.total
            params = [p for p in module.parameters() if p.requires_grad]
            if loss.requires_grad:  # else nothing in it trains; gradients returned, not stored
                torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        if flush:
            torch.set_flush_denormal(False)
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in hooks:
            h.remove()
    if counter.missed:
        log.warning(
            "FLOP count: no formula for %s; the count misses their work",
            ", ".join(f"{op} ({n} calls)" for op, n in counter.missed.items()),
        )
    frozen_total = sum(frozen.values())
    split = FlopSplit(frozen_total, forward - frozen_total, counter.total - forward)
    return split, {k: v for k, v in frozen.items() if v}


def synthetic_batch(
    batch_size: int,
    image_size: int,
    num_classes: int,
    text_tokens: int = 0,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict:
    """Random images, labels and (``text_tokens`` > 0) full-length token ids: the shapes of a
    training batch. FLOPs do not depend on the values; a seeded generator leaves the global
    random state alone."""
    gen = torch.Generator().manual_seed(seed)
    batch = {
        "image": torch.randn(batch_size, 3, image_size, image_size, generator=gen),
        "labels": (torch.rand(batch_size, num_classes, generator=gen) < 0.1).float(),
    }
    batch["labels"][torch.arange(batch_size), torch.arange(batch_size) % num_classes] = 1
    if text_tokens:
        ids = torch.randint(1000, 2000, (batch_size, text_tokens), generator=gen)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        batch["tokens"] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {
        k: {kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device)
        for k, v in batch.items()
    }


def count_step_flops(
    task: nn.Module,
    make_batch: Callable[[int], Mapping],
) -> StepFlops:
    """A task's micro-step FLOPs: forward + backward of ``task(make_batch(b))["loss"]`` at
    b = 1 and 2, in eval mode (no dropout draws, no BatchNorm statistics updated). Every rank
    of a run counts (the losses' gathers are collectives)."""
    started = time.perf_counter()
    was_training = task.training
    task.eval()
    try:
        counts, frozen_names = [], set()
        for b in (1, 2):
            batch = make_batch(b)
            split, frozen = count_flops(task, lambda batch=batch: task(batch)["loss"])
            counts.append(split)
            frozen_names |= set(frozen)
    finally:
        task.train(was_training)
    one, two = counts
    sample = two.combine(one, 1, -1)
    fixed = FlopSplit(*(max(0, v) for v in one.combine(sample, 1, -1).as_dict().values()))
    return StepFlops(sample, fixed, tuple(sorted(frozen_names)), time.perf_counter() - started)


def count_run_flops(cfg: TrainConfig, task: nn.Module, num_classes: int, device) -> StepFlops:
    """A run's micro-step FLOPs as it trains: its task on synthetic batches of the config's
    image size and text length, less the frozen forward when the run reads a token cache
    (the frozen token source's forward, DP-VLPA's tower or the cprfl task's CLIP tower or
    Q-Former tokens: it ran once, when the cache was built)."""
    from ltdist.train.token_cache import uses_token_cache

    text = cfg.model.max_text_tokens if getattr(task, "needs_text", False) else 0
    size = cfg.loader.image_size
    flops = count_step_flops(
        task, lambda b: synthetic_batch(b, size, num_classes, text, device, cfg.seed)
    )
    return flops.without_frozen_forward() if uses_token_cache(cfg) else flops
