"""Streaming PTQ: quantize a checkpoint one decoder block at a time, memory flat in depth.

``quantize_streaming(src, out, config)`` does what ``from_pretrained(src, quantization_config=
LCQATConfig(dataset=...))`` followed by ``save_pretrained(out)`` does, without ever holding the
float model:

1. **Check the source before any work.** ``config.json``; the safetensors files (one
   ``model.safetensors`` or the shards named by ``model.safetensors.index.json``): every shard
   present, every header readable, no file shorter than its header says, every tensor the
   model needs present.
2. **Skeleton.** The model is built from ``config.json`` with its parameters on the meta device
   (no memory); buffers computed at construction (rotary tables) are real.
3. **Calibration inputs.** Only the modules before the first block (the embeddings) are read;
   the first block's inputs are captured exactly as the in-memory PTQ does, then the embeddings
   are dropped again.
4. **One block at a time.** Its float tensors are read from the source files (bf16 / fp16 /
   fp32 as shipped; plain reads, no memory map, so the source pages do not stay in the
   process), cast to the compute dtype, and quantized by :func:`optimum_lcqat.quant_api.quantize_block`
   -- the very function the in-memory path calls, so the codes are the same by construction.
   The block's packed tensors are written to their own output shard (temp name, then rename),
   and the block goes back to the meta device.
5. **Activations between blocks** are stored in ``activation_dtype`` (bf16 by default) in two
   file-backed shared mappings in the output's work folder (the block input, and the scratch
   that receives the full-precision target and then the next block's input). The kernel keeps
   them in the page cache while memory allows and writes them to disk under pressure: that is
   the spill; it also makes them survive a crash. With ``activation_dtype=None`` they are kept
   in the compute dtype (then the result equals the in-memory path's for any dtype).
6. **Resume.** After each block, ``progress.json`` in the work folder
   (``<out's folder>/.<out name>.lcqat-partial``) records the blocks done and which mapping holds
   the next input. A run killed after block ``k`` (even by SIGKILL) restarts at block ``k + 1``
   when started again with the same source, config, data and seed (a fingerprint checks this;
   a mismatch starts over) and writes the identical checkpoint.
7. **The rest** (embeddings, final norm, lm_head: read from the source at the end), the shard
   index, ``config.json`` with the ``quantization_config``, the generation config.
8. **The end-to-end stage** (``ptq_e2e_steps`` > 0, init/e2e.py, as in the in-memory path) runs on
   the 2-bit model the blocks made, loaded from the work folder: its codes fixed, the scales,
   codebooks and norms tuned on the calibration samples' next-token loss, kept only if held-out
   calibration samples improve. It needs the whole *quantized* model (2-bit codes, the dense parts
   in float32 for the stage), never the float one: SmolLM2-135M ~0.6 GiB + the step, Llama-3.2-1B
   ~1.4 GiB + the step (memory_plan.streaming_ptq counts it). The tuned model is saved in place of
   the block-wise one; then the work folder is renamed to ``out``. A run killed during the stage
   starts over when run again.

Peak memory = one block in the compute dtype + its PTQ work (Hessians, float64 copies of the
largest layer) + the activations (resident share) + the embedding matrix (while capturing and
while writing the last shard); independent of depth.

Not streamed: in-flight ``AutoModelForCausalLM.from_pretrained(..., quantization_config=
LCQATConfig(dataset=...))`` -- transformers loads every float weight before the quantizer's
``_process_model_after_weight_loading`` hook runs, so that path keeps the whole model (use
``optimum-lcqat quantize`` or this function, then load the result). GPU: ``device="cuda"`` (``optimum-lcqat quantize --device cuda``)
moves only the current block and one batch of activations to the GPU for its forward passes
(Hessians, fine-tuning, propagation); the activations stay in host memory and the per-layer code
search (LDLQ, affine fit) runs on the CPU, as it does in the in-memory path.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from ._atomic import atomic_path, replace_dir, write_text_atomic
from ._heap import fixed_mmap_threshold, trim_heap
from .config import FORMAT_VERSION, LCQATConfig
from .init.ptq_blocks import BlockProgress, capture_block_inputs, find_blocks, peak_rss_bytes, ptq_samples
from .quant_api import default_modules_to_not_convert, quantize_block

logger = logging.getLogger(__name__)

__all__ = ["quantize_streaming", "SourceCheckpoint", "StreamingError", "work_dir_for"]

KILL_ENV = "OPTIMUM_LCQAT_STREAM_KILL_AFTER_BLOCK"  # test hook: SIGKILL the process after block k is saved
PROGRESS = "progress.json"

_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class StreamingError(ValueError):
    """The source cannot be streamed (missing files, truncated shards, an unsupported model)."""


# ---------------------------------------------------------------------------------------------
# Source checkpoint: headers checked up front, tensors read one at a time
# ---------------------------------------------------------------------------------------------
class SourceCheckpoint:
    """A full-precision safetensors checkpoint folder, checked before any work."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise StreamingError(f"{self.path}: no config.json; streaming PTQ needs a local model folder")
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise StreamingError(f"{index}: not a safetensors index ({exc}); re-download the checkpoint") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise StreamingError(
                    f"{self.path}: {len(missing)} shard(s) named by model.safetensors.index.json are missing: "
                    f"{', '.join(missing)}; re-download the checkpoint"
                )
        elif single.is_file():
            weight_map, files = None, ["model.safetensors"]
        else:
            bins = sorted(p.name for p in self.path.glob("*.bin"))
            hint = f" (it has {', '.join(bins)}: convert it to safetensors, or pass --in-memory)" if bins else ""
            raise StreamingError(f"{self.path}: no model.safetensors or model.safetensors.index.json{hint}")
        try:
            ckpt.read_layout([self.path / f for f in files])  # readable headers, no truncated file
        except ckpt.CheckpointError as exc:
            raise StreamingError(f"source checkpoint: {exc}") from None
        self.files = files
        self.entries: dict[str, tuple[Path, str, tuple, int, int]] = {}
        for f in files:
            p = self.path / f
            with open(p, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                a, b = info["data_offsets"]
                self.entries[key] = (p, info["dtype"], tuple(info["shape"]), 8 + n + a, 8 + n + b)
        if weight_map is not None:
            wrong = [k for k, f in weight_map.items() if k not in self.entries or self.entries[k][0].name != f]
            if wrong:
                raise StreamingError(
                    f"{index}: {len(wrong)} tensor(s) are not in the shard the index names (e.g. {wrong[0]!r}); "
                    "the checkpoint is inconsistent, re-download it"
                )

    def fingerprint(self) -> list:
        return sorted((k, e[1], list(e[2]), e[0].name, e[4] - e[3]) for k, e in self.entries.items())

    def read(self, key: str, dtype: torch.dtype | None = None, index: int | None = None) -> torch.Tensor:
        """Tensor ``key`` (``index``: only that row of its first axis, e.g. one expert of a fused
        [E, ...] tensor: its bytes alone are read), cast to ``dtype`` when floating."""
        path, st_dtype, shape, start, end = self.entries[key]
        if index is not None:
            per = (end - start) // shape[0]
            start, end, shape = start + index * per, start + (index + 1) * per, shape[1:]
        if st_dtype not in _ST_DTYPES:
            raise StreamingError(f"{path}: {key} has dtype {st_dtype}, which streaming PTQ does not read")
        buf = bytearray(end - start)
        with open(path, "rb") as fh:
            fh.seek(start)
            if fh.readinto(buf) != len(buf):
                raise StreamingError(f"{path} is truncated: {key} ends past the end of the file")
        t = torch.frombuffer(buf, dtype=_ST_DTYPES[st_dtype]) if buf else torch.empty(0, dtype=_ST_DTYPES[st_dtype])
        t = t.reshape(shape)
        return t if dtype is None or not t.is_floating_point() else t.to(dtype)


class ModelTensors:
    """The source's tensors by the model's names (:mod:`optimum_lcqat.source_keys`: transformers'
    renamings, and a mixture-of-experts layer's per-expert pieces concatenated for its
    ExpertLinears); ``read`` reads only the pieces of the one tensor asked for."""

    def __init__(self, source: SourceCheckpoint, model: nn.Module, expert_modules: list[str]):
        from .source_keys import model_tensor_sources

        self.source = source
        self.sources = model_tensor_sources(model, source.entries, expert_modules)

    def __contains__(self, key: str) -> bool:
        return key in self.sources

    def keys(self):
        return self.sources.keys()

    def shape(self, key: str) -> tuple:
        src = self.sources[key]
        shapes = [self.source.entries[fk][2][1:] if e is not None else self.source.entries[fk][2] for fk, e in src.parts]
        if src.transposed:
            shapes = [tuple(reversed(sh)) for sh in shapes]
        return (sum(sh[0] for sh in shapes), *shapes[0][1:])

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        src = self.sources[key]
        if len(src.parts) == 1 and src.parts[0][1] is None and not src.transposed:
            return self.source.read(src.parts[0][0], dtype)
        # the pieces are cast one by one, so that no second full-size copy is made of a fused source
        pieces = []
        for fk, e in src.parts:
            t = self.source.read(fk, index=e)
            pieces.append((t.T if src.transposed else t).to(dtype if dtype is not None else t.dtype).contiguous())
            del t
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


# ---------------------------------------------------------------------------------------------
# Skeleton
# ---------------------------------------------------------------------------------------------
def _skeleton(src: SourceCheckpoint, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src.path)
    if getattr(config, "quantization_config", None) is not None:
        raise StreamingError(f"{src.path} is already quantized ({config.quantization_config!r}); pass a full-precision model")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    mod_name, _, leaf = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if leaf in mod._parameters:
        old = mod._parameters[leaf]
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:  # pragma: no cover
        raise StreamingError(f"{key} names no parameter or buffer of the model")


def _to_meta(model: nn.Module, prefix: str) -> None:
    mod = model.get_submodule(prefix)
    mod.to("meta")


def _tied_targets(model) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied.keys())


