"""`PruneSchedule(cross_term=True)` under distillation: the dense-to-pruned cross term gathered from the teacher's and
the student's forwards of the same batches, beside the pruned-stream `H~`, and the asymmetric objective it feeds."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from hf_weightprune import DistillConfig, ImportanceCallback, ImportanceConfig, load_importance
from hf_weightprune.collect.activations import in_backward_recompute
from hf_weightprune.files import importance_files as F
from hf_weightprune.files.cross_files import CROSS_NAME
from hf_weightprune.testing import tiny_llama
from hf_weightprune.train.schedule import PruneSchedule
from tests.helpers import assert_same_importance, sigkill_at_hang, training_args, workdir
from tests.scripts.ckpt_train import make_callback, run

FIXTURE = Path(__file__).parents[1] / "fixtures" / "release-0.1" / "run" / "checkpoint-2"
MAX_STEPS, END = 8, 3  # updates at 1 and 3; steps 4..8 gather the final masks' statistics


class Padded(torch.utils.data.Dataset):
    """Token windows, every other one padded at its end (attention mask 0, label -100)."""

    def __init__(self, n=32, seq_len=12, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 128, (n, seq_len), generator=g)
        self.lengths = [seq_len - (i % 2) * (1 + i % 5) for i in range(n)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        mask = (torch.arange(self.ids.shape[1]) < self.lengths[i]).long()
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": self.ids[i].masked_fill(mask == 0, -100)}


class Pairs(TrainerCallback):
    """Listed after the `ImportanceCallback` (whose train begin builds the teacher): every training forward's input of
    each tracked Linear in the teacher and the student, with its real-token mask, by step (recomputes left out)."""

    def __init__(self, cb, model, names):
        self.cb, self.model, self.names = cb, model, names
        self.step, self.dense, self.pruned, self.mask = 0, {}, {}, None

    def on_train_begin(self, args, state, control, **kwargs):
        # First: the distiller's pre-hook runs the teacher on this batch, whose hooks need its mask.
        self.model.register_forward_pre_hook(self._mask, with_kwargs=True, prepend=True)
        for store, model in ((self.dense, self.cb._distiller.teacher), (self.pruned, self.model)):
            modules = dict(model.named_modules())
            for name in self.names:
                modules[name.removesuffix(".weight")].register_forward_pre_hook(self._hook(store, name))

    def _mask(self, module, args, kwargs):
        self.mask = kwargs["attention_mask"].bool()

    def _hook(self, store, name):
        def hook(module, args):
            if in_backward_recompute() or (store is self.pruned and not module.training):
                return
            x = args[0].detach().double()[self.mask.to(args[0].device)]
            store.setdefault(self.step, {}).setdefault(name, []).append(x)
        return hook

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def brute(self, name, steps):
        X = torch.cat([x for t in steps for x in self.dense[t][name]])
        Xt = torch.cat([x for t in steps for x in self.pruned[t][name]])
        return Xt.T @ Xt, (X - Xt).T @ Xt, X.shape[0]


def _schedule(**kw):
    return PruneSchedule(final_sparsity=0.5, start=1, end=END, every_n_steps=2, block_size=8,
                         **{"pruned_stream": True, "cross_term": True, **kw})


def _callback(schedule, **config):
    return ImportanceCallback(ImportanceConfig(criterion="sparsegpt", **config), schedule=schedule,
                              distill=DistillConfig(alpha=0.5, temperature=2.0))


def _train(tmp_path, cb, *, lr=1e-2, record=True, **args):
    model = tiny_llama(seed=3)
    names = [n for n, p in model.named_parameters() if n.endswith("proj.weight")]
    rec = Pairs(cb, model, names) if record else None
    targs = training_args(tmp_path, max_steps=MAX_STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                          learning_rate=lr, seed=0, save_strategy="no", logging_steps=1000, **args)
    Trainer(model=model, args=targs, train_dataset=Padded(), callbacks=[cb, rec] if rec else [cb]).train()
    return model, rec


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_cross_term_and_hessian_equal_brute_force_over_real_tokens(checkpointing, tmp_path):
    cb = _callback(_schedule(cross_max_in_features=32))
    _, rec = _train(tmp_path, cb, gradient_checkpointing=checkpointing)
    terms, imp = cb._cross_terms(), cb.importance()
    down = [n for n in rec.names if "down_proj" in n]
    assert down and not set(down) & set(terms)  # in_features 64 > 32: skipped, plain objective
    assert set(terms) == set(rec.names) - set(down)
    layer0 = "model.layers.0.self_attn.q_proj.weight"
    assert terms[layer0][0] is terms[layer0.replace("q_proj", "k_proj")][0]  # q/k/v: one input, one sum
    steps = range(END + 1, MAX_STEPS + 1)  # restarted at the last mask change (step 3)
    for name in rec.names:
        H, C, tokens = rec.brute(name, steps)
        # 2 accumulated micro-batches of 2 windows per step, every other window padded: fewer than 5 x 4 x 12 tokens
        assert tokens == imp.meta["tokens"][name] < 5 * 4 * 12
        torch.testing.assert_close(imp.state(name).double(), H, rtol=1e-5, atol=1e-4)
        if name in terms:
            got, n = terms[name]
            assert n == tokens
            torch.testing.assert_close(got.double(), C, rtol=1e-4, atol=1e-4)
            assert float(C.abs().max()) > 1e-3, name  # the student trained and was pruned: its inputs differ


def test_the_saved_importance_round_trips_the_cross_term(tmp_path):
    cb = _callback(_schedule(cross_max_in_features=32))
    _train(tmp_path, cb, record=False)
    want, imp = cb._cross_terms(), load_importance(tmp_path)  # output_dir/importance, written at train end
    assert imp.has_cross
    got = imp.cross_terms()
    assert got.keys() == want.keys() and all("down_proj" not in n for n in got)  # skipped ones stay absent
    for name, (c, tokens) in want.items():
        assert torch.equal(got[name][0], c) and got[name][1] == tokens == imp.meta["tokens"][name], name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert got[q][0] is got[q.replace("q_proj", "v_proj")][0]  # a shared input is still one tensor
    old = load_importance(FIXTURE)  # no cross term: refused in one line
    assert not old.has_cross
    with pytest.raises(ValueError, match="holds no cross term: gather it with PruneSchedule\\(cross_term=True\\)"):
        old.cross_terms()


def test_refit_keeps_zeros_and_the_asymmetric_objective_lowers_the_dense_output_error(tmp_path):
    """lr=0: only pruning edits move the weights, so the dense model is the re-fit's target and the teacher. The
    error of each Linear's output on the pruned model's held-out inputs against the dense layer on the dense
    inputs (what the asymmetric objective targets), after an OBS prune + re-fit: none, plain, asymmetric."""
    refit = MAX_STEPS - 2
    results = {}
    for kind, kw in (("none", dict(cross_term=False)), ("plain", dict(cross_term=False, refit_at=refit)),
                     ("asym", dict(refit_at=refit, cross_alpha=0.5))):
        cb = _callback(_schedule(**kw))
        model, rec = _train(tmp_path / kind, cb, lr=0.0)
        holder = cb.mask_holder
        assert all(not bool(p.detach()[~holder.masks[n]].any()) for n, p in holder.params.items())
        assert holder.refitted_at == (None if kind == "none" else refit)
        results[kind] = (rec, {n: p.detach().double().clone() for n, p in holder.params.items()})
    dense = {n: p.detach().double() for n, p in tiny_llama(seed=3).named_parameters()}
    held_out = range(refit + 1, MAX_STEPS + 1)  # inputs the re-fits never read
    errors = {}
    for kind, (rec, weights) in results.items():
        total = 0.0
        for name, w in weights.items():
            X = torch.cat([x for t in held_out for x in rec.dense[t][name]])
            Xt = torch.cat([x for t in held_out for x in rec.pruned[t][name]])
            total += float((X @ dense[name].T - Xt @ w.T).square().sum()) / float((X @ dense[name].T).square().sum())
        errors[kind] = total / len(weights)
    assert errors["plain"] < errors["none"], errors
    # Measured on this tiny model: the asymmetric re-fit lowers the dense-target error below the plain one.
    assert errors["asym"] < errors["plain"], errors


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="pass ImportanceCallback\\(distill=DistillConfig"):
        ImportanceCallback(ImportanceConfig(criterion="sparsegpt"), schedule=_schedule())
    with pytest.raises(ValueError, match="PruneSchedule\\(cross_term=...\\) needs the input Hessians.*not 'wanda'"):
        ImportanceCallback(ImportanceConfig(criterion="wanda"), schedule=_schedule(), distill=DistillConfig())
    with pytest.raises(ValueError, match="cross_term needs the pruned stream"):
        PruneSchedule(final_sparsity=0.5, cross_term=True)
    with pytest.raises(ValueError, match="cross_alpha must be a float in \\[0, 1\\]"):
        _schedule(cross_alpha=1.5)
    with pytest.raises(ValueError, match="cross_max_in_features must be an int"):
        _schedule(cross_max_in_features=0)
    # One update at step 4, samples every 4 steps: the first after it is step 8, after the re-fit at step 6. Refused at
    # train begin, before any step.
    one = PruneSchedule(final_sparsity=0.5, start=0, end=4, every_n_steps=4, block_size=8, cross_term=True, refit_at=6)
    cb = _callback(one, every_n_steps=4)
    with pytest.raises(ValueError, match="would re-fit at step 6 with no pruned-stream sample since the last mask "
                                         "update \\(step 4\\): the importance samples first at step 8"):
        _train(tmp_path, cb, record=False)
    assert cb.mask_holder.num_updates == 0


def test_sigkill_mid_ramp_resumes_the_cross_term_exactly(tmp_path_factory, tmp_path):
    """Killed once checkpoint-3 is complete: it holds the cross term of steps 2-3, which the update at step 5 reads."""
    killed = sigkill_at_hang(tmp_path_factory.mktemp("killed"),
                             {"cross": ["--criterion", "sparsegpt", "--hang-after-save", "3", "--schedule", "cross",
                                        "--distill"]})
    out = workdir(killed, "cross", tmp_path)
    saved = load_file(out / "checkpoint-3" / F.IMPORTANCE_DIR / CROSS_NAME)
    assert saved and all(float(t.abs().max()) > 0 for k, t in saved.items() if "layers.0.self_attn" not in k)
    run(out, "sparsegpt", resume=True, importance_callback=make_callback("sparsegpt", schedule="cross", distill=True))
    ref = tmp_path / "reference"
    run(ref, "sparsegpt", importance_callback=make_callback("sparsegpt", schedule="cross", distill=True))
    for step in (6, 8):
        a, b = (load_file(d / f"checkpoint-{step}" / "model.safetensors") for d in (out, ref))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), step
        ca, cb_ = (load_file(d / f"checkpoint-{step}" / F.IMPORTANCE_DIR / CROSS_NAME) for d in (out, ref))
        assert ca.keys() == cb_.keys() and all(torch.equal(ca[k], cb_[k]) for k in cb_), step
        assert_same_importance(out / f"checkpoint-{step}", ref / f"checkpoint-{step}")


@pytest.mark.multiproc
def test_ddp_two_processes_equal_one(tmp_path):
    from tests import ddp_cross
    from tests.test_distributed import torchrun

    torchrun("tests.ddp_cross", str(tmp_path))
    r0, r1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)  # every rank holds the sum
    one = ddp_cross.run(str(tmp_path / "single"), batch=4)
    assert one.keys() == r0.keys() and any(k.startswith("cross.") for k in one)
    # training_record(): the steps of one process, and its real tokens as the sum of both ranks' (padding excluded,
    # as the Trainer's own non_padding count, gathered over ranks; every other window of `Padded` is padded)
    assert int(r0["training.steps"]) == int(one["training.steps"]) == 6
    assert int(r0["training.tokens"]) == int(one["training.tokens"]) == int(r0["trainer.tokens_seen"]) < 6 * 4 * 12
    for k, want in one.items():
        if k.startswith("cross."):  # the same tokens, summed in another order
            torch.testing.assert_close(r0[k], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()), msg=k)
        else:
            assert torch.equal(r0[k], want), k
