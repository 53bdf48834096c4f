"""`quantize(model, config)`: the one public entry that turns a model's linears into LC layers.

In the spirit of torchao's ``quantize_``: find the convertible ``nn.Linear`` modules
(:func:`optimum_lcqat.convert.convertible_linears`, honouring ``modules_to_not_convert``),
initialise each data-free or by the Hessian-aware PTQ (with calibration data in the config),
and swap the LC layers in. Works on a transformers model and on any plain ``nn.Module`` (PTQ
needs a causal LM: it runs the model on calibration token ids).

Every caller goes through here: the CLI and the demo call :func:`quantize` on the loaded float
model; the transformers quantizer (``from_pretrained(..., quantization_config=LCQATConfig(...))``)
calls it after the float weights load;
the streaming PTQ, which holds one decoder block at a time, calls its per-block piece
:func:`quantize_block`. The initialisers (:mod:`optimum_lcqat.init`) return
:class:`~optimum_lcqat.tensor.lc_weight.LCWeight` s and change no model; this module is the one
place that replaces modules of a model by LC layers (:func:`lc_layer_from_weight` builds them).
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn
from tqdm.auto import tqdm

from ._heap import retained_heap
from .config import LCQATConfig
from .convert import NoConvertibleLayerError, convertible_linears, unfuse_experts
from .init.common import LayerSpec, rotation_plans
from .init.data_free import init_data_free
from .init.ptq import quantize_weight_ptq
from .init.ptq_blocks import (
    BlockProgress,
    PTQReport,
    block_forward,
    capture_block_inputs,
    collect_hessians,
    find_blocks,
    finetune_block,
    peak_rss_bytes,
    ptq_samples,
    tunable_layer,
)
from .nn.expert_linears import ExpertLinears
from .nn.lc_linear import LCLinear
from .tensor.lc_weight import LCWeight

logger = logging.getLogger(__name__)

__all__ = ["quantize", "quantize_block", "quantize_model_ptq", "quantize_linears_data_free", "lc_layer_from_weight",
           "default_modules_to_not_convert"]


def default_modules_to_not_convert(model: nn.Module, config: LCQATConfig, keep_in_fp32_modules=None) -> list[str]:
    """What stays dense: the config's ``modules_to_not_convert`` plus, for a transformers model,
    transformers' default skips (the output head, tied modules) and ``keep_in_fp32_modules``."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return list(config.modules_to_not_convert or []) + list(keep_in_fp32_modules or [])
    from transformers.quantizers.base import HfQuantizer

    return HfQuantizer.get_modules_to_not_convert(
        model, config.modules_to_not_convert, keep_in_fp32_modules, add_default_skips=True
    )


def quantize(model: nn.Module, config: LCQATConfig | None = None, *, modules_to_not_convert: list[str] | None = None) -> nn.Module:
    """Replace the convertible linears of ``model`` by LC layers, in place; returns ``model``.

    ``config`` (default ``LCQATConfig()``): with calibration data (``dataset``) the Hessian-aware
    PTQ (its report in ``model._lcqat_ptq_report``), else the data-free initialisation.
    ``modules_to_not_convert``: the names (or patterns, as transformers matches them) kept dense;
    default :func:`default_modules_to_not_convert`. Linears whose ``in_features`` is not a
    multiple of 4 stay dense; a model left with none to convert raises NoConvertibleLayerError.
    """
    cfg = config if config is not None else LCQATConfig()
    skip = default_modules_to_not_convert(model, cfg) if modules_to_not_convert is None else list(modules_to_not_convert)
    unfuse_experts(model, skip)  # fused MoE experts: one linear per expert and projection, converted below
    names = convertible_linears(model, cfg, skip)
    if not names:
        raise NoConvertibleLayerError(
            "lcqat: this model has no linear layer to convert (all are skipped by "
            f"modules_to_not_convert={skip} or have in_features not a multiple of 4)."
        )
    if cfg.uses_calibration:
        quantize_model_ptq(model, names, cfg)
    else:
        quantize_linears_data_free(model, names, cfg)
    _mark_transformers_model(model, cfg, skip)
    return model


