"""Which parameters train during LC-QAT, and the optimizer groups they form.

Every parameter of the model falls in exactly one *category*, decided only by the model's
structure (module types and parameter names), never by run-time state, so two runs of the
same script (and a run resumed from a checkpoint) select the same parameters in the same
order and the optimizer's saved state lines up with them:

==============  ===========================================================  ==============
category        what                                                         trains by default
==============  ===========================================================  ==============
``latent``      ``LCLinear.latent`` (real latent codes, see LCLinear)        yes
``scales``      ``LCLinear.s_u``, ``LCLinear.s_v``                           yes
``codebook``    ``LCLinear.A``, ``LCLinear.beta`` (affine codebook only;     yes
                the ``"scalar"`` codebook stays frozen)
``bias``        ``LCLinear.bias``                                            yes
``norm``        parameters of normalisation modules (``*Norm*`` classes)     yes
``embedding``   ``nn.Embedding`` weights and the output embedding (lm_head)  no
``other``       everything else (e.g. linears kept dense)                    no
==============  ===========================================================  ==============
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..nn.lc_linear import LCLinear

CATEGORIES = ("latent", "scales", "codebook", "bias", "norm", "embedding", "other")
DEFAULT_TRAINABLE = ("latent", "scales", "codebook", "bias", "norm")
# Categories that never get weight decay: decaying the latent would pull every code toward
# the 1|2 bin edge (latent 0 is U = 1.5), decaying scales/codebook shrinks the weights.
NO_DECAY = ("latent", "scales", "codebook", "bias", "norm")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def parameter_categories(model: nn.Module) -> dict[str, str]:
    """``{parameter name: category}`` for every (deduplicated) parameter, in ``named_parameters`` order."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    owner: dict[str, tuple[nn.Module, str]] = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = (module, pname)
    cats = {}
    for name, _ in model.named_parameters():
        module, leaf = owner.get(name, (None, name.rpartition(".")[2]))
        # peft wraps LC layers: the LC layer is the `base_layer` module and owns its params.
        if isinstance(module, LCLinear):
            if leaf == "latent":
                cat = "latent"
            elif leaf in ("s_u", "s_v"):
                cat = "scales"
            elif leaf in ("A", "beta"):
                cat = "codebook"
            elif leaf == "bias":
                cat = "bias"
            else:
                cat = "other"
        elif isinstance(module, nn.Embedding) or (out_emb is not None and module is out_emb):
            cat = "embedding"
        elif module is not None and _is_norm(module):
            cat = "norm"
        else:
            cat = "other"
        cats[name] = cat
    return cats


def resolve_decay(categories=None) -> frozenset:
    """The categories that get weight decay: ``None`` -> every category outside :data:`NO_DECAY`."""
    if categories is None:
        return frozenset(c for c in CATEGORIES if c not in NO_DECAY)
    cats = frozenset(categories)
    unknown = cats - set(CATEGORIES)
    if unknown:
        raise ValueError(f"decay_categories: unknown categories {sorted(unknown)}; choose from {CATEGORIES}")
    return cats


def resolve_trainable(train: Iterable[str] | None = None, train_norms: bool = True, train_embeddings: bool = False):
    """The set of trainable categories from the callback's arguments."""
    if train is not None:
        cats = set(train)
        unknown = cats - set(CATEGORIES)
        if unknown:
            raise ValueError(f"LCQATCallback: unknown parameter categories {sorted(unknown)}; choose from {CATEGORIES}")
        return cats
    cats = {"latent", "scales", "codebook", "bias"}
    if train_norms:
        cats.add("norm")
    if train_embeddings:
        cats.add("embedding")
    return cats


def select_trainable(model: nn.Module, trainable: set[str]) -> dict[str, list[str]]:
    """Set ``requires_grad`` on every parameter from its category; return ``{category: [names]}``
    of the trainable ones. The scalar codebook's ``A``/``beta`` stay frozen whatever is asked."""
    cats = parameter_categories(model)
    params = dict(model.named_parameters())
    chosen: dict[str, list[str]] = {}
    for name, cat in cats.items():
        p = params[name]
        on = cat in trainable
        if cat == "codebook":
            owner = model.get_submodule(name.rpartition(".")[0])
            on = on and getattr(owner, "codebook", "affine") == "affine"
        p.requires_grad_(on)
        if on:
            chosen.setdefault(cat, []).append(name)
    return chosen


def lcqat_param_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float = 0.0,
    lr_scale: dict[str, float] | None = None,
    decay_categories=None,
) -> list[dict]:
    """Optimizer parameter groups, one per trainable category (in :data:`CATEGORIES` order).

    Each group has ``lr = learning_rate * lr_scale.get(category, 1.0)`` (the Trainer's scheduler
    then scales every group by the same factor) and ``weight_decay`` only for ``decay_categories``
    (default: the categories outside :data:`NO_DECAY`). Groups carry their category under ``"name"``.
    """
    lr_scale = dict(lr_scale or {})
    unknown = set(lr_scale) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"lr_scale: unknown categories {sorted(unknown)}; choose from {CATEGORIES}")
    decay = resolve_decay(decay_categories)
    cats = parameter_categories(model)
    by_cat: dict[str, list] = {c: [] for c in CATEGORIES}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_cat[cats[name]].append(p)
    groups = []
    for c in CATEGORIES:
        if by_cat[c]:
            groups.append(
                {
                    "params": by_cat[c],
                    "lr": learning_rate * lr_scale.get(c, 1.0),
                    "weight_decay": weight_decay if c in decay else 0.0,
                    "name": c,
                }
            )
    if not groups:
        raise ValueError("lcqat: no trainable parameter; did the LCQATCallback run (on_init_end) before the optimizer?")
    return groups


class LCQATOptimizerFactory:
    """A Trainer ``optimizer_cls_and_kwargs`` factory: the optimizer ``TrainingArguments.optim`` names
    (AdamW by default) over :func:`lcqat_param_groups`.

    ``Trainer(..., optimizer_cls_and_kwargs=(LCQATOptimizerFactory(lr_scale={...}), {}))``: the
    Trainer calls ``factory()(model)`` when it creates the optimizer (after the callback has
    selected the trainable parameters). The class and its settings (learning rate, betas, epsilon)
    come from transformers' own ``Trainer.get_optimizer_cls_and_kwargs``, so every ``optim`` the
    Trainer knows works here too: ``adamw_torch_8bit`` / ``adamw_torch_4bit`` (torchao's 8-bit / 4-bit
    Adam states: 2 / 1 bytes a weight instead of 8, see benchmarks/results/memory.md), bitsandbytes'
    ``adamw_8bit``, ... The groups carry their own learning rates and weight decay.
    """

    def __init__(self, args=None, lr_scale: dict[str, float] | None = None, decay_categories=None):
        self.args = args
        self.lr_scale = lr_scale
        self.decay_categories = decay_categories

    def __call__(self):
        return self._build

    def _build(self, model, **kwargs):
        import torch

        args = kwargs.pop("args", None) or self.args
        if args is None:
            raise ValueError("LCQATOptimizerFactory needs the TrainingArguments: LCQATOptimizerFactory(args, ...)")
        groups = lcqat_param_groups(model, args.learning_rate, args.weight_decay, self.lr_scale, self.decay_categories)
        if getattr(args, "optim", None) is None:  # not a TrainingArguments (a namespace in a script)
            return torch.optim.AdamW(
                groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
            )
        from transformers import Trainer

        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        return cls(groups, **kwargs)