@contextlib.contextmanager
def _config_without_int8_head(model, cfg: LCQATConfig):
    """packed_state_dict of a block's tensors: the lm_head_int8 option concerns the last shard."""
    if not cfg.lm_head_int8:
        yield
        return
    block_cfg = copy.copy(cfg)
    block_cfg.lm_head_int8 = False
    model.config.quantization_config = block_cfg
    try:
        yield
    finally:
        model.config.quantization_config = cfg


def _packed(model, state: dict[str, torch.Tensor], file_key) -> dict[str, torch.Tensor]:
    """The tensors ``state`` as the quantizer saves them (the same function, checkpoint.packed_state_dict),
    under the names ``file_key`` gives them in the files."""
    with ckpt.saving_gathered_state_dict(state):
        out = ckpt.packed_state_dict(model)
    return {file_key(k): v.detach().contiguous() for k, v in out.items()}


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> int:
    from safetensors.torch import save_file

    # tensors sharing storage (a tie kept by lm_head_int8) are written as separate copies
    seen, clean = set(), {}
    for k, v in tensors.items():
        ident = (v.device, v.data_ptr(), v.dtype, tuple(v.shape))
        clean[k] = (v.clone() if ident in seen else v).cpu()  # .cpu(): a block quantized on a GPU
        seen.add(ident)
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)
    return sum(v.numel() * v.element_size() for v in clean.values())


