"""`ImportanceCallback`: Trainer events -> scorer updates -> importance files next to every checkpoint.

Lifecycle (one sitting to read):
- `on_train_begin`: find the tracked weights, plan which rank owns which buffer, restore the state from the
  checkpoint being resumed (found from `state.global_step`), register forward hooks for `wanda`.
- `on_pre_optimizer_step`: gradient criteria read gradients here (accumulated, unscaled, clipped, reduced);
  `wanda` commits the activation sums of the step.
- `on_step_end`: weight criteria (`temporal_magnitude`) read the weights the optimizer just wrote.
- `on_epoch_end`: the per-epoch sample of the paper (`per_epoch=True`).
- `on_step_end` / `on_epoch_end` when `control.should_save`: write the importance to a staging folder before the
  Trainer saves (its Hub push of `checkpoint-N` starts before `on_save`); `on_push_begin` / `on_save` move it into
  `checkpoint-N/importance/`. Saves decided later (e.g. `save_strategy="best"`) are written in `on_save`.
- `on_train_end`: write `output_dir/importance/`.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import sys
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import TrainerCallback
from transformers.trainer_utils import has_length

from . import distributed as D
from . import state as S
from .config import ImportanceConfig
from .importance import Importance
from .matching import TrackedWeight, find_tracked_weights
from .scorers import get_scorer
from .scorers.wanda import activation_sq_sum

logger = logging.getLogger(__name__)

SAVE_ERROR_CHOICES = ("raise", "warn")
RESUME_MISMATCH_CHOICES = ("raise", "restart")
# Under `output_dir`: the leading "_" keeps it out of the Trainer's Hub pushes (`ignore_patterns=["_*", ...]`)
# and out of its `checkpoint-*` globs (resume, rotation).
STAGING_DIR = "_importance-staging"


def _holders(obj, attr: str):
    """Objects whose attribute `attr` is `obj`, found through the garbage collector."""
    for ref in gc.get_referrers(obj):
        if isinstance(ref, dict) and ref.get(attr) is obj:  # an instance __dict__: find its instance
            ref = next((o for o in gc.get_referrers(ref) if getattr(o, "__dict__", None) is ref), None)
        if ref is not None and not isinstance(ref, (dict, list)) and getattr(ref, attr, None) is obj:
            yield ref


class ImportanceCallback(TrainerCallback):
    """Accumulate per-parameter importance while a `transformers.Trainer` trains.

    Args:
        config (`ImportanceConfig` or `dict`, *optional*): what to track; defaults to `ImportanceConfig()`.
        schedule (`PruneSchedule`, *optional*): prune gradually during training (masks held after each step).
        on_save_error (`str`, *optional*, defaults to `"raise"`): `"raise"` stops training when the importance
            cannot be written (disk full, read-only folder); `"warn"` logs and goes on.
        on_resume_mismatch (`str`, *optional*, defaults to `"raise"`): what to do when the resumed checkpoint
            holds importance written with another config (or none): `"raise"`, or `"restart"` from zero.
        resume_from (`str`, *optional*): folder to restore from when resuming from a checkpoint outside
            `args.output_dir` (the Trainer does not tell callbacks which folder it resumed from).
        offload_to_cpu (`bool`, *optional*, defaults to `False`): keep the state in CPU memory (weights are
            copied over chunk by chunk at each sample), for models whose state would not fit beside them.
    """

    def __init__(
        self,
        config: ImportanceConfig | dict | None = None,
        *,
        schedule=None,
        on_save_error: str = "raise",
        on_resume_mismatch: str = "raise",
        resume_from: str | None = None,
        offload_to_cpu: bool = False,
    ):
        if isinstance(config, dict):
            config = ImportanceConfig(**config)
        self.config = config if config is not None else ImportanceConfig()
        if self.config.per_epoch and get_scorer(self.config.criterion).source != "weights":
            raise ValueError(
                f"per_epoch=True samples the weights at each epoch end; criterion {self.config.criterion!r} "
                "reads gradients or activations during steps: use every_n_steps instead"
            )
        if on_save_error not in SAVE_ERROR_CHOICES:
            raise ValueError(f"on_save_error must be one of {SAVE_ERROR_CHOICES}; got {on_save_error!r}")
        if on_resume_mismatch not in RESUME_MISMATCH_CHOICES:
            raise ValueError(f"on_resume_mismatch must be one of {RESUME_MISMATCH_CHOICES}; got {on_resume_mismatch!r}")
        self.scorer = get_scorer(self.config.criterion)
        self.schedule = schedule
        self.on_save_error = on_save_error
        self.on_resume_mismatch = on_resume_mismatch
        self.resume_from = resume_from
        self.offload_to_cpu = offload_to_cpu
        self._tracked: list[TrackedWeight] = []
        self._trial_dir: str | None = None  # this hyperparameter_search trial's folder
        self._hooks: list[Any] = []
        self._staged_step: int | None = None
        self._stage_attempt: int | None = None  # the step whose importance was (tried to be) staged
        self._reset_state()

    # ------------------------------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self._states: dict[str, torch.Tensor] = {}  # buffers this rank owns
        self._owners: dict[str, int] = {}  # D.ALL_RANKS: FSDP2 row-sharded, every rank owns its rows
        self._writers: dict[str, int] = {}
        self._rows: dict[str, tuple[int, int]] = {}  # FSDP2: this rank's (row_offset, rows) of each weight
        self._meta: dict[str, Any] = {"global_step": 0, "num_samples": 0, "weight_sum": 0.0, "last_step": 0,
                                      "skipped": 0, "tokens": {}, "max_steps": None, "window_start": None,
                                      "epoch": 0, "epoch_step": None}
        self._step_acts: dict[str, torch.Tensor] = {}  # wanda: this step's activation sums, committed at the step
        self._step_tokens: dict[str, int] = {}
        self._last_input: tuple[torch.Tensor, torch.Tensor] | None = None  # wanda: the last input and its sums
        self._collect = False
        self._seed = 0

    @property
    def tracked_names(self) -> list[str]:
        return [t.name for t in self._tracked]

    @property
    def _rank(self) -> int:
        return D.rank_and_world()[0]

    def state_bytes(self) -> int:
        """Bytes of accumulator state held by this rank."""
        return S.state_dict_bytes(self._states)

    def _setup(self, args, state, model) -> None:
        if self._tracked:
            n = self._meta["num_samples"]
            # A second train() restarts global_step at 0: continuing would mix two time axes.
            logger.warning("ImportanceCallback: train() called again; restarting importance (discarding %d samples)", n)
        self._remove_hooks()
        self._reset_state()
        self._seed = int(getattr(args, "seed", 0))
        self._tracked = find_tracked_weights(model, self.config.target_modules, self.config.exclude_modules)
        if self.scorer.needs_grad:
            frozen = [t.name for t in self._tracked if not t.param.requires_grad]
            if frozen:
                raise ValueError(
                    f"criterion {self.config.criterion!r} needs weight gradients, but {len(frozen)} tracked weights are "
                    f"frozen (e.g. {frozen[0]}; LoRA freezes base weights): use criterion='wanda' or 'temporal_magnitude'"
                )
        D.check_supported(model, args, needs_grad=self.scorer.needs_grad, criterion=self.config.criterion)
        rank, world = D.rank_and_world()
        per_rank = self.scorer.source in ("weights", "grads", "final")
        if per_rank:  # FSDP2 weights are already split by rows: each rank keeps the state of its own rows
            self._rows = {t.name: rows for t in self._tracked if (rows := D.row_shard(t.param)) is not None}
        replicated = {t.name: t.param.numel() for t in self._tracked if t.name not in self._rows}
        self._owners = D.partition(replicated, world if per_rank else 1) | dict.fromkeys(self._rows, D.ALL_RANKS)
        # Who writes each buffer at save: its owner; activation sums (identical on all ranks once all-reduced) are
        # spread over the ranks by the same size-balanced partition.
        self._writers = self._owners if per_rank else D.partition(replicated, world)
        dtype = torch.float32 if self.scorer.source == "activations" else getattr(torch, self.config.state_dtype)
        for t in self._tracked:
            if self._owners[t.name] in (rank, D.ALL_RANKS) or not per_rank:
                device = "cpu" if self.offload_to_cpu else t.param.device
                shape = self.scorer.state_shape(D.local_tensor(t.param) if per_rank else t.param)
                self._states[t.name] = torch.zeros(shape, dtype=dtype, device=device)
        self._meta["max_steps"] = int(state.max_steps)
        self._meta["epoch"] = int(state.epoch or 0)  # epochs completed (resumed runs start past 0)
        self._meta["window_start"] = self._window_start(state)
        if self.scorer.source == "activations":
            if getattr(args, "torch_compile", False) or hasattr(model, "_orig_mod"):
                # Dynamo does not guard on module hooks: a graph cached by an earlier compiled run of the same
                # model class would be reused and these hooks would never fire. Start from an empty cache.
                torch._dynamo.reset()
            self._register_hooks()

    def _window_start(self, state) -> int | None:
        """First step (or epoch) whose sample counts: only the last `window` samples of the planned run do.

        Because the end of training is known (`state.max_steps`), samples before the window are simply not
        taken: the window costs no memory beyond the one buffer.
        """
        k = self.config.window
        if k is None:
            return None
        if self.config.per_epoch:
            if state.num_train_epochs >= sys.maxsize:  # Trainer's value for a dataset without __len__
                raise ValueError(
                    "window with per_epoch=True needs the number of epochs, but the train dataset has no length "
                    "(IterableDataset): use every_n_steps with window, or per_epoch without window"
                )
            return max(1, int(state.num_train_epochs) - k + 1)
        n = self.config.every_n_steps
        last = (int(state.max_steps) // n) * n
        return max(n, last - (k - 1) * n)

    def _samples_at(self, t: int) -> bool:
        start = self._meta["window_start"]
        return t % self.config.every_n_steps == 0 and (start is None or t >= start)

    # ------------------------------------------------------------------------------------ wanda hooks
    def _register_hooks(self) -> None:
        for t in self._tracked:
            self._hooks.append(t.module.register_forward_hook(self._make_hook(t.name)))

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            # Training forwards only: not eval (eval mode), not the recomputation that gradient checkpointing runs
            # inside backward (it would count every token twice). Grad mode cannot tell: reentrant checkpointing
            # runs the first forward under no_grad. A compiled forward is never such a recomputation, and the
            # check would break the graph there.
            if not (self._collect and module.training):
                return
            if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
                return
            x = inputs[0]
            # q/k/v (and gate/up) projections receive the same input tensor: reduce it once.
            last = None if torch.compiler.is_compiling() else self._last_input
            if last is not None and last[0] is x:
                sq = last[1]
            else:
                sq = activation_sq_sum(x)
                if not torch.compiler.is_compiling():
                    self._last_input = (x, sq)
            if name in self._step_acts:
                self._step_acts[name].add_(sq.to(self._step_acts[name].device))
            else:
                self._step_acts[name] = sq.to(self._states[name].device, copy=True)  # sq may be shared (q/k/v)
            self._step_tokens[name] = self._step_tokens.get(name, 0) + x.numel() // x.shape[-1]

        return hook

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _commit_activations(self, t: int) -> None:
        acts, tokens = self._step_acts, self._step_tokens
        self._step_acts, self._step_tokens, self._last_input = {}, {}, None
        if not acts:
            if self._collect and self._hooks:
                # Fail at the first such step rather than at the end ("no training tokens"): nothing would count.
                raise RuntimeError(
                    f"ImportanceCallback({self.config.criterion!r}): step {t} was sampled but none of the "
                    f"{len(self._hooks)} forward hooks on the tracked modules fired. Was the forward run outside "
                    "the modules (a compiled graph cached before the hooks were added, a replaced forward)?"
                )
            return
        names = list(acts)
        bad = self.config.skip_nonfinite and not all(bool(torch.isfinite(acts[n]).all()) for n in names)
        if D.any_rank(bad):  # every rank skips the same samples, so their counts stay equal
            self._meta["skipped"] += 1
            logger.warning("ImportanceCallback: non-finite activations at step %d; sample skipped", t)
            return
        with torch.no_grad():
            self.scorer.update_([self._states[n] for n in names], [acts[n] for n in names], None, t)
        for n in names:
            self._meta["tokens"][n] = self._meta["tokens"].get(n, 0) + tokens[n]
        self._record_sample(t, t)

    # --------------------------------------------------------------------------------------- sampling
    def _record_sample(self, t: int, step: int) -> None:
        self._meta["num_samples"] += 1
        self._meta["weight_sum"] += float(t)
        self._meta["last_step"] = step

    def _owned(self) -> list[TrackedWeight]:
        return [t for t in self._tracked if t.name in self._states]

    def _sample(self, t: int, step: int, use_grads: bool) -> None:
        owned = self._owned()
        if use_grads:
            pairs = [(tw, tw.param.grad) for tw in owned if tw.param.grad is not None]
            grads = [D.local_tensor(g.detach()) for _, g in pairs]
            bad = self.config.skip_nonfinite and bool(grads) and not self._all_finite(grads)
            if D.any_rank(bad):
                self._meta["skipped"] += 1
                logger.warning("ImportanceCallback: non-finite gradients at step %d; sample skipped", step)
                return
            owned = [tw for tw, _ in pairs]
        else:
            grads = None
        states = [self._states[tw.name] for tw in owned]
        weights = [D.local_tensor(tw.param.detach()) for tw in owned]
        gen = None
        if states and states[0].dtype == torch.bfloat16:
            gen = torch.Generator().manual_seed(self._seed * 1_000_003 + int(t))  # CPU: offsets only, no sync
        with torch.no_grad():
            if self.offload_to_cpu:
                self._update_offloaded(states, weights, grads, t, gen)
            else:
                self.scorer.update_(states, weights, grads, t, gen)
        self._record_sample(t, step)

    def _update_offloaded(self, states, weights, grads, t, gen) -> None:
        from .scorers.base import chunks

        for sl in chunks(weights):
            w = [x.to("cpu", non_blocking=True) for x in weights[sl]]
            g = [x.to("cpu", non_blocking=True) for x in grads[sl]] if grads is not None else None
            self.scorer.update_(states[sl], w, g, t, gen)

    @staticmethod
    def _all_finite(tensors) -> bool:
        norms = torch._foreach_norm(list(tensors))
        return bool(torch.isfinite(torch.stack([n.float().cpu() for n in norms])).all())

    # ------------------------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._setup(args, state, model)
        callbacks = self._move_before_reporters()
        self._trial_dir = self._find_trial_dir(args, state, callbacks)
        if state.global_step > 0:
            self._restore(args, state)
        if self.schedule is not None:
            self.schedule.on_train_begin(self, args, state, model, optimizer=kwargs.get("optimizer"))

    def on_step_begin(self, args, state, control, **kwargs):
        self._collect = self.scorer.source == "activations" and self._samples_at(state.global_step + 1)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        t = state.global_step + 1
        if self.scorer.source == "activations":
            self._commit_activations(t)
        elif self.scorer.source == "grads" and self._samples_at(t):
            self._sample(t, t, use_grads=True)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.schedule is not None:
            self.schedule.on_optimizer_step(self, args, state)  # pruned weights back to zero before anything reads them

    def on_step_end(self, args, state, control, **kwargs):
        t = state.global_step
        self._meta["global_step"] = t
        if self.scorer.source == "weights":
            if not self.config.per_epoch and self._samples_at(t):
                self._sample(t, t, use_grads=False)
            elif self.config.per_epoch and self._is_epoch_end(state, kwargs.get("train_dataloader")):
                # The last step of an epoch: sample now, so a checkpoint saved at this step holds the sample (a
                # resume from it never replays this epoch's on_epoch_end).
                self._sample_epoch(state)
        if self.schedule is not None:
            self.schedule.on_step_end(self, args, state, control=control)
        if control.should_save:
            self._stage(args, state)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.config.per_epoch:
            self._sample_epoch(state)
        if control.should_save:
            self._stage(args, state)

    @staticmethod
    def _is_epoch_end(state, dataloader) -> bool:
        # Only a dataset with a length has whole-number epochs at its epoch ends.
        return dataloader is not None and has_length(dataloader) and state.epoch == int(state.epoch or 0) > 0

    def _sample_epoch(self, state) -> None:
        """One sample per epoch end, t = epochs completed.

        Epoch ends are counted here: `state.epoch` is fractional at a partial last epoch (max_steps) and
        meaningless for an IterableDataset. A map-style epoch is sampled at its last step (from `on_step_end`),
        so a checkpoint saved at that step holds the sample; `on_epoch_end` then finds it already taken.
        """
        if self._meta["epoch_step"] == state.global_step:
            return
        self._meta["epoch"] += 1
        self._meta["epoch_step"] = state.global_step
        if self._samples_at(self._meta["epoch"]):
            self._sample(self._meta["epoch"], state.global_step, use_grads=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self._tracked:
            return
        extra = {
            "importance/samples": self._meta["num_samples"],
            "importance/skipped": self._meta["skipped"],
            "importance/tracked_params": sum(t.param.numel() for t in self._tracked),
        }
        if self.schedule is not None:
            extra.update(self.schedule.log_values())
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_push_begin(self, args, state, control, **kwargs):
        # Called on the main process only, after checkpoint-N is written and before it is uploaded.
        self._publish_staged(args, state)

    def on_save(self, args, state, control, **kwargs):
        if self._stage_attempt == state.global_step:
            # Staged before the checkpoint (or that write already failed and was reported): never write twice.
            self._publish_staged(args, state)
            D.barrier()
            return
        folder = self._checkpoint_dir(args, state.global_step)
        if folder is None:
            logger.warning("ImportanceCallback: checkpoint-%d not found under %s", state.global_step, args.output_dir)
            return
        self._save(os.path.join(folder, S.IMPORTANCE_DIR), state)

    def on_train_end(self, args, state, control, **kwargs):
        self._meta["global_step"] = state.global_step
        # Through the staging folder too: the Trainer's last checkpoint push may still be uploading output_dir,
        # and it skips "_*" but would pick up a half-written ".importance.tmp".
        out = self._output_dir(args)
        staging = os.path.join(out, STAGING_DIR)
        if self._save(staging, state, publish=False) and self._rank == 0:
            S.publish(staging, os.path.join(out, S.IMPORTANCE_DIR))
        D.barrier()  # no rank reads output_dir/importance before rank 0 has renamed it into place
        self._staged_step = None
        self._remove_hooks()

    def _stage(self, args, state) -> None:
        """Write the importance of this step before the Trainer saves checkpoint-N (see `on_push_begin`)."""
        self._staged_step = None
        # Under hyperparameter search checkpoints go to output_dir/run-<trial>/: let on_save write those.
        if state.trial_name is not None:
            return
        self._stage_attempt = state.global_step
        if self._save(os.path.join(args.output_dir, STAGING_DIR), state, publish=False):
            self._staged_step = state.global_step

    def _publish_staged(self, args, state) -> None:
        staged = os.path.join(args.output_dir, STAGING_DIR)
        if self._staged_step != state.global_step or self._rank != 0 or not os.path.isdir(staged):
            return
        folder = self._checkpoint_dir(args, state.global_step)
        if folder is None:
            logger.warning("ImportanceCallback: checkpoint-%d not found under %s", state.global_step, args.output_dir)
            return
        S.publish(staged, os.path.join(folder, S.IMPORTANCE_DIR))

    # ------------------------------------------------------------------------------------------- output
    def _move_before_reporters(self) -> list | None:
        """Run right after `DefaultFlowCallback` (before the reporters) so they log our scalars.

        Trainer appends user callbacks after its reporters and gives callbacks no handle on the list; the
        list is found once through the garbage collector. Moving ourselves from position i to 1 during the
        `on_train_begin` loop keeps every later callback at its index, so none is skipped or called twice,
        and our `on_step_end` still runs after `DefaultFlowCallback` has decided whether to save.
        """
        for ref in gc.get_referrers(self):
            if isinstance(ref, list) and ref and type(ref[0]).__name__ == "DefaultFlowCallback":
                ref.remove(self)
                ref.insert(1, self)
                return ref
        return None

    def _find_trial_dir(self, args, state, callbacks) -> str | None:
        """This `hyperparameter_search` trial's folder (`None` outside a search).

        Trainer keeps `args.output_dir` for every trial and writes each one under `hp_name(trial)` or
        `run-<trial id>` (`Trainer._get_output_dir`), which callbacks are not told: unless `hp_name` was given,
        the Trainer holding our callback list is found through the garbage collector and asked.
        """
        if not state.is_hyper_param_search:
            return None
        if state.trial_name:
            return os.path.join(args.output_dir, state.trial_name)
        for handler in _holders(callbacks, "callbacks") if callbacks is not None else ():
            for trainer in _holders(handler, "callback_handler"):
                if hasattr(trainer, "_get_output_dir"):
                    return trainer._get_output_dir(getattr(trainer, "_trial", None))
        logger.warning("ImportanceCallback: hyperparameter search trial folder not found; importance goes to %s "
                       "(pass hp_name= to hyperparameter_search)", args.output_dir)
        return None

    def _output_dir(self, args) -> str:
        return self._trial_dir or args.output_dir

    def _checkpoint_dir(self, args, step: int) -> str | None:
        folder = os.path.join(self._output_dir(args), f"checkpoint-{step}")  # a search trial's folder included
        return folder if os.path.isdir(folder) else None

    def _full_meta(self) -> dict[str, Any]:
        meta = dict(self._meta, tokens=dict(self._meta["tokens"]))
        if self.scorer.source == "activations" and D.is_distributed():
            names = [t.name for t in self._tracked]
            meta["tokens"] = dict(zip(names, D.all_reduce_int([meta["tokens"].get(n, 0) for n in names])))
        if self.scorer.source == "final":
            meta["num_samples"], meta["last_step"] = 1, meta["global_step"]
        return meta

    def _export_tensors(self) -> dict[str, torch.Tensor]:
        """The buffers this rank writes: its own for per-rank criteria; for activations, the cross-rank sums."""
        if self.scorer.source == "final":
            owned = self._owned()
            with torch.no_grad():
                weights = [D.local_tensor(t.param.detach()) for t in owned]
                self.scorer.update_([self._states[t.name] for t in owned], weights, None, 0)
        if self.scorer.source == "activations":
            names = [t.name for t in self._tracked]
            summed = [self._states[n].clone() for n in names]
            D.all_reduce_sum_(summed)
            return dict(zip(names, summed))
        return dict(self._states)

    def _save(self, final_dir: str, state, publish: bool = True) -> bool:
        """Write the importance into `final_dir` (every rank takes part); returns whether it was written.

        With `publish=False`, `final_dir` is a staging folder written in place (complete once its config is
        written), for `S.publish` to move later.
        """
        if not self._tracked:
            return False
        rank, world = D.rank_and_world()
        meta = self._full_meta()
        tensors = self._export_tensors()
        tmp = S.tmp_dir_for(final_dir) if publish else final_dir
        error = None
        try:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            D.barrier()
            if world == 1:
                S.write_single(tmp, tensors)
            else:
                mine = {n: v for n, v in tensors.items() if self._writers[n] in (rank, D.ALL_RANKS)}
                S.write_shard(tmp, mine, rank=rank, world_size=world)
        except (OSError, SafetensorError) as e:
            error = e
        D.barrier()
        failed = D.any_rank(error is not None)
        row_shards = self._row_shards() if world > 1 else None
        if not failed and rank == 0:
            try:
                if self.schedule is not None:
                    self.schedule.save_masks(tmp)
                owners = {n: max(w, 0) for n, w in self._writers.items()}
                S.finalize(tmp, final_dir if publish else None, config=self.config, meta=meta, shapes=self._shapes(),
                           owners=owners, world_size=world, extra=self._extra_metadata(), row_shards=row_shards)
            except (OSError, SafetensorError) as e:
                error, failed = e, True
        D.barrier()
        if failed:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            what = final_dir if publish else f"the importance of checkpoint-{state.global_step} (staged in {final_dir})"
            msg = f"ImportanceCallback could not write {what}: {error or 'failed on another rank'}"
            if self.on_save_error == "raise":
                raise RuntimeError(msg + " (pass on_save_error='warn' to keep training)") from error
            logger.warning(msg)
        return not failed

    def _row_shards(self) -> dict[str, list[int]]:
        """FSDP2: the first row each rank's shard holds, per row-sharded weight (indexed by rank)."""
        names = list(self._rows)
        table = D.all_gather_ints([self._rows[n][0] for n in names])
        return {n: [offsets[i] for offsets in table] for i, n in enumerate(names)}

    def _shapes(self) -> dict[str, list[int]]:
        return {t.name: list(t.param.shape) for t in self._tracked}

    def _extra_metadata(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict()} if self.schedule is not None else {}

    # ------------------------------------------------------------------------------------------ resume
    def _restore(self, args, state) -> None:
        folder = self.resume_from or self._checkpoint_dir(args, state.global_step)
        try:
            if folder is None:
                raise S.ImportanceFileError(
                    f"resuming at step {state.global_step} but no checkpoint-{state.global_step} folder was found "
                    f"under {args.output_dir}; pass ImportanceCallback(resume_from=...)"
                )
            imp = S.load_importance(folder)
            diff = self.config.diff(imp.config)
            if imp.meta.get("max_steps") != self._meta["max_steps"] and self.config.window is not None:
                diff["max_steps (sets the window)"] = (self._meta["max_steps"], imp.meta.get("max_steps"))
            if diff:
                shown = ", ".join(f"{k}: checkpoint {b!r} -> now {a!r}" for k, (a, b) in diff.items())
                raise S.ImportanceFileError(f"the importance config changed since {imp.path}: {shown}")
            if imp.shapes != self._shapes():
                raise S.ImportanceFileError(f"{imp.path} tracks other weights than this model ({len(imp.shapes)} vs "
                                            f"{len(self._tracked)}): was the model or target_modules changed?")
        except S.ImportanceFileError as e:
            if self.on_resume_mismatch == "restart":
                logger.warning("ImportanceCallback: %s; restarting importance from zero (on_resume_mismatch='restart')", e)
                return
            raise ValueError(
                f"Cannot resume importance: {e} (resume from another checkpoint, or pass "
                "ImportanceCallback(on_resume_mismatch='restart') to restart the importance from zero)"
            ) from None
        rank, _ = D.rank_and_world()
        keep_sums = self.scorer.source != "activations" or rank == 0  # activation sums: restore once, on rank 0
        for name, buf in self._states.items():
            if keep_sums:
                saved = imp.state(name)
                if name in self._rows:  # FSDP2: only this rank's rows, whatever layout wrote the file
                    offset, rows = self._rows[name]
                    saved = saved[offset : offset + rows]
                buf.copy_(saved.to(buf.device))
        meta = {k: imp.meta[k] for k in ("num_samples", "weight_sum", "last_step", "skipped", "epoch", "epoch_step")
                if k in imp.meta}
        meta["tokens"] = dict(imp.meta.get("tokens", {})) if keep_sums else {}
        self._meta.update(meta, global_step=state.global_step)
        if self.schedule is not None:
            self.schedule.load_state_dict(S.read_meta(imp.path).get("schedule"), directory=imp.path)
        logger.info("ImportanceCallback: restored %d samples from %s", self._meta["num_samples"], imp.path)

    # ------------------------------------------------------------------------------------------ results
    def importance(self) -> Importance:
        """The importance so far, in memory (full tensors on every rank), bound to the model's weights."""
        if not self._tracked:
            raise RuntimeError("ImportanceCallback has not seen training yet (call trainer.train() first)")
        meta = self._full_meta()
        tensors = self._export_tensors()
        rank, world = D.rank_and_world()
        if world > 1 and self.scorer.source != "activations":
            full = {}
            for t in self._tracked:
                owner = self._owners[t.name]
                if owner == D.ALL_RANKS:
                    full[t.name] = D.gather_rows(tensors[t.name], self._rows[t.name][0], list(t.param.shape))
                    continue
                buf = tensors[t.name] if owner == rank else torch.empty(
                    self.scorer.state_shape(t.param), dtype=getattr(torch, self.config.state_dtype))
                full[t.name] = D.broadcast_(buf, owner)
            tensors = full
        weights = {t.name: t.param.detach() for t in self._tracked}
        return Importance(self.config, meta, self._shapes(), tensors.__getitem__, weights=weights)
