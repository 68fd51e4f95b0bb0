"""Shared test utilities: the one `TrainingArguments` builder, a recorder callback, brute-force importance references,
and the helpers of the SIGKILL + resume tests (killed run copies, folder snapshots, importance equality)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_weightprune import Importance, load_importance
from hf_weightprune.matching import TrackedWeight
from hf_weightprune.moe import find_moe_blocks, find_weights
from hf_weightprune.testing import TokenDataset
from hf_weightprune.train.callback import STAGING_DIR

REPO = Path(__file__).resolve().parent.parent


def end_process_group() -> None:
    """The last call of every `torchrun` entry point of the tests: it never returns.

    A gloo rank can abort while the interpreter tears down ("terminate called without an active exception", SIGABRT;
    pytorch/pytorch#190489 and #179291): gloo's worker threads and DDP's reducer still hold work objects whose tensors
    are freed after the interpreter has gone. Seen twice in full suites under load, once with the group destroyed.
    So every rank waits for the others (no rank tears down while a peer still talks to it), destroys the group while
    the interpreter is alive, flushes, and leaves without interpreter teardown. Only a script that got here (every
    result already written and closed) exits 0; an exception before this call still fails the launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def training_args(output_dir, **overrides) -> TrainingArguments:
    """The `TrainingArguments` of every test run: on the CPU, no reporting integration, no progress bars.

    Args:
        output_dir (`str` or `os.PathLike`): the Trainer's `output_dir`.
        **overrides: any other `TrainingArguments` field (they win over the three defaults).

    Returns:
        `TrainingArguments`
    """
    return TrainingArguments(str(output_dir), **{"report_to": [], "use_cpu": True, "disable_tqdm": True, **overrides})


class Recorder(TrainerCallback):
    """Snapshots weights/grads before each optimizer step, weights after it, and the inputs of the real tokens per
    step: of each Linear, and of each expert slice token by token as the router sent them (padding excluded)."""

    def __init__(self, model, record_acts=False, record_hessians=False):
        self.tracked = find_weights(model)
        self.pre, self.post, self.acts, self.tokens, self.hessians = [], [], [], [], []
        self._acts, self._tok, self._hess = {}, {}, {}
        self.record_hessians = record_hessians
        self._mask = None
        if record_acts or record_hessians:
            model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)
            for t in self.tracked:
                if isinstance(t, TrackedWeight):
                    t.module.register_forward_hook(self._hook(t.name))
            for b in find_moe_blocks(model):
                b.router.register_forward_hook(self._router_hook(b))

    def _capture_mask(self, module, args, kwargs):
        self._mask = kwargs.get("attention_mask")

    @staticmethod
    def _counts(module):
        return module.training and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1

    def _real(self, x):
        """`x` flattened to `[tokens, features]`, the padded tokens dropped."""
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        if self._mask is not None and self._mask.numel() == flat.shape[0]:
            flat = flat[self._mask.reshape(-1).bool()]
        return flat

    def _add(self, name, x):
        self._acts[name] = self._acts.get(name, 0) + (x * x).sum(0)
        self._tok[name] = self._tok.get(name, 0) + x.shape[0]
        if self.record_hessians:
            self._hess[name] = self._hess.get(name, 0) + x.T @ x

    def _hook(self, name):
        def hook(module, inputs, output):
            if self._counts(module):
                self._add(name, self._real(inputs[0]))

        return hook

    def _router_hook(self, block):
        """Token by token: each routed real token's input (and recomputed gated intermediate) to each of its experts."""
        def hook(module, inputs, output):
            if not self._counts(module):
                return
            x, index = self._real(inputs[0]), self._real(output[2])
            experts = block.experts
            inter = experts.gate_up_proj.shape[1] // 2
            for t in range(x.shape[0]):
                for e in sorted({int(i) for i in index[t]}):
                    w = experts.gate_up_proj[e].detach().double()
                    mid = experts.act_fn(w[:inter] @ x[t]) * (w[inter:] @ x[t])
                    for proj, v in (("gate_proj", x[t]), ("up_proj", x[t]), ("down_proj", mid)):
                        self._add(f"{block.experts_name}.{e}.{proj}.weight", v[None])

        return hook

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.pre.append({t.name: (t.weight().double().clone(),
                                  None if t.grad() is None else t.grad().detach().double().clone())
                         for t in self.tracked})
        self.acts.append(self._acts)
        self.tokens.append(self._tok)
        self.hessians.append(self._hess)
        self._acts, self._tok, self._hess = {}, {}, {}

    def on_step_end(self, args, state, control, **kw):
        self.post.append({t.name: t.weight().double().clone() for t in self.tracked})


def train(model, callbacks, tmp_path, *, max_steps=6, batch=4, ga=1, save_steps=None, seed=0, n=48, lr=1e-2,
          **kw):
    args = training_args(
        tmp_path, max_steps=max_steps, per_device_train_batch_size=batch, gradient_accumulation_steps=ga,
        learning_rate=lr, seed=seed, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        logging_steps=1, **kw)
    vocab = model.config.vocab_size
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=n, vocab_size=vocab, seed=seed),
                      callbacks=callbacks)
    attach_all(trainer, callbacks)
    trainer.train()
    return trainer


