"""`LCQATHfQuantizer`: the lcqat method on transformers' v5 loading path.

* In-flight quantization (a full-precision checkpoint plus ``LCQATConfig``): the float weights
  load normally; ``_process_model_after_weight_loading`` calls :func:`optimum_lcqat.quant_api.quantize`,
  which swaps the convertible linears for LC layers, initialised data-free or, with calibration
  data, by the Hessian-aware PTQ.
* Pre-quantized checkpoints: before loading, the safetensors headers are read and every module
  that has ``<name>.codes`` becomes an LC layer skeleton whose parameter names match the saved
  keys, so transformers assigns the tensors directly (no re-quantization).
"""

from __future__ import annotations

import logging

import torch
from transformers.quantizers.base import HfQuantizer

from .config import FORMAT_VERSION, LCQATConfig

# Everything else of the package is imported inside the methods: registering the method (see
# _registration.py) imports this module, possibly while another module of the package is half
# imported (its own import reached transformers' quantizer registry); this module must then load
# with nothing but transformers and the config. It does not import _registration (no cycle).

logger = logging.getLogger(__name__)


class LCQATHfQuantizer(HfQuantizer):
    requires_calibration = False
    quantization_config: LCQATConfig

    def __init__(self, quantization_config: LCQATConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []

    # ---------------------------------------------------------------- environment
    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in set(device_map.values()):
            raise ValueError("lcqat: disk offload is not supported; load on CPU or GPU devices.")

    def update_dtype(self, dtype):
        if dtype is None:
            return torch.float32
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"lcqat: dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype

    # ---------------------------------------------------------------- loading
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, keep_in_fp32_modules=None, **kwargs):
        from . import checkpoint as ckpt
        from . import dense_storage
        from .convert import build_lc_skeleton, unfuse_saved_experts
        from .tensor.lc_weight import plans_from_record

        cfg = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, cfg.modules_to_not_convert, keep_in_fp32_modules, add_default_skips=True
        )
        if not self.pre_quantized:
            if cfg.uses_calibration and cfg.ptq_options.get("memory_check", True):
                self._check_memory(model)
            return model
        layout, file_keys = ckpt.model_keys(model, ckpt.read_layout(checkpoint_files))
        dense_storage.prepare_int8_head(model, layout)  # an int8 lm_head in the checkpoint: Int8Linear skeleton
        names = ckpt.lc_module_names(layout)
        if not names:
            raise ckpt.CheckpointError(
                "lcqat checkpoint: the config says quant_method='lcqat' but the weights hold no packed "
                "codes (no '*.codes' tensor); the checkpoint is not an lcqat checkpoint or is corrupted."
            )
        unfuse_saved_experts(model, names)  # LC experts: one linear per expert and projection first
        # Format version 2 records each layer's rotation plans: the layer is built with them, not
        # with whatever the installed code would choose for the config (version 1: recomputed).
        # The version is the files' own (their metadata; the config's when they declare none): a
        # version-2 file without a layer's record is refused, not loaded with recomputed plans.
        version = ckpt.read_format_version(checkpoint_files)
        if version is None:
            version = cfg.format_version
        records = ckpt.read_rotation_records(checkpoint_files, names, file_keys)
        self._v1_layers = [n for n in names if n not in records]
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ckpt.CheckpointError(f"lcqat checkpoint: {name}.codes names no module of this model") from None
            if not isinstance(module, torch.nn.Linear):
                raise ckpt.CheckpointError(f"lcqat checkpoint: {name} is a {type(module).__name__}, not a Linear")
            ckpt.validate_layer_layout(name, module, layout, cfg.vector_dim, version)
            plans = None
            if name in records:
                try:
                    plans = plans_from_record(records[name], module.in_features, module.out_features)
                except ValueError as exc:
                    raise ckpt.CheckpointError(f"lcqat checkpoint: {name}.rotation: {exc}") from None
            w = module.weight
            layer = build_lc_skeleton(module, cfg, device=w.device, dtype=w.dtype, plans=plans)
            if plans is None:  # no record to load: the buffer must not be reported missing
                layer._non_persistent_buffers_set.add("rotation")
            model.set_submodule(name, layer)
        self._loaded_lc_names = names
        return model

    def _check_memory(self, model) -> None:
        """Refuse, before the float weights load, a PTQ whose predicted peak exceeds the memory
        available (memory_plan.py), with the numbers and the ways out."""
        from . import memory_plan as mp

        est = mp.in_memory_ptq(mp.ModelShape.of(model), self.quantization_config,
                               dtype_bytes=next(model.parameters()).element_size())
        logger.info("lcqat: %s", est.describe())
        mp.check_fits(est, "Quantize it block by block with optimum_lcqat.streaming.quantize_streaming(folder, out, "
                           "config) (what `optimum-lcqat quantize` does for a local folder), lower num_samples or "
                           "ptq_e2e_steps, or pass ptq_options={'memory_check': False} to run anyway.")

    def _process_model_after_weight_loading(self, model, **kwargs):
        from . import checkpoint as ckpt
        from .tensor.lc_weight import rotation_record

        cfg = self.quantization_config
        if self.pre_quantized:
            for name in getattr(self, "_v1_layers", []):  # saved again, the layer records its plans
                layer = model.get_submodule(name)
                with torch.no_grad():  # (the unloaded buffer holds whatever the meta-device init left)
                    layer.rotation.copy_(rotation_record(layer.plan_in, layer.plan_out))
                layer._non_persistent_buffers_set.discard("rotation")
            ckpt.check_loaded_layers(model)
            cfg.format_version = FORMAT_VERSION
            return model
        from .quant_api import quantize

        return quantize(model, cfg, modules_to_not_convert=self.modules_to_not_convert)

    # ---------------------------------------------------------------- saving
    def is_serializable(self, *args, **kwargs):
        return True

    def get_state_dict_and_metadata(self, model):
        from . import checkpoint as ckpt

        return ckpt.packed_state_dict(model), {ckpt.METADATA_KEY: str(self.quantization_config.format_version)}

    # ---------------------------------------------------------------- capabilities
    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        from .convert import dequantize_model, lc_layers

        if not lc_layers(model):
            raise ValueError("lcqat: the model holds no LC layer to dequantize")
        if isinstance(dtype, str):  # transformers passes model.config.dtype, a name once read from config.json
            dtype = getattr(torch, dtype)
        return dequantize_model(model, dtype)


_registered = False


def register_lcqat() -> None:
    """Register ``lcqat`` with transformers' quantizer registry (idempotent). Called at the end of
    this module and by :func:`optimum_lcqat._registration.register` (the import hook)."""
    global _registered
    if _registered:
        return
    from transformers.quantizers import auto

    from .config import QUANT_METHOD

    # The registry's decorators refuse a second registration: check first, so that registering
    # again (another import path, a reload) is harmless.
    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not LCQATConfig:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantization_config(QUANT_METHOD)(LCQATConfig)
    if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LCQATHfQuantizer:
        auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantizer(QUANT_METHOD)(LCQATHfQuantizer)
    _registered = True


register_lcqat()  # the import hook defers while this module is half imported (see _registration)
