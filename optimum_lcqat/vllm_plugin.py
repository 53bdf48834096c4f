"""vLLM serving: quant_method ``lcqat`` as a vLLM quantization plugin (a thin adapter).

vLLM loads this module through the entry point ``lcqat = optimum_lcqat.vllm_plugin:register``
in group ``vllm.general_plugins`` (setup.py), in every process it starts (the API process, the
engine core and each worker: workers are spawned, so registration cannot come from the user's
script). After that, ``vllm serve DIR`` and ``LLM(model=DIR)`` serve an lcqat checkpoint with no
flag: vLLM reads ``quantization_config.quant_method`` from config.json and asks
:class:`LCQATvLLMConfig` for each layer's method.

What this adapter does, and nothing more (the maths is :class:`~optimum_lcqat.tensor.LCWeight`):

* **Which layers are LC.** The checkpoint's own tensor names decide (``<name>.codes``): every
  linear whose checkpoint modules are all LC gets :class:`LCQATLinearMethod`, all dense stays
  vLLM's dense method. vLLM fuses q/k/v and gate/up into one layer; a fused layer whose parts
  are LC and dense at once, or an LC layer of a kind vLLM does not build from linears (a fused
  MoE), gets a ValueError that names it.
* **Loading.** vLLM hands each checkpoint tensor to the parameter's ``weight_loader`` with the
  fused part it belongs to (``'q'``, ``'k'``, ``'v'``, ``0``, ``1``; none for unfused layers).
  The loader keeps each part's tensors as they are in the file; after loading, each part becomes
  an ``LCWeight`` and takes its tensor-parallel shard through :meth:`LCWeight.shard` (output rows
  for column-parallel layers, input columns for row-parallel ones; a rotation that cannot be
  split raises, naming the fix).
* **Compute.** ``apply`` is ``LCWeight.apply`` per part (native CPU/CUDA kernels or the
  reference), the parts' outputs concatenated in vLLM's fused order.
* **MoE experts.** vLLM builds a model's routed experts as one ``RoutedExperts`` layer
  (``<prefix>.experts``) with stacked ``w13_*`` / ``w2_*`` parameters that its loader fills from
  per-expert checkpoint keys. Our checkpoints store each expert projection as its own LC layer
  (``experts.gate_up.<e>.*`` [2I, H], ``experts.down.<e>.*``): :meth:`LCQATvLLMConfig.get_checkpoint_weight_mapper`
  renames them to the model's per-expert names (``experts.<e>.gate_proj.*``, Mixtral's ``w1``...)
  so vLLM's loader hands each to :class:`LCQATFusedMoEMethod`'s loader with its expert id;
  after loading each expert is an ``LCWeight`` per projection (tensor-parallel shards as for
  linears). vLLM routes (top-k, renormalised); ``apply`` runs each selected expert's two LC
  layers and the gate, as ``ExpertLinears.forward`` does in transformers, inside one opaque
  custom op (``lcqat_vllm::moe``, with a fake) so that vLLM's compiled mode traces around it.
* **int8 head.** A head saved with ``lm_head_int8`` is served by :class:`LCQATInt8HeadMethod`
  from its ``weight_int8`` and ``scale``, vocabulary-sharded. For a tied model vLLM still ties
  (the base method's ``tie_weights`` shares the embedding's weight with the head module), but
  the head computes from its int8 copy; the embedding lookup stays dense.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import replace
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase, FusedMoEQuantConfig, MoEActivation, RoutedExperts
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.utils import set_weight_attrs

from .config import FORMAT_VERSION, QUANT_METHOD
from .kernels import native_backend
from .nn.int8_linear import Int8Linear
from .tensor.lc_weight import KEYS, LCWeight

logger = logging.getLogger(__name__)

# The fused part vLLM names in a weight loader call -> its index in the layer's output order.
_QKV_PART = {"q": 0, "k": 1, "v": 2}
# What a checkpoint stores per LC layer besides the codes: loaded as they are (float16 storage,
# int32 rotation record), cast for compute after loading.
_STAGE_DTYPES = {"codes": torch.uint8, "A": torch.float16, "beta": torch.float16, "s_u": torch.float16,
                 "s_v": torch.float16, "rotation": torch.int32}


def _checkpoint_keys(model_dir: str) -> set[str] | None:
    """Tensor names of a local checkpoint (safetensors headers or the shard index), or None
    when ``model_dir`` is not a local folder (a Hub id: the config decides, see below)."""
    if not os.path.isdir(model_dir):
        return None
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return set(json.load(f)["weight_map"])
    from .checkpoint import checkpoint_dir_files, read_layout

    files = checkpoint_dir_files(model_dir)
    return set(read_layout(files)) if files else None


class LCQATvLLMConfig(QuantizationConfig):
    """vLLM's view of an lcqat ``quantization_config`` (config.json)."""

    def __init__(self, hf_config: dict[str, Any]):
        super().__init__()  # sets packed_modules_mapping, which the model fills with its fused layers
        self.hf_config = dict(hf_config)
        self.vector_dim = int(hf_config.get("vector_dim", 4))
        self.hadamard_block_size = hf_config.get("hadamard_block_size", 128)
        self.modules_to_not_convert = list(hf_config.get("modules_to_not_convert") or [])
        self.lm_head_int8 = bool(hf_config.get("lm_head_int8", False))
        self.format_version = hf_config.get("format_version", 1)  # from 2 on, every layer has a rotation record
        # Names of the LC layers and of the dense linears, from the checkpoint's tensor names
        # (maybe_update_config); None until then / for a Hub id, where the config's
        # modules_to_not_convert decides.
        self.lc_modules: set[str] | None = None
        self.dense_modules: set[str] | None = None
        self.int8_modules: set[str] | None = None  # heads saved with lm_head_int8 (weight_int8 + scale)
        # (gate, down) checkpoint names of the model's per-expert projections ("gate_proj",
        # "down_proj"; Mixtral "w1", "w2"), recorded as its MoE layers ask for their method
        self._expert_ckpt_names: set[tuple[str, str]] = set()

    # ---------------------------------------------------------------- vLLM's interface
    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # any CUDA device (the CUDA path is the reference unless the kernels are enabled)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the settings live in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LCQATvLLMConfig":
        method = str(config.get("quant_method", QUANT_METHOD)).lower()
        if method != QUANT_METHOD:
            raise ValueError(f"lcqat vLLM plugin: quantization_config.quant_method is {method!r}, not {QUANT_METHOD!r}")
        version = config.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"lcqat vLLM plugin: checkpoint format_version {version!r}; this optimum-lcqat reads up to "
                f"{FORMAT_VERSION}. Upgrade: pip install -U 'optimum-lcqat[vllm]'"
            )
        return cls(config)

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None, **kwargs) -> None:
        keys = _checkpoint_keys(model_name)
        if keys is None:
            logger.info("lcqat vLLM plugin: %s is not a local folder; LC layers are the linears not in "
                        "modules_to_not_convert %s", model_name, self.modules_to_not_convert)
            return
        from .checkpoint import lc_module_names

        self.lc_modules = set(lc_module_names(keys))
        self.dense_modules = {k[: -len(".weight")] for k in keys if k.endswith(".weight")}
        self.int8_modules = {k[: -len(".weight_int8")] for k in keys if k.endswith(".weight_int8")}
        if not self.lc_modules:
            raise ValueError(f"lcqat vLLM plugin: {model_name} says quant_method lcqat but holds no LC layer "
                             "(no '<layer>.codes' tensor); it is not an optimum-lcqat checkpoint")

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # a model whose vLLM module names differ from the checkpoint's (renamed prefixes) maps them
        # here, before its layers ask for their methods
        for attr in ("lc_modules", "dense_modules", "int8_modules"):
            names = getattr(self, attr)
            if names is not None:
                setattr(self, attr, set(hf_to_vllm_mapper.apply_list(sorted(names))))

    def get_checkpoint_weight_mapper(self):
        # An instance method (the base class's is static): vLLM calls it on the config once the
        # model, and so its MoE layers, exist. Our experts' keys -> the model's per-expert names,
        # which vLLM's expert loader maps to w13 (gate: shard "w1", the whole [2I, H] LC layer) and
        # w2. Never to "gate_up_proj": vLLM would split such a tensor in two.
        base = QuantizationConfig.get_checkpoint_weight_mapper()
        if not self._expert_ckpt_names:
            return base
        if len(self._expert_ckpt_names) > 1:
            raise ValueError(f"lcqat vLLM plugin: MoE layers of one model name their experts' projections in several "
                             f"ways {sorted(self._expert_ckpt_names)}; not supported")
        from vllm.model_executor.models.utils import WeightsMapper

        gate, down = next(iter(self._expert_ckpt_names))
        return base | WeightsMapper(orig_to_new_regex={
            re.compile(r"\.experts\.gate_up\.(\d+)\."): rf".experts.\1.{gate}.",
            re.compile(r"\.experts\.down\.(\d+)\."): rf".experts.\1.{down}.",
        })

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, RoutedExperts):
            return self._experts_method(layer, prefix)
        parts = self._checkpoint_parts(prefix)
        is_lc = [self._is_lc(p) for p in parts]
        if isinstance(layer, LinearBase):
            if all(is_lc):
                return LCQATLinearMethod(self, prefix, parts)
            if any(is_lc):
                lc = [p for p, x in zip(parts, is_lc) if x]
                dense = [p for p, x in zip(parts, is_lc) if not x]
                raise ValueError(
                    f"lcqat vLLM plugin: vLLM fuses {parts} into one layer {prefix!r}, but the checkpoint has "
                    f"{lc} as 2-bit LC layers and {dense} dense. Quantize all of them or none "
                    "(list every part in modules_to_not_convert, or none) and save again."
                )
            return UnquantizedLinearMethod()
        if isinstance(layer, ParallelLMHead) and prefix in (self.int8_modules or ()):
            return LCQATInt8HeadMethod(prefix)
        inside = sorted(m for m in (self.lc_modules or ()) if m == prefix or m.startswith(prefix + "."))
        if inside:
            raise ValueError(
                f"lcqat vLLM plugin: {prefix!r} is a {type(layer).__name__} in vLLM, which the plugin cannot serve "
                f"from LC weights (it maps linear layers only); the checkpoint has LC layers under it: "
                f"{inside[:4]}{' ...' if len(inside) > 4 else ''}. Keep them dense (modules_to_not_convert) to serve "
                "this model in vLLM."
            )
        return None  # embeddings, attention, ...: vLLM's own

    def _experts_method(self, layer, prefix: str):
        """The method of a MoE layer's routed experts (``prefix``: ``<block>.mlp.experts``)."""
        E = layer.moe_config.num_logical_experts  # (not counting expert-parallel load balancing's copies)
        names = [f"{prefix}.gate_up.{e}" for e in range(E)] + [f"{prefix}.down.{e}" for e in range(E)]
        lc = [self._is_lc(n) for n in names]
        if not any(lc):
            inside = sorted(m for m in (self.lc_modules or ()) if m.startswith(prefix + "."))
            if inside:
                raise ValueError(f"lcqat vLLM plugin: {prefix!r}'s experts are LC layers under names vLLM's "
                                 f"{E}-expert layer does not have: {inside[:4]}")
            return None  # dense experts: vLLM's own method
        if not all(lc):
            dense = [n for n, x in zip(names, lc) if not x]
            raise ValueError(f"lcqat vLLM plugin: {prefix!r} has LC and dense experts at once (dense: {dense[:4]}); "
                             "quantize all of a layer's experts or none, and save again")
        self._expert_ckpt_names.add((layer.ckpt_gate_proj_name, layer.ckpt_down_proj_name))
        return LCQATFusedMoEMethod(self, prefix, layer.moe_config)

    def staged_weight(self, sd: dict[str, torch.Tensor], label: str) -> LCWeight:
        """The LCWeight of one LC layer from its tensors as staged by a loader (``label``: its name,
        for the error), after checking that the checkpoint held them all."""
        v1_plans = self.format_version < 2 and self.hadamard_block_size  # recomputed, format 1 only
        missing = [k for k in KEYS if k not in sd and not (k == "rotation" and v1_plans)]
        if missing:
            raise ValueError(f"lcqat vLLM plugin: the checkpoint has no {', '.join(f'{label}.{k}' for k in missing)} "
                             "for this LC layer; it is incomplete or corrupted")
        return LCWeight.from_state_dict(sd, "", hadamard_block_size=self.hadamard_block_size)

    # ---------------------------------------------------------------- which layers are LC
    def _checkpoint_parts(self, prefix: str) -> list[str]:
        """The checkpoint module names behind vLLM layer ``prefix`` (its parts if fused)."""
        head, _, last = prefix.rpartition(".")
        subs = self.packed_modules_mapping.get(last)
        if not subs:
            return [prefix]
        return [f"{head}.{s}" if head else s for s in subs]

    def _is_lc(self, name: str) -> bool:
        if self.lc_modules is not None:  # the checkpoint's tensors decide
            return name in self.lc_modules
        last = name.rsplit(".", 1)[-1]
        return not any(name == m or name.endswith("." + m) or last == m for m in self.modules_to_not_convert)