def wanda_units_run(out: Path, model, lr: float = 1e-2) -> Path:
    """A dense training output in `out`: `model` trained 3 steps with `wanda` and unit statistics, saved beside its
    importance folder (what `hf-weightprune prune RUN --importance RUN` reads)."""
    from hf_weightprune import ImportanceCallback, ImportanceConfig

    trainer = train(model, [ImportanceCallback(ImportanceConfig(criterion="wanda", units=True))], out, max_steps=3,
                    lr=lr)
    trainer.save_model(str(out))
    return out


def attach_all(trainer, callbacks):
    """Hand each ImportanceCallback its Trainer (so its metrics reach the loggers), as users do with `attach`."""
    from hf_weightprune import ImportanceCallback

    for cb in callbacks:
        if isinstance(cb, ImportanceCallback):
            cb.attach(trainer)


def reference(criterion, rec, steps=None):
    """Brute-force importance from recorded snapshots; `steps` are the 1-based sampled steps."""
    n_steps = len(rec.post)
    steps = list(range(1, n_steps + 1)) if steps is None else steps
    out = {}
    for t in rec.tracked:
        name = t.name
        if criterion == "temporal_magnitude":
            out[name] = sum(s * rec.post[s - 1][name].abs() for s in steps) / sum(steps)
        elif criterion == "magnitude":
            out[name] = rec.post[-1][name].abs()
        elif criterion == "movement":
            out[name] = -sum(rec.pre[s - 1][name][0] * rec.pre[s - 1][name][1] for s in steps) / len(steps)
        elif criterion == "taylor":
            out[name] = sum((rec.pre[s - 1][name][0] * rec.pre[s - 1][name][1]).abs() for s in steps) / len(steps)
        elif criterion == "fisher":
            out[name] = sum(rec.pre[s - 1][name][1] ** 2 for s in steps) / len(steps)
        elif criterion == "wanda":
            sq = sum(rec.acts[s - 1][name] for s in steps)
            tok = sum(rec.tokens[s - 1][name] for s in steps)
            out[name] = rec.post[-1][name].abs() * (sq / tok).sqrt()[None, :]
        elif criterion == "sparsegpt":  # the state, sum of x x^T over the real tokens (scores need the Hessian's inverse)
            out[name] = sum(rec.hessians[s - 1][name] for s in steps)
    return out


def sigkill_at_hang(root: Path, runs: dict[str, list[str]], timeout: float = 300, nproc: int = 1) -> Path:
    """Start every `tests.scripts.ckpt_train` run at once (imports dominate) in `root / name`, SIGKILL each as soon as
    it writes its hang marker; their output goes to `root / f"{name}.log"`. Returns `root`.

    `nproc > 1`: each run is `torchrun --nproc_per_node nproc` (gloo, CPU), whose rank 0 writes the marker, with
    every rank's pid, once all of them hang; the launcher and its ranks are killed together, as when a node dies."""
    from .scripts.ckpt_train import MARKER  # here: ckpt_train itself imports this module

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    procs = {}
    for name, argv in runs.items():
        launch = [sys.executable, "-m"]
        if nproc > 1:
            with socket.socket() as sock:  # torchrun's static rendezvous needs a concrete free port
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            launch += ["torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                       f"--master_port={port}", "-m"]
        with open(root / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen([*launch, "tests.scripts.ckpt_train", str(root / name), *argv], cwd=REPO,
                                           env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        for name, proc in procs.items():
            while not (root / name / MARKER).exists():
                if proc.poll() is not None:
                    pytest.fail(f"{name} exited ({proc.returncode}) before hanging:\n"
                                f"{(root / f'{name}.log').read_text()[-3000:]}")
                assert time.monotonic() < deadline, f"{name} did not reach its hang point"
                time.sleep(0.05)
            ranks = [int(pid) for pid in (root / name / MARKER).read_text().split()] if nproc > 1 else []
            proc.send_signal(signal.SIGKILL)
            for pid in ranks:  # torchrun's ranks: each in a session of its own
                os.kill(pid, signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()  # torchrun passes it on to its ranks
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return root


def workdir(killed: Path, name: str, tmp_path: Path) -> Path:
    """A copy of the SIGKILLed run `killed / name` in `tmp_path / name`, without its hang marker."""
    from .scripts.ckpt_train import MARKER

    out = tmp_path / name
    shutil.copytree(killed / name, out)
    (out / MARKER).unlink()
    return out


def assert_same_importance(got, expected):
    """Two importances (folders or loaded [`Importance`]s) hold the same step, samples, tokens and states."""
    a, b = (x if isinstance(x, Importance) else load_importance(x) for x in (got, expected))
    assert (a.step, a.num_samples, a.names) == (b.step, b.num_samples, b.names)
    assert a.meta["weight_sum"] == b.meta["weight_sum"] and a.meta["tokens"] == b.meta["tokens"]
    for name in b.names:
        torch.testing.assert_close(a.state(name), b.state(name), rtol=1e-6, atol=0, msg=name)


def snapshot(folder) -> dict:
    """Every path under `folder` with the bytes and mtime of each file: equal snapshots = untouched."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(Path(folder).rglob("*"))}


def leftovers(folder) -> list[str]:
    """Temporary or staged importance folders left under `folder` (a finished run leaves none)."""
    return [str(p) for p in Path(folder).rglob("*") if p.name.startswith((".importance", STAGING_DIR))]


def linear_zero_share(folder) -> float:
    """The share of exact zeros of a saved model's Linear weights (not the output embedding), counted by hand: what a
    pruned folder's measured sparsity is checked against."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and not n.endswith("lm_head")]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
