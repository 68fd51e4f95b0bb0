"""Dense-teacher distillation while a sparse student trains: `DistillConfig` and the pure loss terms.

    loss = (1 - alpha) * CE + alpha * T^2 * KL(p_teacher^T || p_student^T) + hidden_weight * SquareHead

KL (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531: the T^2 factor keeps the soft
targets' gradients on the scale of the hard ones) and the SquareHead feature term (Kurtic et al. 2023, "Sparse
Fine-tuning for Inference Acceleration of Large Language Models", arXiv 2310.06927) are sums over the real tokens
(shifted `labels != -100`, as the causal LM loss shifts them) divided by what the model's cross-entropy is divided by:
`num_items_in_batch` when the `Trainer` passes it, else the number of real tokens. So all three terms stay consistent with
gradient accumulation and with `average_tokens_across_devices`. The runtime that puts them into the student's training
loss (through module hooks) is [`distiller.Distiller`].
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..io_utils import JsonConfigMixin

TEACHER_DTYPES = ("bfloat16", "float16", "float32")
IGNORE_INDEX = -100  # what transformers' ForCausalLMLoss ignores and Trainer's num_items_in_batch leaves out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class DistillConfig(JsonConfigMixin):
    """Distillation from a dense teacher while the (pruned) student fine-tunes; given to `ImportanceCallback(distill=...)`.

    The student's loss becomes `(1 - alpha) * CE + alpha * T^2 * KL + hidden_weight * SquareHead`, each term normalized
    like the model's own cross-entropy (see [`distiller.Distiller`]). That mixed loss is what the `Trainer` logs as
    `loss` (and `train_loss`): not comparable with a run without distillation. The callback logs the plain
    cross-entropy of the same forwards beside it as `distill/ce` (with `distill/kl` and `distill/hidden`).

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