def _mark_transformers_model(model: nn.Module, cfg: LCQATConfig, skip: list[str]) -> None:
    """A transformers model quantized by a direct call saves, pushes and reloads as an lcqat
    checkpoint, as one loaded with ``quantization_config`` does: it gets the lcqat quantizer and
    the config transformers' saving reads. (From ``from_pretrained`` the model has its quantizer
    already: nothing to do.) The quantizer class comes from transformers' registry, where
    ``import optimum_lcqat`` put it: this layer does not import the integration above it."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or getattr(model, "hf_quantizer", None) is not None:
        return
    from transformers.quantizers.auto import AutoHfQuantizer
    from transformers.quantizers.base import _assign_is_quantized

    quantizer = AutoHfQuantizer.from_config(cfg, pre_quantized=False)
    quantizer.modules_to_not_convert = list(skip)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = cfg.quant_method
    model.config.quantization_config = cfg
    _assign_is_quantized(model)


def lc_layer_from_weight(linear, weight: LCWeight, config, *, placement: tuple | None = None) -> LCLinear:
    """The LC layer replacing ``linear``: on its device and dtype, its bias, the parameters
    snapped to their 16-bit storage values (so the layer computes what its saved copy will).
    ``placement``: (bias, device, dtype) of a linear whose weight is gone, in place of ``linear``."""
    bias, device, dtype = placement if placement is not None else (linear.bias, linear.weight.device, linear.weight.dtype)
    return LCLinear.from_weight(
        weight.snapped(), bias, codebook=config.codebook, hadamard_block_size=config.hadamard_block_size,
        device=device, dtype=dtype,
    )


def layer_spec(config: LCQATConfig, plan_in, plan_out, name: str) -> LayerSpec:
    """What layer ``name`` is quantized as under ``config`` (its rotations already resolved)."""
    return LayerSpec(config.vector_dim, config.codebook, plan_in, plan_out, config.seed, name, config.init_iters)


def quantize_linears_data_free(model: nn.Module, names: list[str], config: LCQATConfig) -> dict[str, float]:
    """Replace each named linear of ``model`` by an LC layer initialised without data (the
    config's block size, codebook, seed, init_iters); return the per-layer errors."""
    errors = {}
    for name in tqdm(names, desc="lcqat: data-free init", leave=False):
        linear = model.get_submodule(name)
        plan_in, plan_out = rotation_plans(linear, config)
        result = init_data_free(linear.weight.detach(), layer_spec(config, plan_in, plan_out, name))
        model.set_submodule(name, lc_layer_from_weight(linear, result.weight, config))
        errors[name] = result.error
        logger.info("lcqat: %s %dx%d rotated-domain rel. error %.4f", name, linear.out_features, linear.in_features, result.error)
    return errors


# MoE blocks: each expert has two Hessians (its input, its intermediate) in float64; all of a
# Qwen3-30B-A3B block's 128 experts at once would be 4.6 GiB. The experts are taken in passes,
# each a forward of the full-precision block over the calibration inputs that collects the Hessians
# of the dense linears (first pass) or of this many bytes' worth of experts, then quantizes them.
# The passes see the same inputs, and each layer's quantization depends only on its own Hessian
# and seed: the codes are those of one pass.
EXPERT_HESSIAN_BYTES_PER_PASS = 1 << 30

# The layer PTQ of a block: at most this many layer chains at once (one per thread torch may use),
# and only chains whose layers all have at most PARALLEL_PTQ_MAX_WEIGHTS weights (a layer's PTQ holds
# ~4 float64 copies of its weight: 128 MiB at this size); wider layers run alone (memory_plan).
PTQ_WORKERS = 4
PARALLEL_PTQ_MAX_WEIGHTS = 4 << 20


def expert_linear_names(model: nn.Module, names: list[str]) -> set[str]:
    """Those of ``names`` that are an ExpertLinears' per-expert projections (``<experts>.gate_up.<e>``)."""
    out = set()
    for n in names:
        parts = n.rsplit(".", 2)
        if len(parts) == 3 and parts[1] in ("gate_up", "down") and isinstance(model.get_submodule(parts[0]), ExpertLinears):
            out.add(n)
    return out


def hessian_passes(model: nn.Module, lnames: list[str], linears: dict) -> list[list[str]]:
    """``lnames`` split into the passes described above (one pass when the block has no experts)."""
    experts = {n: linears[n].in_features ** 2 * 8 for n in expert_linear_names(model, lnames)}
    passes, current, size = [], [n for n in lnames if n not in experts], 0
    for n, nbytes in experts.items():
        if size and size + nbytes > EXPERT_HESSIAN_BYTES_PER_PASS:
            passes.append(current)
            current, size = [], 0
        current.append(n)
        size += nbytes
    passes.append(current)
    return passes


def _quantize_pass(model, bidx, part, linears, groups, H, tokens, cfg, params, errors, workers: int = 1) -> None:
    """The PTQ of the linears ``part`` of a block from their Hessians ``H`` (collect_hessians),
    into ``params`` / ``errors``, ``workers`` layer chains at a time; ``H`` is emptied as it goes."""
    # MoE experts the router sent fewer tokens than they have inputs (none, or a few): their Hessian
    # is rank-deficient, and a fit to it would weigh a few directions and leave the rest to the
    # damping; they get the data-free init (an identity Hessian), said here and in the report.
    # (A dense linear sees every calibration token: its count is the config's choice.)
    experts = expert_linear_names(model, part)
    unreached = [n for n in part if n not in groups or (n in experts and tokens[n] < linears[n].in_features)]
    if unreached:
        logger.warning("lcqat PTQ: block %d: %d linear(s) received fewer calibration tokens than their inputs "
                       "(experts the router rarely or never picked) and use the data-free init: %s", bidx,
                       len(unreached), ", ".join(f"{n} ({tokens.get(n, 0)})" for n in unreached[:4])
                       + (" ..." if len(unreached) > 4 else ""))
        for n in unreached:
            plan_in, plan_out = rotation_plans(linears[n], cfg)
            result = init_data_free(linears[n].weight.detach(), layer_spec(cfg, plan_in, plan_out, n))
            params[n], errors[n] = result.weight, result.error
            tokens.setdefault(n, 0)
    # A group's Hessian goes to its last linear, which transforms it in place, so a group's linears
    # run one after another, as a chain. Chains are independent (each layer from its own Hessian and
    # seed, single-threaded ops): up to PTQ_WORKERS of them run at once in threads (torch's ops
    # release the GIL), with the same results as one after another (tested). Chains holding a layer
    # above PARALLEL_PTQ_MAX_WEIGHTS run first and alone, widest inputs first: their Hessians
    # (1.6 GB in float64 for a 14336-wide down_proj) and per-weight temporaries are then gone
    # before the other layers' work, and never beside another layer's.
    by_width = sorted((n for n in part if n not in unreached), key=lambda n: -linears[n].weight.shape[1])
    chains: dict = {}
    for n in by_width:
        chains.setdefault(groups[n], []).append(n)

    def run_chain(chain: list[str]) -> None:
        # a new thread starts at OpenMP's default team size: one thread here too, as the caller runs
        torch.set_num_threads(1)
        for n in chain:
            lin = linears[n]
            plan_in, plan_out = rotation_plans(lin, cfg)
            g = groups[n]
            h = [H.pop(g).cpu()] if n == chain[-1] else H[g].cpu()
            result = quantize_weight_ptq(lin.weight.detach().cpu(), h, layer_spec(cfg, plan_in, plan_out, n),
                                         refine_passes=cfg.ptq_refine_passes, damp=cfg.ptq_damp)
            params[n], errors[n] = result.weight, result.error
            progress.update(1)

    big, small = [], []
    for chain in chains.values():
        wide = max(linears[n].weight.numel() for n in chain) > PARALLEL_PTQ_MAX_WEIGHTS
        (big if wide else small).append(chain)
    small.sort(key=lambda c: sum(linears[n].weight.numel() for n in c), reverse=True)  # longest first
    with tqdm(total=len(by_width), desc="lcqat PTQ: quantize", leave=False) as progress:
        for chain in big:
            run_chain(chain)
        if workers <= 1 or len(small) <= 1:
            for chain in small:
                run_chain(chain)
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(small)), thread_name_prefix="lcqat-ptq") as pool:
                for f in [pool.submit(run_chain, c) for c in small]:
                    f.result()


