"""Dense-teacher distillation while a sparse student trains: `DistillConfig` and the `Distiller` that applies it.

A `TrainerCallback` cannot change the loss the `Trainer` back-propagates, but the `Trainer` takes that loss from the
model's output (`outputs["loss"]`). So [`Distiller.install`] wraps the student's `forward` (an instance attribute on the
model object the callback receives; DDP's `module(...)` reaches it) and replaces only `loss`:

    loss = (1 - alpha) * CE + alpha * T^2 * KL(p_teacher^T || p_student^T) + hidden_weight * SquareHead

KL (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531: the T^2 factor keeps the soft
targets' gradients on the scale of the hard ones) and the SquareHead feature term (Kurtic et al. 2023, "Sparse
Fine-tuning for Inference Acceleration of Large Language Models", arXiv 2310.06927) are sums over the real tokens
(shifted `labels != -100`, as the causal LM loss shifts them) divided by what the model's cross-entropy is divided by:
`num_items_in_batch` when the `Trainer` passes it, else the number of real tokens. So all three terms stay consistent with
gradient accumulation and with `average_tokens_across_devices`.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import _JsonConfigMixin

logger = logging.getLogger(__name__)

TEACHER_DTYPES = ("bfloat16", "float16", "float32")
IGNORE_INDEX = -100  # what transformers' ForCausalLMLoss ignores and Trainer's num_items_in_batch leaves out
_LOSS_ONLY_KWARGS = ("labels", "shift_labels", "num_items_in_batch")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class DistillConfig(_JsonConfigMixin):
    """Distillation from a dense teacher while the (pruned) student fine-tunes; given to `ImportanceCallback(distill=...)`.

    The student's loss becomes `(1 - alpha) * CE + alpha * T^2 * KL + hidden_weight * SquareHead`, each term normalized
    like the model's own cross-entropy (see [`Distiller`]).

    Args:
        teacher (`nn.Module` or `str`, *optional*):
            The dense teacher: a causal LM module, or a local folder / Hub id loaded with
            `AutoModelForCausalLM.from_pretrained`. `None` (default) = a frozen copy of the model as training begins
            (under peft LoRA without in-place pruning of the base weights: the same model with its adapters disabled, no
            copy). The teacher is put in eval mode with `requires_grad_(False)` and never updated; a module given here
            is moved to `teacher_dtype` / `teacher_device` in place when those are set.

            Resuming with `None`: the `Trainer` loads the checkpoint's (pruned, fine-tuned) weights before the
            callback sees the model, so a copy taken then would be another teacher. `ImportanceCallback` therefore
            writes the copy once, just before the run's first checkpoint, to `output_dir/_distill-teacher/`
            (`_distill-teacher-<name>/` for `ImportanceConfig(name=...)`; under a hyperparameter search, in the
            trial's folder)
            (`model.safetensors` in the teacher's dtype, HF shards above 5 GB, plus `teacher_config.json` with
            shapes, dtypes and CRC32s, written last; atomically, by rank 0; the leading `_` keeps it out of Hub pushes
            and checkpoint rotation). It costs the teacher's parameter bytes once per run (2 bytes per parameter with
            `teacher_dtype="bfloat16"`, 4 in float32: 7.6 GB for a 3.8B model in bf16), plus its CPU copy while
            written; runs that save no checkpoint write nothing. `resume_from_checkpoint` loads it (checked), so the
            resumed run distils from the dense model the run began with and ends bit for bit like an uninterrupted
            one. If it is missing or damaged, the resume is refused with a one-line error: pass the dense model as
            `teacher=` (a path or module) instead. Delete the folder when no resume is planned.
        alpha (`float`, *optional*, defaults to 0.5):
            Weight of the distillation term, in [0, 1]; `1 - alpha` weighs the cross-entropy on the labels.
        temperature (`float`, *optional*, defaults to 2.0):
            Softmax temperature T > 0 of both distributions; the KL term is multiplied by T^2 (Hinton et al. 2015).
        hidden_weight (`float`, *optional*, defaults to 0.0):
            Weight (>= 0) of SquareHead's per-layer normalized feature loss (arXiv 2310.06927); needs a teacher with the
            student's `num_hidden_layers` and `hidden_size`. The ratio is taken per token (see `squarehead_sum`);
            0 skips the hidden states entirely.
        teacher_dtype (`str`, *optional*):
            `"bfloat16"`, `"float16"` or `"float32"`; `None` keeps a module's dtype; the default copy and a teacher
            loaded from a path take the student's dtype (so float32 master weights mean a float32 teacher: pass
            `"bfloat16"` to halve its memory).
        teacher_device (`str` or `torch.device`, *optional*):
            Where the teacher runs; `None` = the student's device. Inputs and outputs are moved across as needed.

    Distillation needs the labels in the model's forward: with `label_smoothing_factor` or `compute_loss_func` the
    `Trainer` pops them and computes the loss itself, so those steps stay plain cross-entropy (warned once).

    Saved and read like the other configs (`save_pretrained` / `from_pretrained`: `distill_config.json`); a module
    teacher is saved by its name (see [`to_dict`]).

    Raises:
        ValueError: a field outside its allowed values (one line naming the field).
    """

    config_name = "distill_config.json"
    section = "distillation"

    teacher: Any = field(default=None, metadata={"help": "None (frozen copy of the student), an nn.Module, or a path."})
    alpha: float = field(default=0.5, metadata={"help": "Weight of the KL term in [0, 1]; 1 - alpha weighs CE."})
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature T > 0; KL is scaled by T^2."})
    hidden_weight: float = field(default=0.0, metadata={"help": "Weight >= 0 of SquareHead's hidden-state loss."})
    teacher_dtype: str | None = field(default=None, metadata={"help": "None, bfloat16, float16 or float32."})
    teacher_device: Any = field(default=None, metadata={"help": "Device of the teacher; None = the student's."})

    def __post_init__(self):
        if isinstance(self.teacher, os.PathLike):
            self.teacher = os.fspath(self.teacher)
        if not (self.teacher is None or isinstance(self.teacher, (nn.Module, str))):
            raise ValueError(f"teacher must be None, an nn.Module or a model path/Hub id; got {type(self.teacher).__name__}")
        if not _is_number(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be a float in [0, 1]; got {self.alpha!r}")
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a float > 0; got {self.temperature!r}")
        if not _is_number(self.hidden_weight) or self.hidden_weight < 0:
            raise ValueError(f"hidden_weight must be a float >= 0; got {self.hidden_weight!r}")
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be None or one of {TEACHER_DTYPES}; got {self.teacher_dtype!r}")
        if self.teacher_device is not None:
            try:
                self.teacher_device = str(torch.device(self.teacher_device))
            except (RuntimeError, TypeError):
                raise ValueError(f"teacher_device must be None or a torch device; got {self.teacher_device!r}") from None
        self.alpha, self.temperature, self.hidden_weight = float(self.alpha), float(self.temperature), float(self.hidden_weight)

    def to_dict(self) -> dict[str, Any]:
        """The scalar fields as JSON-ready values; a module teacher is named by its `name_or_path` (or class name).

        Returns:
            `dict[str, Any]`: `teacher`, `alpha`, `temperature`, `hidden_weight`, `teacher_dtype`, `teacher_device`.
        """
        teacher = self.teacher
        if isinstance(teacher, nn.Module):
            teacher = getattr(getattr(teacher, "config", None), "name_or_path", "") or type(teacher).__name__
        return {
            "teacher": teacher,
            "alpha": self.alpha,
            "temperature": self.temperature,
            "hidden_weight": self.hidden_weight,
            "teacher_dtype": self.teacher_dtype,
            "teacher_device": self.teacher_device,
        }


# ---------------------------------------------------------------------------------------------- pure math
def target_mask(labels: torch.Tensor | None, shift_labels: torch.Tensor | None, seq_len: int) -> torch.Tensor:
    """Positions whose logits predict a real token, exactly as transformers' `ForCausalLMLoss` shifts labels.

    Args:
        labels (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): unshifted labels; position i is scored
            against `labels[:, i + 1]` and the last position against nothing.
        shift_labels (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): already shifted labels (padding-free
            collators); used as they are when given.
        seq_len (`int`): number of logit positions.

    Returns:
        `torch.BoolTensor` of shape `(batch, seq_len)`: True where the target is not -100.
    """
    if shift_labels is not None:
        return shift_labels.ne(IGNORE_INDEX)
    mask = torch.zeros(labels.shape[:-1] + (seq_len,), dtype=torch.bool, device=labels.device)
    mask[..., : seq_len - 1] = labels[..., 1:seq_len].ne(IGNORE_INDEX)
    return mask


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over rows of KL(softmax(t / T) || softmax(s / T)), in float32 (Hinton et al. 2015).

    Args:
        student_logits (`torch.Tensor` of shape `(tokens, vocab)`): differentiable.
        teacher_logits (`torch.Tensor` of shape `(tokens, vocab)`): no gradient needed.
        temperature (`float`): T > 0.

    Returns:
        `torch.Tensor`: scalar float32, nats summed over the tokens (not yet multiplied by T^2).
    """
    return _KLSum.apply(student_logits.float(), teacher_logits.detach().float(), float(temperature))