def _owned(w: LCWeight) -> LCWeight:
    """A tensor-parallel shard with tensors of its own: a slice is a view, which would keep the whole
    part's tensors alive."""
    return replace(w, codes=w.codes.clone(), s_u=w.s_u.clone(), s_v=w.s_v.clone())


class LCQATLinearMethod(LinearMethodBase):
    """One vLLM linear layer (possibly q/k/v or gate/up fused) served from packed LC weights."""

    def __init__(self, config: LCQATvLLMConfig, prefix: str, parts: list[str]):
        self.config, self.prefix, self.parts = config, prefix, parts

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        extra_weight_attrs.pop("weight_loader", None)  # vLLM's loaders slice dense weights; ours keep each part
        if len(output_partition_sizes) != len(self.parts):
            raise ValueError(f"lcqat vLLM plugin: layer {self.prefix!r} has {len(output_partition_sizes)} fused outputs "
                             f"but {len(self.parts)} checkpoint parts {self.parts}")
        layer.lcqat_staged = [dict() for _ in self.parts]  # part index -> {key: tensor as stored}
        layer.lcqat_partition = (input_size_per_partition, list(output_partition_sizes))

        def stage(param, loaded_weight: torch.Tensor, loaded_shard_id=None):
            part = 0 if loaded_shard_id is None else _QKV_PART.get(loaded_shard_id, loaded_shard_id)
            layer.lcqat_staged[int(part)][param.lcqat_key] = loaded_weight.detach().clone()

        for key in KEYS:
            # An empty placeholder: vLLM finds the parameter by name and calls its loader; the
            # tensors themselves are kept per part until process_weights_after_loading.
            p = torch.nn.Parameter(torch.empty(0, dtype=_STAGE_DTYPES[key]), requires_grad=False)
            set_weight_attrs(p, {"weight_loader": stage, "lcqat_key": key})
            if hasattr(layer, key):
                raise ValueError(f"lcqat vLLM plugin: vLLM's {type(layer).__name__} already has an attribute {key!r}")
            layer.register_parameter(key, p)  # the checkpoint's name: <layer>.<key>

    def process_weights_after_loading(self, layer) -> None:
        k_part, out_sizes = layer.lcqat_partition
        tp_rank, tp_size = getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)
        device = layer.codes.device  # where vLLM builds the layer (the staged tensors come from the files)
        weights = []
        for i, (name, sd) in enumerate(zip(self.parts, layer.lcqat_staged)):
            w = self.config.staged_weight(sd, name)
            if isinstance(layer, RowParallelLinear):
                if k_part != w.in_features:
                    w = w.shard(1, tp_rank * k_part, (tp_rank + 1) * k_part)
            elif out_sizes[i] != w.out_features:
                rank = tp_rank
                if isinstance(layer, QKVParallelLinear) and i > 0:  # k, v: heads replicated when fewer than ranks
                    rank = tp_rank // getattr(layer, "num_kv_head_replicas", 1)
                w = w.shard(0, rank * out_sizes[i], (rank + 1) * out_sizes[i])
            if tp_size > 1:
                w = _owned(w)
            if w.out_features != out_sizes[i] or w.in_features != k_part:
                raise ValueError(f"lcqat vLLM plugin: {name} holds a {w.out_features}x{w.in_features} LC weight but "
                                 f"vLLM's layer {self.prefix!r} (tensor-parallel rank {tp_rank}/{tp_size}) expects "
                                 f"{out_sizes[i]}x{k_part}")
            # float32 parameters: the kernels compute in fp32 whatever the activation dtype
            weights.append(w.to(device=device, dtype=torch.float32))
        for key in KEYS:  # the placeholders have done their job
            del layer._parameters[key]
        del layer.lcqat_staged
        layer.lcqat_weights = weights
        # Load the extension (and register its fake kernels) now: in vLLM's compiled mode the
        # first forward is traced by dynamo, which cannot trace the one-time set-up.
        native_backend()
        # Buffers, so the packed tensors show in the module's state (memory accounting, .to()).
        for i, w in enumerate(weights):
            for key in ("codes", "A", "beta", "s_u", "s_v"):
                layer.register_buffer(f"lcqat_{key}_{i}", getattr(w, key), persistent=False)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        weights = layer.lcqat_weights
        if len(weights) == 1:
            return weights[0].apply(x, bias)
        y = torch.cat([w.apply(x) for w in weights], dim=-1)
        return y if bias is None else y + bias


