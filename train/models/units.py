"""A Trainable: one model wrapped for ZeRO-3 plus its optimizer, as a plain torch loop or a DeepSpeed engine.

Stage II has one (the dynamically pruned model); Stage III has two (the generator and the fake
score's LoRA), each with its own optimizer so the fake score can take several steps per generator step.
The loop only sees `forward`, `update`, `skip`, checkpoint save/load and the consolidated weights.

ZeRO-3 gathers a partitioned parameter when the module that owns it runs its forward. The adapters call
submodules (blocks, embedders, heads) directly and read a few parameters directly (Wan's top-level
`scale_shift_table` in `end`), so every call goes through `AdapterModule.forward` and the root model's
own parameters are registered as external parameters of that wrapper: they are gathered for the whole
call. Blocks and embedders are called as modules and gather themselves.

Under ZeRO-3 the models are built partitioned (`partitioned_model`: deepspeed.zero.Init, then each rank reads
its own elements of every parameter from the files), so no rank ever holds a whole model; a frozen model that
only predicts runs in an inference engine (`predictor`).
"""
from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch
from torch import nn

from fastlightgen.adapters import DiTAdapter, adapt
from fastlightgen.sequence import SequenceShards
from fastlightgen.stored import StoredTensor

from ..config import Config
from ..distributed.processes import Dist
from ..loop.state import flatten_optimizer, split_prefix, unflatten_optimizer, with_prefix


class NonFiniteStep(RuntimeError):
    """Raised on every rank when some rank's loss or gradients are non-finite: the update was not applied, so
    the step can be skipped. `local` says whether this rank saw it."""

    def __init__(self, unit: str, what: str, value: str, batch: str, local: bool):
        super().__init__(f"non-finite {unit} {what} ({value}) on batch {batch}" if local else
                         f"non-finite {unit} {what} on another rank")
        self.local = local


class NonFiniteWeights(RuntimeError):
    """Raised on every rank when an applied update left some rank's weights non-finite (a learning rate that
    overflows the step): an update cannot be undone, so the run must stop."""


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """One host sync per device, however many tensors."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


class Resumable(Protocol):
    """What a run checkpoints and resumes by name: a Trainable, or other state such as an EMA of its weights."""
    name: str

    def save(self, folder: Path) -> tuple[dict[str, torch.Tensor], dict]: ...

    def load(self, folder: Path, tensors: dict[str, torch.Tensor], info: dict) -> None: ...

    def all_finite(self) -> bool:
        """Whether this rank's part of the state is finite: a checkpoint is never written otherwise."""


# a model that only predicts: called as `predictor(fn)` with fn(adapter), like a Trainable
Predictor = Callable[[Callable[[DiTAdapter], Any]], Any]


class AdapterModule(nn.Module):
    """nn.Module whose forward runs `fn(adapter)`: the one entry through which ZeRO-3 sees every call."""

    def __init__(self, model: nn.Module, gradient_checkpointing: bool = False, shards: SequenceShards | None = None):
        super().__init__()
        self.model = model
        self.adapter: DiTAdapter = adapt(model)
        self.adapter.gradient_checkpointing = gradient_checkpointing
        if shards is not None:
            self.adapter.shard_sequence(shards)

    def forward(self, fn: Callable[[DiTAdapter], Any]) -> Any:
        return fn(self.adapter)