def _mapped(path: Path, shape: tuple, dtype: torch.dtype, create: bool) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if create or not path.exists() or path.stat().st_size != nbytes:
        with open(path, "wb") as f:
            f.truncate(nbytes)
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)


def work_dir_for(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.lcqat-partial"


def _fingerprint(src: SourceCheckpoint, cfg: LCQATConfig, samples: torch.Tensor, dtype, act_dtype) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({
        "source": src.fingerprint(), "config": cfg.to_dict(), "dtype": str(dtype), "act_dtype": str(act_dtype),
        "format_version": FORMAT_VERSION,
    }, sort_keys=True, default=str).encode())
    h.update(samples.contiguous().numpy().tobytes())
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, default=str))


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


# Large temporaries come from mmap and go back when freed, so the peak stays flat in depth (see _heap)
_MMAP_FROM = 8 << 20


@fixed_mmap_threshold(_MMAP_FROM)
def quantize_streaming(
    src: str | os.PathLike,
    out: str | os.PathLike,
    config: LCQATConfig,
    *,
    dtype: torch.dtype = torch.float32,
    activation_dtype: torch.dtype | None = torch.bfloat16,
    overwrite: bool = False,
    finalize=None,
    device: str | torch.device | None = None,
) -> dict:
    """Quantize the full-precision checkpoint folder ``src`` by the Hessian-aware PTQ, one decoder
    block at a time, into the lcqat checkpoint folder ``out`` (see the module docstring).

    ``dtype``: the compute dtype (what ``from_pretrained(..., dtype=)`` would load; also the
    dtype the dense tensors are saved in unless ``config.dense_dtype``). ``activation_dtype``:
    how the calibration activations between blocks are stored (None: ``dtype``).
    ``finalize(tmp_dir)``: called before the folder is renamed into place (tokenizer, card).
    ``device``: where each block computes (its Hessians, fine-tuning and propagation), e.g.
    ``"cuda"``; only the current block and one batch of activations go there, the activations
    stay in host memory, and the per-layer code search runs on the CPU either way. Default CPU.
    Returns a report dict (seconds, peak RSS, per-block seconds, errors, calibration tokens per layer)."""
    t0 = time.perf_counter()
    cfg = config
    if not cfg.uses_calibration:
        raise ValueError("quantize_streaming is the PTQ path: the config needs calibration data (dataset=...)")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StreamingError(f"streaming PTQ: device {device} asked for, but torch sees no CUDA device; leave it unset for the CPU")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output or pass --overwrite")
    source = SourceCheckpoint(src)  # every check before any work
    model = _skeleton(source, dtype)
    from .convert import NoConvertibleLayerError, convertible_linears, unfuse_experts
    from .nn.expert_linears import fused_experts_layout_problem
    from .source_keys import file_key_renamer

    skip = default_modules_to_not_convert(model, cfg)
    expert_modules = unfuse_experts(model, skip)  # per-expert linears; their pieces are read per expert below
    left = [(n, m, why) for n, m in model.named_modules() if (why := fused_experts_layout_problem(m)) != ""]
    if left:
        name, module, why = left[0]
        raise StreamingError(f"streaming PTQ cannot read the fused experts of {name} ({type(module).__name__}: "
                             f"{why or 'kept dense'}); quantize it in memory (--in-memory)")
    tensors_of = ModelTensors(source, model, expert_modules)
    file_key = file_key_renamer(model)  # the output's keys are those transformers' save_pretrained writes
    names = convertible_linears(model, cfg, skip)
    if not names:
        raise NoConvertibleLayerError("lcqat: this model has no linear layer to convert")
    blocks_name, blocks = find_blocks(model, names)
    nblocks = len(blocks)
    outside = [n for n in names if not n.startswith(blocks_name + ".")]
    if outside:
        raise StreamingError(
            f"streaming PTQ quantizes linears inside the decoder blocks only; {outside} are outside: use --in-memory"
        )
    expected = set(model.state_dict().keys())
    tied = _tied_targets(model)
    missing = sorted(k for k in expected - set(tensors_of.keys()) if k not in tied)
    if missing:
        raise StreamingError(
            f"{source.path}: {len(missing)} tensor(s) of this {type(model).__name__} are not in the checkpoint "
            f"(e.g. {missing[:3]}); the checkpoint is incomplete or is for another architecture"
        )
    block_keys = [[k for k in expected if k.startswith(f"{blocks_name}.{i}.")] for i in range(nblocks)]
    rest_keys = sorted(k for k in expected if not k.startswith(f"{blocks_name}."))
    head_name = None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for n, m in model.named_modules():
        if m is head:
            head_name = n
    model.config.quantization_config = cfg  # what packed_state_dict / dense storage read

    # --- calibration inputs (embeddings only) ---
    samples = ptq_samples(model, cfg)
    bs = cfg.ptq_batch_size
    capture_keys = [k for k in rest_keys if not (head_name and k.startswith(head_name + ".")) and k in tensors_of]
    for k in capture_keys:
        _set_tensor(model, k, tensors_of.read(k, dtype))
    # the embeddings run on the CPU; the block kwargs (rotary tables, masks) go to the blocks' device
    from accelerate.utils import send_to_device

    X0, kwargs_per_batch = capture_block_inputs(model, blocks[0], samples, bs, torch.device("cpu"))
    kwargs_per_batch = [send_to_device(kw, device) for kw in kwargs_per_batch]
    for k in capture_keys:  # dropped until the last shard is written
        _set_tensor(model, k, torch.empty(tensors_of.shape(k), dtype=dtype, device="meta"))
    gc.collect()
    act_dtype = activation_dtype or dtype
    fp = _fingerprint(source, cfg, samples, dtype, act_dtype)

    # --- work folder, resume ---
    work = work_dir_for(out)
    prog_path = work / PROGRESS
    progress = None
    if prog_path.is_file():
        try:
            progress = json.loads(prog_path.read_text())
        except json.JSONDecodeError:
            progress = None
        if progress is None or progress.get("fingerprint") != fp:
            logger.warning("lcqat streaming: %s holds an unfinished run of another source/config/data; starting over", work)
            progress = None
    if progress is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        progress = {"fingerprint": fp, "blocks_done": 0, "x_file": "acts_0.bin", "weight_map": {},
                    "total_size": 0, "block_seconds": {}, "errors": {}, "block_mse": {}}
    start = int(progress["blocks_done"])
    shape = tuple(X0.shape)
    x_file = progress["x_file"]
    y_file = "acts_1.bin" if x_file == "acts_0.bin" else "acts_0.bin"
    X = _mapped(work / x_file, shape, act_dtype, create=start == 0)
    Y = _mapped(work / y_file, shape, act_dtype, create=True)
    if start == 0:
        X.copy_(X0)
    else:
        logger.info("lcqat streaming: resuming %s after block %d of %d", work, start, nblocks)
    del X0
    # The rest (embeddings, final norm, lm_head) is written at the end, a large tensor to a shard
    # of its own so that only one is in memory at a time. A tied lm_head is saved only as int8.
    tied_src = getattr(model, "all_tied_weights_keys", None) or {}
    rest_src = {k: k for k in rest_keys if k in tensors_of and k not in tied_src}
    if cfg.lm_head_int8:
        rest_src.update({t: s for t, s in tied_src.items() if t in expected and s in tensors_of})
    itemsize = torch.empty(0, dtype=dtype).element_size()
    big = [[k] for k in rest_keys if k in rest_src and math.prod(tensors_of.shape(rest_src[k])) * itemsize > 2**28]
    small = [k for k in rest_keys if k in rest_src and [k] not in big]
    rest_groups = ([small] if small else []) + big
    nshards = nblocks + len(rest_groups)
    shard_name = "model-{:05d}-of-{:05d}.safetensors".format
    meta = {ckpt.METADATA_KEY: str(cfg.format_version), "format": "pt"}
    kill_after = os.environ.get(KILL_ENV)
    logger.info(
        "lcqat streaming: %s -> %s: %d blocks, %d calibration samples x %d tokens, compute %s, activations %s "
        "(%.1f MiB each, file-backed in %s)", source.path, out, nblocks, shape[0], samples.shape[1],
        str(dtype).replace("torch.", ""), str(act_dtype).replace("torch.", ""),
        X.numel() * X.element_size() / 2**20, work,
    )
    bar = BlockProgress(nblocks, start, what="lcqat streaming")
    for bidx in range(start, nblocks):
        tb = time.perf_counter()
        prefix = f"{blocks_name}.{bidx}"
        for k in block_keys[bidx]:
            _set_tensor(model, k, tensors_of.read(k, dtype))
        block = model.get_submodule(prefix)
        block.to(device)  # its parameters and the buffers made at construction
        left = [n for n, b in block.named_buffers() if b.is_meta]
        if left:
            raise StreamingError(f"streaming PTQ: {prefix} has buffers not in the checkpoint ({left}); use --in-memory")
        lnames = [n for n in names if n.startswith(prefix + ".")]
        errs, mse, layer_tokens = quantize_block(model, blocks_name, bidx, lnames, X, Y, kwargs_per_batch, cfg,
                              device=device, dtype=dtype, out=Y)
        X, Y = Y, X  # Y now holds the next block's input
        x_file, y_file = y_file, x_file
        with _config_without_int8_head(model, cfg):
            tensors = _packed(model, block.state_dict(prefix=prefix + "."), file_key)
        fname = shard_name(bidx + 1, nshards)
        progress["total_size"] += _write_shard(work / fname, tensors, meta)
        progress["weight_map"].update({k: fname for k in tensors})
        _to_meta(model, prefix)
        del block, tensors
        gc.collect()  # the PTQ step leaves reference cycles that would keep the block's tensors alive
        # glibc keeps what the block freed in its arenas; the next block's slightly different sizes
        # do not always fit the holes, so without a trim the peak crept up a few MB a block
        trim_heap()
        secs = time.perf_counter() - tb
        progress["blocks_done"] = bidx + 1
        progress["x_file"] = x_file
        progress["block_seconds"][str(bidx)] = secs
        progress["errors"].update(errs)
        progress.setdefault("tokens", {}).update(layer_tokens)  # calibration tokens per layer (experts: routed)
        progress["block_mse"][str(bidx)] = list(mse)
        _write_json(prog_path, progress)
        bar.block_done(bidx, secs)
        if kill_after is not None and int(kill_after) == bidx:
            os.kill(os.getpid(), signal.SIGKILL)
    del X, Y

    # --- the rest: embeddings, final norm, lm_head ---
    for gi, group in enumerate(rest_groups):
        head_key = f"{head_name}.weight" if head_name else None
        with contextlib.nullcontext() if head_key in group else _config_without_int8_head(model, cfg):
            tensors = _packed(model, {k: tensors_of.read(rest_src[k], dtype) for k in group}, file_key)
        fname = shard_name(nblocks + gi + 1, nshards)
        progress["total_size"] += _write_shard(work / fname, tensors, meta)
        progress["weight_map"].update({k: fname for k in tensors})
        del tensors
        gc.collect()
    _write_json(work / "model.safetensors.index.json",
                {"metadata": {"total_size": progress["total_size"]}, "weight_map": dict(sorted(progress["weight_map"].items()))})
    model.config.quantization_config = cfg
    model.config.save_pretrained(work)
    gen = source.path / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, work / "generation_config.json")
    tok = cfg.tokenizer
    if tok is not None and hasattr(tok, "save_pretrained"):
        tok.save_pretrained(work)
    if finalize is not None:
        finalize(work)
    for f in ("acts_0.bin", "acts_1.bin", PROGRESS):
        with contextlib.suppress(FileNotFoundError):
            (work / f).unlink()
    e2e = None
    if cfg.ptq_e2e_steps > 0:
        del model  # the skeleton (meta tensors, the rotary tables)
        gc.collect()
        e2e = _end_to_end_stage(work, samples, cfg, dtype, device)
    os.chmod(work, 0o755)
    replace_dir(work, out)
    secs = time.perf_counter() - t0
    peak = peak_rss_bytes()
    logger.info("lcqat streaming: done in %.1fs (%d blocks); peak RSS (process high-water mark) %.2f GiB",
                secs, nblocks, peak / 2**30)
    return {
        "seconds": secs, "peak_rss_bytes": peak, "blocks": nblocks, "resumed_at": start,
        "block_seconds": {int(k): v for k, v in progress["block_seconds"].items()},
        "errors": progress["errors"], "block_mse": progress["block_mse"], "tokens": progress.get("tokens", {}), "e2e": e2e,
    }