class _KLSum(torch.autograd.Function):
    """KL sum with the closed-form gradient `(p_s - p_t) / T`.

    Autograd through `log_softmax` + `kl_div` gives `p_s * sum(p_t) - p_t`, which rounds to ~1e-9 instead of 0 when the
    two distributions are equal; Adam turns such noise into full-size steps. The closed form is exactly 0 there.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
        log_ps = F.log_softmax(s / temperature, dim=-1)
        log_pt = F.log_softmax(t / temperature, dim=-1)
        p_t = log_pt.exp()
        ctx.temperature = temperature
        ctx.save_for_backward(log_ps, p_t)
        return (p_t * (log_pt - log_ps)).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        log_ps, p_t = ctx.saved_tensors
        return (log_ps.exp() - p_t) * (grad / ctx.temperature), None, None


def squarehead_sum(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor]) -> torch.Tensor:
    """SquareHead (arXiv 2310.06927): per layer `||h_s - h_t||^2 / ||h_t||^2`, averaged over layers, summed over tokens.

    The ratio is taken per token (not per batch) so that the sum over tokens splits exactly across micro-batches and
    processes, like the cross-entropy does.

    Args:
        student_hidden (`list[torch.Tensor]`, each of shape `(tokens, hidden)`): one entry per decoder layer.
        teacher_hidden (`list[torch.Tensor]`, each of shape `(tokens, hidden)`): same layers, no gradient needed.

    Returns:
        `torch.Tensor`: scalar float32.
    """
    total = 0.0
    for hs, ht in zip(student_hidden, teacher_hidden):
        ht = ht.float()
        total = total + (((hs.float() - ht) ** 2).sum(-1) / (ht**2).sum(-1).clamp_min(1e-12)).sum()
    return total / len(student_hidden)


# ---------------------------------------------------------------------------------------------- stateful wrapper
def _move(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _model_dims(model: nn.Module) -> tuple[int | None, int | None, int | None]:
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return tuple(getattr(text, k, None) for k in ("vocab_size", "num_hidden_layers", "hidden_size"))


def _first_param(model: nn.Module) -> torch.Tensor:
    return next(p for p in model.parameters())


class Distiller:
    """Wraps a student's `forward` so that its training loss includes distillation from a frozen dense teacher.

    Lifecycle, driven by the callback: `setup(model)` on train begin (builds the teacher), `install(model)` (wraps
    `model.forward`), `pop_logs()` whenever logging, `remove()` on train end (restores `forward`, drops the teacher it
    built). Only training forwards that carry labels are changed (the student in train mode): evaluation loss and
    generation stay plain. Of the output, only `loss` changes; hidden states requested for SquareHead are dropped again
    unless the caller asked for them.

    A separate teacher (the default copy included) runs in its own dtype, outside the autocast wrapper accelerate puts
    on the student's `forward` under `bf16=True`; set `teacher_dtype="bfloat16"` to make it cheaper.

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
        self._wrapper = None
        self._had_instance_forward = False
        self._previous_forward = None
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
            teacher = _frozen_copy(model)
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
        """Wrap `model.forward` (call after [`setup`] with the same model).

        The wrapper carries `functools.wraps(forward)`, so `inspect.signature` (the `Trainer`'s `model_accepts_loss_kwargs`
        check) sees the original parameters.

        Args:
            model (`nn.Module`): the model given to [`setup`].

        Raises:
            RuntimeError: `setup` was not called, or the distiller is already installed.
        """
        if self._wrapper is not None:
            raise RuntimeError("Distiller.install: already installed; call remove() first")
        if self._setup_model is not model or (self.teacher is None and not self.uses_disabled_adapters):
            raise RuntimeError("Distiller.install: call setup(model) with this model first")
        original = model.forward
        self._had_instance_forward = "forward" in model.__dict__  # e.g. accelerate's autocast wrapper
        self._previous_forward = model.__dict__.get("forward")
        self._model = model

        @functools.wraps(original)
        def forward(*args, **kwargs):
            if self._wrapper is not forward or not model.training:
                return original(*args, **kwargs)
            return self._distill_forward(original, args, kwargs)

        self._wrapper = forward
        model.forward = forward

    def remove(self) -> None:
        """Restore the model's own `forward` and drop the teacher this distiller built (or was given)."""
        model, wrapper = self._model, self._wrapper
        if model is not None and wrapper is not None:
            if model.__dict__.get("forward") is wrapper:
                if self._had_instance_forward:
                    model.forward = self._previous_forward
                else:
                    del model.forward
            else:
                # Someone wrapped forward on top of ours: leave their wrapper, ours turns into a pass-through.
                logger.warning("Distiller.remove: model.forward was re-wrapped after install; distillation disabled")
        self._model = self._wrapper = self._previous_forward = self._setup_model = None
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

    # ------------------------------------------------------------------ the forward
    def _teacher_forward(self, original, args, kwargs, want_hidden: bool):
        kwargs = {k: v for k, v in kwargs.items() if k not in _LOSS_ONLY_KWARGS}
        kwargs["use_cache"] = False
        kwargs["output_hidden_states"] = want_hidden
        with torch.no_grad():
            if self.uses_disabled_adapters:
                # The teacher is the student itself: run it in eval mode (no dropout, no importance hooks firing).
                was_training = [m for m in self._model.modules() if m.training]
                for m in was_training:
                    m.training = False
                try:
                    with self._model.disable_adapter():
                        return original(*args, **kwargs)
                finally:
                    for m in was_training:
                        m.training = True
            device = _first_param(self.teacher).device
            return self.teacher(*[_move(a, device) for a in args], **{k: _move(v, device) for k, v in kwargs.items()})

    def _distill_forward(self, original, args, kwargs):
        labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
        if labels is None and shift_labels is None and args:
            try:
                labels = inspect.signature(original).bind_partial(*args, **kwargs).arguments.get("labels")
            except TypeError:
                labels = None
        if labels is None and shift_labels is None:
            if not self._warned_no_labels:
                # The Trainer pops labels itself with label_smoothing_factor or compute_loss_func: say so once.
                logger.warning("Distiller: a training forward without labels is left plain (no distillation); with "
                               "label_smoothing_factor or compute_loss_func the Trainer never passes labels")
                self._warned_no_labels = True
            return original(*args, **kwargs)
        cfg = self.config
        want_hidden = cfg.hidden_weight > 0
        user_hidden = bool(kwargs.get("output_hidden_states"))
        if want_hidden:
            kwargs = {**kwargs, "output_hidden_states": True}
        out = original(*args, **kwargs)
        if not isinstance(out, dict) or out.get("loss") is None or out.get("logits") is None:
            raise TypeError("Distiller needs the student to return a ModelOutput with `loss` and `logits`; turn off "
                            "what drops them while distilling (return_dict=False, a fused cross-entropy kernel such as "
                            "use_liger_kernel=True)")
        t_out = self._teacher_forward(original, args, kwargs, want_hidden)

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
    # Prompt-learning adapters are disabled by swapping `forward` itself, which a wrapped forward cannot follow.
    return not model.peft_config[model.active_adapter].is_prompt_learning


def _frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model)
    for m in teacher.modules():
        # An instance-level forward (accelerate's autocast wrapper, a Distiller) closes over the ORIGINAL module:
        # calling it would run the student. Fall back to the class's forward on the copy.
        m.__dict__.pop("forward", None)
        m.__dict__.pop("_original_forward", None)
    return teacher


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
        raise ValueError(f"The saved distillation teacher does not fit this model ({len(missing)} weights missing, e.g. "
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