# The experts layers served by LCQATFusedMoEMethod, by vLLM layer name: the custom op below finds its
# layer here (an op's arguments are tensors and plain values, not modules).
_MOE_LAYERS: dict[str, torch.nn.Module] = {}
_GATES = {MoEActivation.SILU: torch.nn.functional.silu,
          MoEActivation.GELU: torch.nn.functional.gelu,
          MoEActivation.GELU_TANH: lambda h: torch.nn.functional.gelu(h, approximate="tanh")}


@torch.library.custom_op("lcqat_vllm::moe", mutates_args=())
def _lc_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str) -> torch.Tensor:
    """The routed experts' sum for tokens ``x`` [T, H] (vLLM's routing: ``topk_ids``, ``topk_weights``
    [T, k]): each selected expert's gate/up LC layer, the gate, its down LC layer, weighted and
    added up, as ExpertLinears.forward does in transformers. Opaque to dynamo: the loop over the
    experts hit depends on the data."""
    layer = _MOE_LAYERS[layer_name]
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("lcqat vLLM plugin: LC experts read the experts hit on the host, which a CUDA graph cannot "
                           "capture; serve with enforce_eager=True (--enforce-eager)")
    ids = topk_ids.long()
    if layer.expert_map is not None:  # expert parallelism: global -> local (-1: another rank's)
        ids = layer.expert_map[ids].long()
    k = ids.shape[1]
    flat, weights = ids.reshape(-1), topk_weights.reshape(-1)
    out = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float32, device=x.device)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat + 1, minlength=layer.local_num_experts + 1).tolist()
    start = counts[0]  # the -1s (remote experts) sort first
    gate = _GATES[layer.activation]
    for e, n in enumerate(counts[1:]):
        if n == 0:
            continue
        pos = order[start:start + n]
        start += n
        tok = pos // k
        xe = x[tok]
        parts = layer.lcqat_w13[e]
        h = parts[0].apply(xe) if len(parts) == 1 else torch.cat([w.apply(xe) for w in parts], dim=-1)
        i = h.shape[-1] // 2
        y = layer.lcqat_w2[e].apply(gate(h[:, :i]) * h[:, i:])
        out.index_add_(0, tok, y.float() * weights[pos, None].float())
    return out.to(x.dtype)