def _end_to_end_stage(work: Path, samples: torch.Tensor, cfg: LCQATConfig, dtype: torch.dtype, device) -> dict:
    """The PTQ's end-to-end stage on the 2-bit model in ``work`` (see the module docstring, step 8):
    loaded, tuned by init/e2e.py's finetune_model_e2e, saved back in place of the block-wise
    weights (through a sibling folder, so ``work`` always holds one whole checkpoint)."""
    from transformers import AutoModelForCausalLM

    from .init.e2e import finetune_model_e2e
    from .sdpa_registry import keep_attention_outputs

    keep_attention_outputs()  # its checkpointed blocks keep their attention outputs
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(work, dtype=dtype)
    if device.type != "cpu":
        model.to(device)
    before, after = finetune_model_e2e(model, samples, cfg)
    model.to("cpu")
    staged = work.with_name(work.name + ".e2e")
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged)
    del model
    gc.collect()
    weights = {"config.json", "model.safetensors.index.json"}
    for f in work.iterdir():  # what finalize, the tokenizer and the source added stays
        if f.name not in weights and not f.name.endswith(".safetensors") and not (staged / f.name).exists():
            shutil.move(str(f), str(staged / f.name))
    shutil.rmtree(work)
    staged.rename(work)
    secs = time.perf_counter() - t0
    logger.info("lcqat streaming: end-to-end stage on the 2-bit model in %.1fs: held-out calibration loss %.4f -> %.4f",
                secs, before, after)
    return {"loss_before": before, "loss_after": after, "seconds": secs}
