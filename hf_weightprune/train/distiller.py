"""`Distiller`: puts the distillation terms of a [`DistillConfig`] into a student's training loss, through hooks.

A `TrainerCallback` cannot change the loss the `Trainer` back-propagates, but the `Trainer` takes that loss from the
model's output (`outputs["loss"]`). So [`Distiller.install`] registers two public module hooks on the model the callback
receives (DDP's `module(...)` and a compiled model's traced `__call__` run them): a forward pre-hook that runs the
teacher on the batch (and asks the student for its hidden states when SquareHead needs them), and a forward hook that
returns the student's output with `loss` replaced by the mixed loss of [`distill`]. Both are removable handles; the
model's `forward` attribute is never touched.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

import torch
from torch import nn

from ..collect.activations import HookGuards
from ..io_utils import plural
from .distill import DistillConfig, kl_sum, squarehead_sum, target_mask

logger = logging.getLogger(__name__)

_LOSS_ONLY_KWARGS = ("labels", "shift_labels", "num_items_in_batch")


def _move(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _model_dims(model: nn.Module) -> tuple[int | None, int | None, int | None]:
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return tuple(getattr(text, k, None) for k in ("vocab_size", "num_hidden_layers", "hidden_size"))


def _first_param(model: nn.Module) -> torch.Tensor:
    return next(p for p in model.parameters())


class Distiller:
    """Hooks on a student that put distillation from a frozen dense teacher into its training loss.

    Lifecycle, driven by the callback: `setup(model)` on train begin (builds the teacher), `install(model)` (registers
    the hooks), `pop_logs()` whenever logging, `remove()` on train end (removes the hooks, drops the teacher it built).
    Only training forwards that carry labels are changed (the student in train mode): evaluation loss and generation
    stay plain. Of the output, only `loss` changes; hidden states requested for SquareHead are dropped again unless
    the caller asked for them. Gradient checkpointing re-runs decoder layers, never the model's own hooks, so the
    teacher runs once per forward.

    A separate teacher (the default copy included) runs in its own dtype, outside the autocast wrapper accelerate puts
    on the student's `forward` under `bf16=True`; set `teacher_dtype="bfloat16"` to make it cheaper. The teacher that
    is the student with its peft adapters disabled runs through the student's `forward`, under that wrapper.

    State across steps, for resuming: the teacher only. Each loss term is computed from the batch alone (no running
    statistics, no RNG: the teacher runs in eval mode); the logged sums of [`pop_logs`] restart at a resume, as the
    `Trainer`'s own logged loss does. A default teacher (a copy) is saved and restored by the callback through
    [`teacher_state_dict`] and `setup(..., teacher_state=...)`.

    Args:
        config ([`DistillConfig`]): alpha, temperature, hidden_weight and the teacher.

    Raises:
        TypeError: `config` is not a `DistillConfig`; or, in a training forward, the student returned a tuple
            (`return_dict=False`) instead of a `ModelOutput`.
    """

    def __init__(self, config: DistillConfig):
        if not isinstance(config, DistillConfig):
            raise TypeError(f"Distiller needs a DistillConfig; got {type(config).__name__}")
        self.config = config
        self.teacher: nn.Module | None = None
        self.uses_disabled_adapters = False
        self.teacher_is_copy = False  # the teacher is the default frozen copy (its weights exist nowhere else)
        self._model: nn.Module | None = None
        self._setup_model: nn.Module | None = None
        self._warned_no_labels = False
        self._handles: list = []
        self._guards = HookGuards()
        self._pending = None  # (labels, shift_labels, user asked for hidden states, teacher output) of this forward
        self._pending_state: dict[str, torch.Tensor] | None = None  # from `load_state_dict`, until `setup`
        self._reset_logs()

    # ------------------------------------------------------------------ setup
    def copies_model(self, model: nn.Module, prunes_base: bool = True) -> bool:
        """Whether [`setup`] with these arguments builds the teacher as a frozen copy of `model` (`teacher=None`).

        Such a teacher exists only in memory: to resume a run exactly, its weights must be saved
        ([`teacher_state_dict`]) and given back to `setup(..., teacher_state=...)`.
        """
        if self.config.teacher is not None:
            return False
        student_device = _first_param(model).device
        device = torch.device(self.config.teacher_device) if self.config.teacher_device is not None else student_device
        return not (not prunes_base and _can_disable_adapters(model) and self.config.teacher_dtype is None
                    and device == student_device)

    def setup(self, model: nn.Module, prunes_base: bool = True,
              teacher_state: dict[str, torch.Tensor] | None = None) -> nn.Module | None:
        """Build (or check) the teacher for `model`, before any training step.

        Args:
            model (`nn.Module`): the model the callback receives (the unwrapped model, or the `PeftModel` under peft).
            prunes_base (`bool`, *optional*, defaults to `True`): whether the base weights change in place during
                training (pruned, or trained). When `False` and `model` is a peft model with non-prompt adapters (and
                no `teacher_dtype` / other `teacher_device` is asked for), the default teacher is the base model, run
                as `model` with its adapters disabled: no copy.
            teacher_state (`dict[str, torch.Tensor]`, *optional*): when resuming with the default teacher (see
                [`copies_model`]): the [`teacher_state_dict`] saved by the run that began training. The copy of `model`
                (which now holds the resumed, pruned weights) is overwritten with it, so the resumed run distils from
                the dense model the run started from. Ignored for any other teacher.

        Returns:
            `nn.Module` or `None`: the teacher module, or `None` when the teacher is `model` with adapters disabled.

        Raises:
            ValueError: the teacher is `model` itself, its vocabulary differs from the student's, or `hidden_weight > 0`
                with a different `num_hidden_layers` / `hidden_size` (a path is checked from its config, before loading);
                or `teacher_state` does not fit the copy (other names, shapes or dtypes: one line naming the first).
        """
        cfg = self.config
        if teacher_state is None:
            teacher_state = self._pending_state
        self._pending_state = None
        if cfg.teacher is model:
            raise ValueError("DistillConfig.teacher is the student itself: pass teacher=None for a frozen copy of it")
        self._setup_model = model
        student_device = _first_param(model).device
        device = torch.device(cfg.teacher_device) if cfg.teacher_device is not None else student_device
        dtype = getattr(torch, cfg.teacher_dtype) if cfg.teacher_dtype else None
        self.teacher, self.uses_disabled_adapters, self.teacher_is_copy = None, False, False
        if cfg.teacher is None:
            if not self.copies_model(model, prunes_base):
                self.uses_disabled_adapters = True
                return None
            teacher = copy.deepcopy(model)  # run through its class's `forward`: see `_teacher_forward`
            self.teacher_is_copy = True
        elif isinstance(cfg.teacher, str):
            from transformers import AutoConfig, AutoModelForCausalLM

            try:
                teacher_config = AutoConfig.from_pretrained(cfg.teacher)
            except (OSError, ValueError) as e:  # transformers' message spans lines and lists remedies
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(f"DistillConfig.teacher={cfg.teacher!r} cannot be loaded as a model ({first}); pass "
                                 "a local model folder, a Hub id this machine can reach, or a module") from None
            self._check_compatible(model, teacher_config, f" ({cfg.teacher})")  # before loading the weights
            teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=dtype or _first_param(model).dtype)
        else:
            teacher = cfg.teacher
        self._check_compatible(model, teacher)
        teacher.eval().requires_grad_(False)
        self.teacher = teacher.to(device=device, dtype=dtype) if dtype is not None else teacher.to(device)
        if self.teacher_is_copy and teacher_state is not None:
            _load_unique_state(self.teacher, teacher_state)
        return self.teacher

    def teacher_state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher's `state_dict` without aliases (a tied weight once, under its first name), as it runs.

        Returns:
            `dict[str, torch.Tensor]`: detached tensors on the teacher's device, in `teacher_dtype` when set (so a
            bfloat16 teacher takes 2 bytes per parameter); what [`setup`] takes back as `teacher_state`.

        Raises:
            RuntimeError: no separate teacher module (before [`setup`], or the teacher is the student with its
                adapters disabled).
        """
        if self.teacher is None:
            raise RuntimeError("Distiller.teacher_state_dict: no teacher module (call setup first; a teacher that is "
                               "the student with adapters disabled has no state of its own)")
        return _unique_state(self.teacher)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the default teacher's weights ([`teacher_state_dict`]), which exist nowhere else.

        Raises:
            RuntimeError: as [`teacher_state_dict`].
        """
        return self.teacher_state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Resuming with the default teacher: the saved [`state_dict`], taken by the next [`setup`] as `teacher_state`."""
        self._pending_state = dict(state)

    def _check_compatible(self, model: nn.Module, teacher: Any, what: str = "") -> None:
        vocab, layers, hidden = _model_dims(model)
        t_vocab, t_layers, t_hidden = _model_dims(teacher if isinstance(teacher, nn.Module) else _Holder(teacher))
        if vocab is not None and t_vocab is not None and vocab != t_vocab:
            raise ValueError(f"DistillConfig.teacher{what} has vocab_size {t_vocab} but the student has {vocab}: "
                             "use a teacher with the student's tokenizer and vocabulary")
        if self.config.hidden_weight > 0 and (layers, hidden) != (t_layers, t_hidden):
            raise ValueError(f"DistillConfig.hidden_weight > 0 needs the student's num_hidden_layers/hidden_size "
                             f"({layers}/{hidden}) in the teacher{what} (it has {t_layers}/{t_hidden}); "
                             "use such a teacher or set hidden_weight=0")

    # ------------------------------------------------------------------ install / remove
    def install(self, model: nn.Module) -> None:
        """Register the distillation hooks on `model` (call after [`setup`] with the same model).

        A forward pre-hook and a forward hook (`with_kwargs=True`), so the Trainer's `inspect.signature(model.forward)`
        (`model_accepts_loss_kwargs`) and whatever instance-level `forward` the model carries (accelerate's autocast
        wrapper under `bf16=True`) stay as they are: the hooks run around it, outside the autocast. While installed,
        compiled graphs guard on module hooks ([`HookGuards`]), so a graph compiled for this model class without
        them (an earlier compiled run in the process) is not reused.

        Args:
            model (`nn.Module`): the model given to [`setup`].

        Raises:
            RuntimeError: `setup` was not called, or the distiller is already installed.
        """
        if self._handles:
            raise RuntimeError("Distiller.install: already installed; call remove() first")
        if self._setup_model is not model or (self.teacher is None and not self.uses_disabled_adapters):
            raise RuntimeError("Distiller.install: call setup(model) with this model first")
        self._model = model
        self._handles = [model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                         model.register_forward_hook(self._after_forward, with_kwargs=True)]
        self._guards.acquire(model)

    def remove(self) -> None:
        """Remove the hooks (the dynamo setting goes back) and drop the teacher this distiller built (or was given)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._guards.release()
        self._pending = None
        self._model = self._setup_model = None
        self.teacher, self.uses_disabled_adapters, self.teacher_is_copy = None, False, False

    # ------------------------------------------------------------------ logs
    def _reset_logs(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = {}
        self._tokens = 0

    def pop_logs(self) -> dict[str, float]:
        """Running means since the last call, per real token, then reset.

        Returns:
            `dict[str, float]`: `distill/kl` (KL at temperature T in nats, without T^2 or alpha), `distill/ce` (the
            student's cross-entropy) and, with `hidden_weight > 0`, `distill/hidden` (SquareHead, averaged over layers);
            empty when no training forward ran. Local to this process (reduce across ranks if needed).
        """
        if not self._tokens:
            return {}
        tokens = float(self._tokens)
        logs = {k: float(v) / tokens for k, v in self._sums.items()}
        self._reset_logs()
        return logs

    def _log(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self._sums[name] = self._sums[name] + value if name in self._sums else value  # stays on device: no sync

    # ------------------------------------------------------------------ the hooks
    def _teacher_forward(self, module: nn.Module, args, kwargs, want_hidden: bool):
        kwargs = {k: v for k, v in kwargs.items() if k not in _LOSS_ONLY_KWARGS}
        kwargs["use_cache"] = False
        kwargs["output_hidden_states"] = want_hidden
        with torch.no_grad():
            if self.uses_disabled_adapters:
                # The teacher is the student itself: its `forward` (not `module(...)`, which would run these hooks
                # again), in eval mode (no dropout, no importance hooks firing), with the adapters disabled.
                was_training = [m for m in module.modules() if m.training]
                for m in was_training:
                    m.training = False
                try:
                    with module.disable_adapter():
                        return module.forward(*args, **kwargs)
                finally:
                    for m in was_training:
                        m.training = True
            teacher = self.teacher
            device = _first_param(teacher).device
            args = [_move(a, device) for a in args]
            kwargs = {k: _move(v, device) for k, v in kwargs.items()}
            if self.teacher_is_copy:
                # The copy's class `forward`: `copy.deepcopy` also copied the student's instance-level `forward` (under
                # `bf16=True`, accelerate's autocast wrapper), which would run the teacher under the student's autocast
                # (or, if it closes over the student, run the student). This is the one case that knows a wrapper exists.
                return type(teacher).forward(teacher, *args, **kwargs)
            return teacher(*args, **kwargs)

    def _before_forward(self, module: nn.Module, args, kwargs):
        """Forward pre-hook: for a training forward with labels, run the teacher and ask for hidden states if needed."""
        self._pending = None
        if not module.training:
            return None
        labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
        if labels is None and shift_labels is None and args:
            try:
                labels = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get("labels")
            except TypeError:
                labels = None
        if labels is None and shift_labels is None:
            if not self._warned_no_labels:
                # The Trainer pops labels itself with label_smoothing_factor or compute_loss_func: say so once.
                logger.warning("Distiller: a training forward without labels is left plain (no distillation); with "
                               "label_smoothing_factor or compute_loss_func the Trainer never passes labels")
                self._warned_no_labels = True
            return None
        want_hidden = self.config.hidden_weight > 0
        # Before the student: under FSDP the root's parameters are gathered here too, and the teacher (eval mode, no
        # dropout) draws no random numbers, so the student's forward sees the same RNG stream either way.
        t_out = self._teacher_forward(module, args, kwargs, want_hidden)
        user_hidden = bool(kwargs.get("output_hidden_states"))
        self._pending = (labels, shift_labels, user_hidden, t_out)
        if want_hidden and not user_hidden:
            return args, {**kwargs, "output_hidden_states": True}
        return None

    def _after_forward(self, module: nn.Module, args, kwargs, out):
        """Forward hook: the student's output with `loss` replaced by the mixed loss (only after `_before_forward`)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        labels, shift_labels, user_hidden, t_out = pending
        if not isinstance(out, dict) or out.get("loss") is None or out.get("logits") is None:
            raise TypeError("Distiller needs the student to return a ModelOutput with `loss` and `logits`; turn off "
                            "what drops them while distilling (return_dict=False, a fused cross-entropy kernel such as "
                            "use_liger_kernel=True)")
        cfg = self.config
        want_hidden = cfg.hidden_weight > 0
        logits = out["logits"]
        mask = target_mask(labels, shift_labels, logits.shape[-2]).to(logits.device)
        n_real = mask.sum()
        num_items = kwargs.get("num_items_in_batch")
        # The model's CE is sum/num_items_in_batch when given, else a mean over real tokens: divide the same way.
        denom = n_real.clamp_min(1) if num_items is None else _move(torch.as_tensor(num_items), logits.device)
        ce = out["loss"]
        t_logits = t_out["logits"].to(logits.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.alpha > 0):
            kl = kl_sum(logits[mask], t_logits[mask], cfg.temperature)
        self._log("distill/kl", kl)
        self._log("distill/ce", ce * denom)
        self._tokens += n_real.detach()

        # Terms with a zero weight are left out (not multiplied by 0): alpha=0 trains exactly like no distillation.
        loss = (1.0 - cfg.alpha) * ce if cfg.alpha < 1 else 0.0
        if cfg.alpha > 0:
            loss = loss + cfg.alpha * cfg.temperature**2 * kl / denom
        if want_hidden:
            hs = [h[mask] for h in out["hidden_states"][1:]]  # [0] is the embedding output, identical by design
            ht = [h.to(logits.device)[mask] for h in t_out["hidden_states"][1:]]
            hidden = squarehead_sum(hs, ht)
            self._log("distill/hidden", hidden)
            loss = loss + cfg.hidden_weight * hidden / denom

        fields_ = {**out, "loss": loss.to(ce.dtype)}
        if want_hidden and not user_hidden:
            fields_.pop("hidden_states", None)
        return type(out)(**fields_)


class _Holder:
    """Lets `_model_dims` read a bare `PretrainedConfig` like a model's `.config`."""

    def __init__(self, config):
        self.config = config


def _can_disable_adapters(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    if not isinstance(model, PeftModel):
        return False
    # Prompt-learning adapters are disabled by swapping `forward` itself: not tried under these hooks, so they get a copy.
    return not model.peft_config[model.active_adapter].is_prompt_learning


def _unique_state(module: nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights (`lm_head` = `embed_tokens`) share storage: safetensors refuses aliases, and one copy is enough.
    seen, out = set(), {}
    for name, t in module.state_dict().items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen.add(key)
            out[name] = t.detach()
    return out


def _load_unique_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (from [`_unique_state`] of a module of the same structure) into `module`, checked first."""
    target = _unique_state(module)
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    if missing or unexpected:
        raise ValueError(f"The saved distillation teacher does not fit this model ({plural(len(missing), 'weight')} missing, e.g. "
                         f"{(missing or [None])[0]}; {len(unexpected)} unexpected, e.g. {(unexpected or [None])[0]}): "
                         "resume with the model the run started from, or pass DistillConfig(teacher=...)")
    for name, t in target.items():
        if state[name].shape != t.shape or state[name].dtype != t.dtype:
            raise ValueError(f"The saved distillation teacher's {name} is {state[name].dtype} {list(state[name].shape)}, "
                             f"the teacher now {t.dtype} {list(t.shape)}: resume with the same model and "
                             "DistillConfig(teacher_dtype=...) as the run that wrote it")
    with torch.no_grad():
        for name, t in target.items():
            t.copy_(state[name])