@_lc_moe.register_fake
def _(x, topk_weights, topk_ids, layer_name):
    return torch.empty_like(x)


class LCQATFusedMoEMethod(FusedMoEMethodBase):
    """A MoE layer's routed experts served from per-expert LC weights (see the module docstring)."""

    def __init__(self, config: LCQATvLLMConfig, prefix: str, moe):
        super().__init__(moe)
        self.config, self.prefix = config, prefix

    def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config):
        return hidden_size, intermediate_size_per_partition  # LC shapes are what the checkpoint says

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        problems = []
        if not self.moe.is_act_and_mul or layer.activation not in _GATES:
            problems.append(f"activation {layer.activation}")
        if self.moe.has_bias:
            problems.append("expert biases")
        if layer.apply_router_weight_on_input:
            problems.append("router weights applied to the input")
        if layer.swiglu_limit is not None:
            problems.append("a clamped SwiGLU")
        if getattr(self.moe, "is_lora_enabled", False):
            problems.append("LoRA adapters on the experts")
        if problems:
            raise ValueError(f"lcqat vLLM plugin: {self.prefix!r}: LC experts are served for gated SiLU/GELU experts; "
                             f"this layer has {', '.join(problems)}")
        layer.lcqat_staged = {"w13": [dict() for _ in range(num_experts)], "w2": [dict() for _ in range(num_experts)]}

        def stage(param, loaded_weight: torch.Tensor, weight_name=None, shard_id=None, expert_id=None,
                  return_success: bool = False):
            local = layer._map_global_expert_id_to_local_expert_id(expert_id)
            if local == -1:  # another rank's expert (expert parallelism)
                return False if return_success else None
            if param.lcqat_proj == "w13" and shard_id != "w1":
                raise ValueError(f"lcqat vLLM plugin: {weight_name} reached {self.prefix!r}'s gate/up as part {shard_id!r}; "
                                 "an LC expert's gate and up are one layer (experts.gate_up.<e>)")
            layer.lcqat_staged[param.lcqat_proj][local][param.lcqat_key] = loaded_weight.detach().clone()
            return True if return_success else None

        for proj in ("w13", "w2"):
            for key in KEYS:
                p = torch.nn.Parameter(torch.empty(0, dtype=_STAGE_DTYPES[key]), requires_grad=False)
                set_weight_attrs(p, {"weight_loader": stage, "lcqat_proj": proj, "lcqat_key": key})
                layer.register_parameter(f"{proj}_{key}", p)  # vLLM's loader finds w13_codes, w2_A, ...

    def process_weights_after_loading(self, layer) -> None:
        tp_rank, tp_size = self.moe.tp_rank, self.moe.tp_size
        ip = layer.intermediate_size_per_partition
        device = layer.w13_codes.device  # where vLLM builds the layer (the staged tensors come from the files)
        w13_all, w2_all = [], []
        for e, (sd13, sd2) in enumerate(zip(layer.lcqat_staged["w13"], layer.lcqat_staged["w2"])):
            w13 = self.config.staged_weight(sd13, f"{self.prefix}.gate_up.<local expert {e}>")
            w2 = self.config.staged_weight(sd2, f"{self.prefix}.down.<local expert {e}>")
            full_i = w13.out_features // 2
            if tp_size > 1:  # gate rows and up rows of this rank; down's input columns
                parts = [_owned(w13.shard(0, tp_rank * ip, (tp_rank + 1) * ip)),
                         _owned(w13.shard(0, full_i + tp_rank * ip, full_i + (tp_rank + 1) * ip))]
                w2 = _owned(w2.shard(1, tp_rank * ip, (tp_rank + 1) * ip))
            else:
                parts = [w13]
            if sum(w.out_features for w in parts) != 2 * ip or any(w.in_features != layer.hidden_size for w in parts) \
                    or (w2.out_features, w2.in_features) != (layer.hidden_size, ip):
                raise ValueError(f"lcqat vLLM plugin: {self.prefix} expert {e}: LC weights {w13.out_features}x{w13.in_features} "
                                 f"and {w2.out_features}x{w2.in_features}, but vLLM's layer (tensor-parallel rank {tp_rank}/"
                                 f"{tp_size}) expects {2 * ip}x{layer.hidden_size} and {layer.hidden_size}x{ip}")
            w13_all.append([w.to(device=device, dtype=torch.float32) for w in parts])
            w2_all.append(w2.to(device=device, dtype=torch.float32))
        for proj in ("w13", "w2"):
            for key in KEYS:
                del layer._parameters[f"{proj}_{key}"]
        del layer.lcqat_staged
        layer.lcqat_w13, layer.lcqat_w2 = w13_all, w2_all
        native_backend()  # (the extension and its fake kernels, before any trace)
        for e, (parts, w2) in enumerate(zip(w13_all, w2_all)):
            for j, w in enumerate([*parts, w2]):
                for key in ("codes", "A", "beta", "s_u", "s_v"):
                    layer.register_buffer(f"lcqat_{key}_{e}_{j}", getattr(w, key), persistent=False)
        _MOE_LAYERS[layer.layer_name] = layer
        # set now, not on the first forward (which vLLM's compiled mode traces)
        self.moe_quant_config = self.get_fused_moe_quant_config(layer)

    def get_fused_moe_quant_config(self, layer):
        return FusedMoEQuantConfig.make()

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        return torch.ops.lcqat_vllm.moe(x, topk_weights, topk_ids, layer.layer_name)