@torch.no_grad()
def quantize_block(
    model: nn.Module, blocks_name: str, bidx: int, lnames: list[str], X: torch.Tensor, Y: torch.Tensor,
    kwargs_per_batch: list, cfg: LCQATConfig, *, device, dtype, out: torch.Tensor | None = None,
) -> tuple[dict[str, float], tuple[float, float], dict[str, int]]:
    """Quantize decoder block ``bidx`` of ``model`` (at ``<blocks_name>.<bidx>``) in place: its
    linears ``lnames`` (full names) become LC layers, and ``X`` (the block's input) is propagated
    through the quantized block into ``out`` (default: ``X`` itself, batch by batch).

    The per-block piece of :func:`quantize` with calibration data, run by both the in-memory driver (:func:`quantize_model_ptq`) and the
    streaming one (``optimum_lcqat.streaming``): the same calls on the same inputs give the same
    codes. ``X``/``Y`` [N, T, hidden] may be stored in another dtype than the block computes in
    (``dtype``); ``Y`` is scratch (it receives the full-precision block output, the fine-tuning
    target). Returns the per-layer proxy errors, the block output MSE (before, after fine-tune) and
    the calibration tokens each layer's Hessian came from (0: none reached it, data-free init).
    """
    block = model.get_submodule(f"{blocks_name}.{bidx}")
    bs = cfg.ptq_batch_size
    cast = None if X.dtype == dtype else dtype
    out = X if out is None else out
    if not lnames:
        block_forward(block, X, kwargs_per_batch, bs, out, "lcqat PTQ: propagate", dtype=cast)
        return {}, (float("nan"), float("nan")), {}
    tb = time.perf_counter()
    errors: dict[str, float] = {}
    linears = {n: model.get_submodule(n) for n in lnames}
    params: dict[str, LCWeight] = {}
    tokens: dict[str, int] = {}
    # The PTQ step and the one-sample fine-tuning steps are many small ops: one thread avoids
    # OpenMP synchronisation costs that dominate them (~10x on a busy 2-core machine); the block
    # forwards that collect the Hessians run with all threads.
    threads = torch.get_num_threads()
    try:
        passes = hessian_passes(model, lnames, linears)
        for i, part in enumerate(passes):
            if len(passes) > 1:
                logger.info("lcqat PTQ: block %d: Hessian pass %d/%d (%d linears); peak RSS %.2f GiB", bidx, i + 1,
                            len(passes), len(part), peak_rss_bytes() / 2**30)
            torch.set_num_threads(threads)
            groups, H, part_tokens = collect_hessians(block, {n: linears[n] for n in part}, X, kwargs_per_batch, bs, Y,
                                                      dtype=cast)
            tokens.update(part_tokens)
            torch.set_num_threads(1)
            _quantize_pass(model, bidx, part, linears, groups, H, tokens, cfg, params, errors,
                           workers=min(threads, PTQ_WORKERS))
            del H
        errors = {n: errors[n] for n in lnames}
        tokens = {n: tokens[n] for n in lnames}
        tq = time.perf_counter()
        # Block fine-tuning with differentiable stand-ins (float32), then the real LC layers. The
        # float linears are dropped first: the fine-tune's target (Y) and the LC weights are made,
        # and a MoE block's expert weights are most of its memory (2.4 GB in fp32 for Qwen3-30B-A3B).
        placement = {n: (linears[n].bias, linears[n].weight.device, linears[n].weight.dtype) for n in lnames}
        tunables = {}
        for n in lnames:
            t = tunable_layer(params[n], placement[n][0], cfg.codebook == "affine", device)
            tunables[n] = t
            model.set_submodule(n, t)
        del linears
        if cfg.ptq_finetune_steps > 0:
            if dtype != torch.float32:
                block.float()
            with torch.enable_grad():
                mse = finetune_block(
                    block, tunables, X.float() if X.dtype != torch.float32 else X,
                    Y.float() if Y.dtype != torch.float32 else Y, kwargs_per_batch, bs, cfg,
                    seed=cfg.seed * 1_000_003 + bidx,
                )
            if dtype != torch.float32:
                block.to(dtype)
        else:
            mse = (float("nan"), float("nan"))
        for n in lnames:
            model.set_submodule(n, lc_layer_from_weight(None, tunables[n].lc_weight, cfg, placement=placement[n]))
        del tunables
    finally:
        torch.set_num_threads(threads)
    tf = time.perf_counter()
    block_forward(block, X, kwargs_per_batch, bs, out, "lcqat PTQ: propagate", dtype=cast)
    for n in lnames:
        logger.info("lcqat PTQ: %s proxy rel. error %.4f", n, errors[n])
    logger.info(
        "lcqat PTQ: block %d: layer errors %s; block output rel. MSE %.4g -> %.4g after fine-tune; "
        "%.1fs (quantize %.1fs, fine-tune %.1fs); peak RSS %.2f GiB",
        bidx, ", ".join(f"{n.rsplit('.', 1)[-1]}={errors[n]:.3f}" for n in lnames), mse[0], mse[1],
        time.perf_counter() - tb, tq - tb, tf - tq, peak_rss_bytes() / 2**30,
    )
    return errors, mse, tokens