class Trainable(ABC):
    """One model and its optimizer. Subclasses: PlainTrainable (torch), DeepSpeedTrainable (ZeRO)."""

    def __init__(self, name: str, module: AdapterModule, dist: Dist, grad_clip: float):
        self.name, self.module, self.dist, self.grad_clip = name, module, dist, grad_clip

    def __call__(self, fn: Callable[[DiTAdapter], Any]) -> Any:
        return self.module(fn)

    def update(self, loss: torch.Tensor, batch: str, lr: float) -> None:
        """Backward and optimizer step, or NonFiniteStep (on every rank) with nothing changed: the loss or the
        gradients are non-finite. NonFiniteWeights (on every rank) if the applied step made weights non-finite."""
        # every rank must take the same branch: ZeRO's collectives run in lockstep
        value = loss.item()
        if self.dist.any(not math.isfinite(value)):
            self.skip()
            raise NonFiniteStep(self.name, "loss", f"{value}", batch, not math.isfinite(value))
        self._backward(loss)
        norm = self._grad_norm()
        if self.dist.any(not math.isfinite(norm)):
            self.skip()
            raise NonFiniteStep(self.name, "gradients", f"norm {norm}", batch, not math.isfinite(norm))
        self._step(lr)
        local = not self.all_finite()
        if self.dist.any(local):
            raise NonFiniteWeights(f"the update at learning rate {lr:g} made {self.name} weights non-finite"
                                   + ("" if local else " on another rank"))

    def all_finite(self) -> bool:
        """Whether this rank's weights (its ZeRO-3 partition) are all finite."""
        return all_finite(self._master_weights())

    def trainable_named(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self.module.model.named_parameters() if p.requires_grad}

    @abstractmethod
    def _backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def _grad_norm(self) -> float:
        """This rank's norm of the trainable gradients before clipping (inf or nan if any is non-finite)."""

    @abstractmethod
    def _step(self, lr: float) -> None:
        """Clip the gradients, apply the optimizer step at `lr`, clear the gradients."""

    @abstractmethod
    def _master_weights(self) -> Iterable[torch.Tensor]:
        """The trainable weights the optimizer updates (on this rank)."""

    @abstractmethod
    def skip(self) -> None:
        """Drop any gradient of a step that will not be taken."""

    @abstractmethod
    def save(self, folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
        """Write or return this unit's resumable state: (tensors for state.py, JSON-able info)."""

    @abstractmethod
    def load(self, folder: Path, tensors: dict[str, torch.Tensor], info: dict) -> None: ...

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on the main rank."""


class PlainTrainable(Trainable):
    def __init__(self, name, module, dist, grad_clip, lr: float, weight_decay: float):
        super().__init__(name, module.to(dist.device), dist, grad_clip)
        self.optimizer = torch.optim.AdamW(list(self.trainable_named().values()), lr=lr, weight_decay=weight_decay)

    def _backward(self, loss):
        loss.backward()

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.trainable_named().values() if p.grad is not None]

    def _grad_norm(self):
        self._norm = torch.nn.utils.get_total_norm(self._grads())  # the step clips by it
        return self._norm.item()

    def _step(self, lr):
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.trainable_named().values(), self.grad_clip, self._norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _master_weights(self):
        return [p.detach() for p in self.trainable_named().values()]

    def skip(self):
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, folder):
        """Trainable weights and optimizer state as tensors (the frozen rest is rebuilt from the config)."""
        opt_tensors, opt_rest = flatten_optimizer(self.optimizer)
        weights = {k: p.detach() for k, p in self.trainable_named().items()}
        tensors = {**with_prefix(weights, f"{self.name}.model."), **with_prefix(opt_tensors, f"{self.name}.opt.")}
        return tensors, {"optimizer": opt_rest}

    def load(self, folder, tensors, info):
        weights = split_prefix(tensors, f"{self.name}.model.")
        params = self.trainable_named()
        if set(weights) != set(params):
            raise ValueError(f"checkpoint {folder} holds other trainable tensors for {self.name} than this model")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(weights[k])
        unflatten_optimizer(self.optimizer, split_prefix(tensors, f"{self.name}.opt."), info["optimizer"])

    def full_state_dict(self):
        return {k: v.detach().cpu() for k, v in self.module.model.state_dict().items()}


class DeepSpeedTrainable(Trainable):
    def __init__(self, name, module, dist, grad_clip, lr: float, weight_decay: float, cfg: Config):
        super().__init__(name, module, dist, grad_clip)
        params = list(self.trainable_named().values())
        ds_config = deepspeed_config(cfg, lr, weight_decay)
        optimizer = None if cfg.dist.cpu_adam else torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.engine = engine(module, model_parameters=params, optimizer=optimizer, config=ds_config)

    def __call__(self, fn):
        return self.engine(fn)

    def _backward(self, loss):
        self.engine.backward(loss)

    def _grad_norm(self):
        from deepspeed.utils import safe_get_local_grad

        # this rank's partitions of the reduced fp32 gradients, held by ZeRO-3 between backward and step
        return torch.nn.utils.get_total_norm([safe_get_local_grad(p) for p in self.trainable_named().values()]).item()

    def _step(self, lr):
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()  # clips to dist.grad_clip (DeepSpeed's gradient_clipping)

    def _master_weights(self):
        from deepspeed.utils import safe_get_local_fp32_param

        return [safe_get_local_fp32_param(p) for p in self.trainable_named().values()]

    def skip(self):
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        # After a backward ZeRO-3 holds the reduced gradients in its own partitions, to which the next backward
        # adds (its micro step has advanced) and which a parameter unused by the next step would keep: zero them
        # and restart its accumulation, as DeepSpeed itself does after an fp16 overflow.
        self.engine.zero_grad()
        self.engine.optimizer.zero_grad(set_to_none=True)
        for p in self.trainable_named().values():
            safe_set_local_grad(p, torch.zeros_like(safe_get_local_grad(p)))

    def save(self, folder):
        # DeepSpeed's own per-rank files (ZeRO partitions of weights and optimizer states); frozen
        # weights are not written: they are rebuilt from the config on resume.
        self.engine.save_checkpoint(str(folder), tag=self.name, save_latest=False, exclude_frozen_parameters=True)
        return {}, {}

    def load(self, folder, tensors, info):
        path, _ = self.engine.load_checkpoint(str(folder), tag=self.name, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(f"DeepSpeed found no {self.name} checkpoint in {folder}")

    def full_state_dict(self):
        """Whole-model weights on rank 0 ({} elsewhere), gathered one parameter at a time."""
        import deepspeed

        out = {}
        model = self.module.model
        for key, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if self.dist.is_main:
                    out[key] = p.detach().cpu().clone()
        if self.dist.is_main:
            persistent = set(model.state_dict())
            out.update({k: b.detach().cpu() for k, b in model.named_buffers() if k in persistent})
        return out


class EMA:
    """An exponential moving average of a plain unit's trainable weights, in a copy of its model.

    With `warmup` the decay warms up as min(decay, (1 + step) / (10 + step)), so that a short run's average is
    not dominated by the random initialisation; without it (weights that start trained, as Stage II's) it is
    `decay` from the first step. DeepSpeed units are refused: ZeRO-3 partitions the weights to average.
    """

    def __init__(self, name: str, unit: Trainable, decay: float, warmup: bool = True):
        if not isinstance(unit, PlainTrainable):
            raise TypeError(f"an EMA of {unit.name} needs the plain loop (dist.deepspeed false)")
        self.name, self.unit, self.decay, self.warmup = name, unit, decay, warmup
        self.model = copy.deepcopy(unit.module.model).eval().requires_grad_(False)

    def averaged(self) -> dict[str, torch.Tensor]:
        """The averages of the unit's trainable weights, by the same names."""
        params = dict(self.model.named_parameters())
        return {k: params[k] for k in self.unit.trainable_named()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        live = self.unit.trainable_named()
        for k, avg in self.averaged().items():
            avg.lerp_(live[k], 1 - decay)

    def save(self, folder):
        return with_prefix({k: v.detach() for k, v in self.averaged().items()}, f"{self.name}.model."), {}

    def all_finite(self):
        return all_finite(self.averaged().values())

    def load(self, folder, tensors, info):
        weights = split_prefix(tensors, f"{self.name}.model.")
        averaged = self.averaged()
        if set(weights) != set(averaged):
            raise ValueError(f"checkpoint {folder} holds other averaged tensors for {self.name} than this model")
        with torch.no_grad():
            for k, avg in averaged.items():
                avg.copy_(weights[k])


def compute_dtype(cfg: Config) -> torch.dtype:
    """The dtype of model inputs: DeepSpeed's bf16 mode casts the weights, not the inputs."""
    return torch.bfloat16 if cfg.dist.bf16 else torch.float32


def zero_config(cfg: Config) -> dict:
    """DeepSpeed's settings of the ZeRO stage, precision and batch, with no optimizer: what `zero.Init` and an
    inference engine read."""
    d = cfg.dist
    on_cpu = not torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": d.zero_stage, "stage3_param_persistence_threshold": d.param_persistence_threshold,
                            "stage3_prefetch_bucket_size": d.prefetch_bucket_size}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu}
    return {"train_micro_batch_size_per_gpu": cfg.data.batch_size, "gradient_accumulation_steps": 1,
            "gradient_clipping": d.grad_clip, "bf16": {"enabled": d.bf16}, "zero_optimization": zero,
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def deepspeed_config(cfg: Config, lr: float, weight_decay: float) -> dict:
    out = zero_config(cfg)
    if cfg.dist.cpu_adam:
        out["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay}}
    else:
        out["zero_force_ds_cpu_optimizer"] = False
    return out


def partitioned_model(cfg: Config, cls: type[nn.Module], config: dict,
                      weights: Mapping[str, StoredTensor]) -> nn.Module:
    """`cls.from_config(config)` holding `weights`, of which this rank only ever holds its ZeRO-3 partitions.

    Built under deepspeed.zero.Init, which partitions each module's parameters as soon as that module is made
    (their throwaway initial values, whole, one module at a time); then each rank reads from the files the
    elements of its own partition of each parameter (`read_partition`). A parameter gathers whole only when a
    forward runs its module (units.py's docstring)."""
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=zero_config(cfg)):
        model = cls.from_config(config)
    _plain_buffers(model, cls, config)
    names = set(model.state_dict())
    if set(weights) != names:
        files = sorted({str(t.file) for t in weights.values()})
        raise ValueError(f"{', '.join(files)} does not fit this model: missing {sorted(names - set(weights))[:5]}, "
                         f"unexpected {sorted(set(weights) - names)[:5]}")
    for name, p in model.named_parameters():
        read_partition(p, weights[name])
    with torch.no_grad():
        for name, buffer in model.named_buffers():  # buffers are whole on every rank
            if name in names:
                buffer.copy_(weights[name].read().view(buffer.shape))
    return model


def _plain_buffers(model: nn.Module, cls: type[nn.Module], config: dict) -> None:
    """zero.Init makes every floating tensor created in a module's __init__ in the training dtype, so buffers
    computed there differ from a plain model's (Wan's rotary tables, computed in float64, by up to 5e-6 in fp32
    and wholly wrong in bf16): take them from a build whose parameters stay on the meta device."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        plain = cls.from_config(config)
    for name, buffer in plain.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        setattr(module, leaf, buffer.to(getattr(module, leaf).device))


def read_partition(p: nn.Parameter, stored: StoredTensor) -> None:
    """Fill this rank's ZeRO-3 partition of `p` from `stored`, reading only its elements. DeepSpeed's layout
    (partition_parameters.py, `_partition_param`): the flattened tensor, padded to a multiple of the world size,
    is cut into equal partitions, rank i holding elements [i * size, (i + 1) * size)."""
    import deepspeed.comm as ds_comm

    if stored.shape != tuple(p.ds_shape):
        raise ValueError(f"{stored.file}: {stored.key} has shape {stored.shape}, the model's parameter "
                         f"{tuple(p.ds_shape)}")
    part = p.ds_tensor
    start = min(part.numel() * ds_comm.get_rank(group=p.ds_process_group), p.ds_numel)
    stop = min(start + part.numel(), p.ds_numel)
    with torch.no_grad():
        part.zero_()  # the padding past the tensor's end, as deterministic as the rest
        part[:stop - start].copy_(stored.read(start, stop))


def is_partitioned(model: nn.Module) -> bool:
    """Whether `model`'s parameters are ZeRO-3 partitions (`partitioned_model`)."""
    return any(hasattr(p, "ds_tensor") for p in model.parameters())


def predictor(module: AdapterModule, cfg: Config) -> Predictor:
    """A model that only predicts, never trains (a frozen target): called as `predictor(fn)` like a Trainable.
    A whole model is its own AdapterModule; a partitioned one runs in a DeepSpeed inference engine (ZeRO-3, no
    optimizer), whose hooks gather each block as it runs, as a Trainable's engine does."""
    return engine(module, config=zero_config(cfg)) if is_partitioned(module.model) else module


def engine(module: AdapterModule, **initialize: Any) -> Any:
    """A DeepSpeed engine running `module` (deepspeed.initialize's other arguments: `initialize`), with the
    root model's own parameters gathered for every call (units.py's docstring)."""
    import deepspeed

    wrapped, *_ = deepspeed.initialize(model=module, **initialize)
    for p in module.model.parameters(recurse=False):
        deepspeed.zero.register_external_parameter(module, p)
    return wrapped


def make_trainable(name: str, module: AdapterModule, cfg: Config, dist: Dist, lr: float,
                   weight_decay: float = 0.0) -> Trainable:
    if dist.deepspeed:
        return DeepSpeedTrainable(name, module, dist, cfg.dist.grad_clip, lr, weight_decay, cfg)
    return PlainTrainable(name, module, dist, cfg.dist.grad_clip, lr, weight_decay)