class LCQATInt8HeadMethod(LinearMethodBase):
    """vLLM's ParallelLMHead served from a head saved with ``lm_head_int8``: ``<head>.weight_int8``
    (int8 [vocab, hidden]) and ``<head>.scale`` (fp32 [vocab]); each tensor-parallel rank keeps
    its vocabulary rows (vLLM pads a rank's rows to a multiple of 64: the padding rows are zero)
    and computes with the package's Int8Linear (the native int8 op on CPU)."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        rows = sum(output_partition_sizes)

        def load(param, loaded_weight: torch.Tensor, *args):
            idx = layer.shard_indices
            if loaded_weight.shape[0] != layer.org_vocab_size:
                raise ValueError(f"lcqat vLLM plugin: {self.prefix} has {loaded_weight.shape[0]} rows in the checkpoint, "
                                 f"vLLM's head {layer.org_vocab_size} (added vocabulary is not supported for an int8 head)")
            n = idx.org_vocab_end_index - idx.org_vocab_start_index
            param.data[:n].copy_(loaded_weight[idx.org_vocab_start_index: idx.org_vocab_end_index])

        for name, shape, dtype in (("weight_int8", (rows, input_size_per_partition), torch.int8),
                                   ("scale", (rows,), torch.float32)):
            p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
            set_weight_attrs(p, {"weight_loader": load})
            layer.register_parameter(name, p)

    def process_weights_after_loading(self, layer) -> None:
        layer.lcqat_head = Int8Linear(layer.weight_int8.data, layer.scale.data)
        del layer._parameters["weight_int8"], layer._parameters["scale"]
        native_backend()  # as LCQATLinearMethod: load the extension before a compiled forward

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = layer.lcqat_head(x)
        return y if bias is None else y + bias


_registered = False


def register() -> None:
    """vLLM's entry point (group ``vllm.general_plugins``): make quant_method ``lcqat`` known.
    vLLM calls it once in each of its processes."""
    global _registered
    if not _registered:
        register_quantization_config(QUANT_METHOD)(LCQATvLLMConfig)
        _registered = True