def quantize_model_ptq(model: nn.Module, names: list[str], config: LCQATConfig) -> PTQReport:
    """Replace the named linears of ``model`` by LC layers initialised by the Hessian-aware PTQ
    (the whole float model in memory; ``optimum_lcqat.streaming`` reads one block at a time)."""
    # on the CPU every block allocates and frees the same large buffers: the heap is retained while
    # PTQ runs and given back when it ends (see _heap)
    on_cpu = next(model.parameters()).device.type == "cpu"
    with retained_heap() if on_cpu else contextlib.nullcontext():
        return _quantize_model_ptq(model, names, config)


@torch.no_grad()
def _quantize_model_ptq(model: nn.Module, names: list[str], config: LCQATConfig) -> PTQReport:
    t0 = time.perf_counter()
    cfg = config
    samples = ptq_samples(model, cfg)
    logger.info(
        "lcqat PTQ: %d calibration samples x %d tokens, codebook=%s, %d layers",
        samples.shape[0], samples.shape[1], cfg.codebook, len(names),
    )
    blocks_name, blocks = find_blocks(model, names)
    inside = [n for n in names if n.startswith(blocks_name + ".")]
    outside = [n for n in names if n not in set(inside)]
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    was_training = model.training
    model.eval()
    bs = cfg.ptq_batch_size
    X, kwargs_per_batch = capture_block_inputs(model, blocks[0], samples, bs, device)
    X = X.to(dtype)
    Y = torch.empty_like(X)
    errors: dict[str, float] = {}
    tokens: dict[str, int] = {}
    block_mse: dict[int, tuple[float, float]] = {}
    progress = BlockProgress(len(blocks))
    for bidx in tqdm(range(len(blocks)), desc="lcqat PTQ: blocks"):
        tb = time.perf_counter()
        prefix = f"{blocks_name}.{bidx}."
        lnames = [n for n in inside if n.startswith(prefix)]
        errs, mse, toks = quantize_block(model, blocks_name, bidx, lnames, X, Y, kwargs_per_batch, cfg, device=device, dtype=dtype)
        errors.update(errs)
        tokens.update(toks)
        if lnames:
            block_mse[bidx] = mse
        progress.block_done(bidx, time.perf_counter() - tb)
    del X, Y
    if outside:
        logger.warning("lcqat PTQ: %d linear(s) outside the decoder blocks use the data-free init: %s", len(outside), outside)
        errors.update(quantize_linears_data_free(model, outside, cfg))
    e2e = None
    if cfg.ptq_e2e_steps > 0:
        from .init.e2e import finetune_model_e2e
        from .sdpa_registry import keep_attention_outputs

        keep_attention_outputs()  # its checkpointed blocks keep their attention outputs
        e2e = finetune_model_e2e(model, samples, cfg)
    if was_training:
        model.train()
    secs = time.perf_counter() - t0
    peak = peak_rss_bytes()
    if device.type == "cuda":  # pragma: no cover
        logger.info("lcqat PTQ: peak CUDA memory %.2f GiB", torch.cuda.max_memory_allocated(device) / 2**30)
    logger.info("lcqat PTQ: done in %.1fs; peak RSS (process high-water mark) %.2f GiB", secs, peak / 2**30)
    report = PTQReport(errors, block_mse, secs, peak, e2e, tokens)
    model._lcqat_ptq_report = report
    return report
