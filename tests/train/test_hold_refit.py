"""`PruneSchedule(mode="hold", refit_at=...)`: one-shot prune, fine-tune with the mask held under distillation, then a
least-squares re-fit of the kept weights towards their current values with the one-shot prune's edits undone
(`W + W_dense - W_start`), from the Hessians of the pruned model gathered while it trained (and, with
`cross_term=True`, the dense-to-pruned cross term)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from hf_weightprune import DistillConfig, ImportanceCallback, ImportanceConfig, PruneConfig, prune_, save_pruned
from hf_weightprune.prune.oneshot import oneshot_importance
from hf_weightprune.prune.refit import refit_masked_
from hf_weightprune.testing import tiny_llama
from hf_weightprune.train.schedule import PruneSchedule
from tests.helpers import training_args
from tests.train.test_cross_wiring import Padded, Pairs

MAX_STEPS, REFIT = 8, 5  # steps 1..5 gather H~ (and C); steps 6..8 are held out and fine-tune the re-fitted weights


class Snapshot(TrainerCallback):
    """The masked weights at the end of the re-fit step: listed before the `ImportanceCallback`, as the re-fit finds
    them; after it, as it leaves them (with the importance it read)."""

    def __init__(self, cb):
        self.cb, self.weights, self.hessians = cb, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == REFIT:
            self.weights = {n: p.detach().double().clone() for n, p in self.cb.mask_holder.params.items()}
            imp = self.cb.importance()
            self.hessians = {n: imp.state(n).clone() for n in self.cb.mask_holder.params}


def _pruned(tmp_path):
    """A one-shot magnitude prune of the dense model (seed 3) at 50%, saved as the checkpoint whose mask is held."""
    model = tiny_llama(seed=3)
    report = prune_(model, oneshot_importance(model, "magnitude"), PruneConfig(sparsity=0.5), progress=False)
    save_pruned(model, tmp_path / "pruned", report=report, write_card=False)
    return model, str(tmp_path / "pruned")


def _hold(masks_from, **kw):
    return PruneSchedule(mode="hold", masks_from=masks_from, **{"refit_at": REFIT, **kw})


def _callback(schedule, teacher, **config):
    return ImportanceCallback(ImportanceConfig(**{"criterion": "sparsegpt", **config}), schedule=schedule,
                              distill=DistillConfig(teacher=teacher, alpha=0.5, temperature=2.0))


def _train(tmp_path, **kw):
    """Returns the student, the callback, the snapshots around the re-fit, the recorder of the layer inputs, and in
    float64 the teacher's weights and the re-fit's targets `W + W_dense - W_start` (`W`: the weights it found)."""
    student, folder = _pruned(tmp_path)
    start = {n: p.detach().double().clone() for n, p in student.named_parameters()}  # the held weights, train begin
    teacher = tiny_llama(seed=3)
    cb = _callback(_hold(folder, **kw), teacher)
    before, after = Snapshot(cb), Snapshot(cb)
    rec = Pairs(cb, student, [n for n, _ in student.named_parameters() if n.endswith("proj.weight")])
    args = training_args(tmp_path / "run", max_steps=MAX_STEPS, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=1e-2, seed=0, save_strategy="no",
                         logging_steps=1000)
    Trainer(model=student, args=args, train_dataset=Padded(), callbacks=[before, cb, after, rec]).train()
    dense = {n: p.detach().double() for n, p in teacher.named_parameters()}
    return student, cb, before, after, rec, dense, {n: w + dense[n] - start[n] for n, w in before.weights.items()}


def _by_hand(reference, mask, H, C=None, *, alpha=0.5, percdamp=0.01):
    """Per row on its kept inputs `S`: `w_S = (Hd_SS)^-1 [r Hd + alpha r C]_S`, `Hd = H + percdamp mean(diag H) I`,
    in float64: the minimiser of `||r X - w X~||^2` at `alpha=1` (`||r X~ - w X~||^2` without `C`) plus the ridge."""
    Hd = H + percdamp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    B = reference @ Hd + (alpha * reference @ C if C is not None else 0)
    out = torch.zeros_like(reference)
    for i in range(reference.shape[0]):
        S = mask[i]
        out[i, S] = torch.linalg.solve(Hd[S][:, S], B[i, S])
    return out


def test_hold_refit_targets_the_trained_weights_with_the_prune_undone_keeps_zeros_and_lowers_the_held_out_error(
        tmp_path):
    student, cb, before, after, rec, dense, target = _train(tmp_path)
    holder = cb.mask_holder
    assert holder.refitted_at == REFIT and holder.sparsity == pytest.approx(0.5, abs=1e-3)
    gains = []
    for name, mask in holder.masks.items():
        # No pruned weight off zero: right after the re-fit, and after the steps that fine-tuned it.
        assert not bool(after.weights[name][~mask].any()) and not bool(student.get_parameter(name)[~mask].any())
        # The re-fit read H~ of the student's forwards of steps 1..5 (real tokens: padding left out)...
        H, _, tokens = rec.brute(name, range(1, REFIT + 1))
        assert before.hessians[name].shape == H.shape and tokens < REFIT * 4 * 12
        torch.testing.assert_close(before.hessians[name].double(), H, rtol=1e-5, atol=1e-4)
        # ... and is refit_masked_ towards W + W_dense - W_start with it: the teacher's weight plus what the kept
        # weights learned in steps 1..5 (neither the teacher's weight alone nor the student's fine-tuned weight).
        assert not torch.allclose(target[name], dense[name], atol=1e-3), name
        want = torch.zeros_like(dense[name])
        refit_masked_(want, mask, H.float(), reference=target[name], percdamp=0.01)
        torch.testing.assert_close(after.weights[name], want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(after.weights[name], _by_hand(target[name], mask, H), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(after.weights[name], before.weights[name], atol=1e-4), name
        # The layer output error against the target's layer (the dense function the training moved to), on the
        # pruned inputs the re-fit read (steps 1..5) and on held-out ones (steps 6..8), before and after it.
        for split, steps in (("fit", range(1, REFIT + 1)), ("held_out", range(REFIT + 1, MAX_STEPS + 1))):
            Xt = torch.cat([x for t in steps for x in rec.pruned[t][name]])
            err = [float((Xt @ (target[name] - w[name]).T).square().sum()) for w in (before.weights, after.weights)]
            gains.append((split, err[1] / err[0]))
    fit, held_out = ([g for s, g in gains if s == split] for split in ("fit", "held_out"))
    assert max(fit) < 1.0, fit  # least squares on those very inputs (a 1% ridge)
    assert sum(held_out) / len(held_out) < 0.95, held_out  # 0.88 here: a held-out weight may lose (1.02 at most)


def test_hold_refit_with_the_cross_term_is_the_asymmetric_solution(tmp_path):
    alpha = 1.0  # the exact asymmetric objective ||W X - W_hat X~||^2, W the target W + W_dense - W_start
    _, cb, before, after, rec, dense, target = _train(tmp_path, cross_term=True, cross_alpha=alpha)
    held_out, errors = range(REFIT + 1, MAX_STEPS + 1), {"before": 0.0, "after": 0.0}
    for name, mask in cb.mask_holder.masks.items():
        H, C, _ = rec.brute(name, range(1, REFIT + 1))
        assert float(C.abs().max()) > 1e-3, name  # the student's inputs differ from the teacher's
        want = _by_hand(target[name], mask, H, C, alpha=alpha)
        torch.testing.assert_close(after.weights[name], want, rtol=1e-4, atol=1e-4)
        assert not bool(after.weights[name][~mask].any())
        X = torch.cat([x for t in held_out for x in rec.dense[t][name]])
        Xt = torch.cat([x for t in held_out for x in rec.pruned[t][name]])
        for k, w in (("before", before.weights[name]), ("after", after.weights[name])):
            errors[k] += float((X @ target[name].T - Xt @ w.T).square().sum()) / float((X @ target[name].T).square().sum())
    # Against the target's outputs on the dense inputs (the teacher's forward) on held-out tokens.
    assert errors["after"] < errors["before"], errors


def _one_line(exc_info):
    assert "\n" not in str(exc_info.value)


def test_refusals(tmp_path):
    student, folder = _pruned(tmp_path)
    sparsegpt = ImportanceConfig(criterion="sparsegpt")
    # No teacher (or no Hessian statistic): refused when the callback is built, saying what to pass.
    for kw in (dict(config=sparsegpt), dict(distill=DistillConfig(teacher=tiny_llama(seed=3)))):
        with pytest.raises(ValueError, match="re-fits the kept weights .* pass ImportanceCallback\\(ImportanceConfig\\("
                                             "criterion='sparsegpt'\\), distill=DistillConfig\\(teacher=") as e:
            ImportanceCallback(kw.get("config"), schedule=_hold(folder), distill=kw.get("distill"))
        _one_line(e)
    with pytest.raises(ValueError, match="needs DistillConfig\\(teacher=...\\)"):
        ImportanceCallback(sparsegpt, schedule=_hold(folder), distill=DistillConfig())
    with pytest.raises(ValueError, match="criterion='sparsegpt'\\), not 'wanda'"):
        _callback(_hold(folder), tiny_llama(seed=3), criterion="wanda")
    # Step 0 holds no sample.
    for at in (0, 0.0):
        with pytest.raises(ValueError, match="refit_at=0: at step 0 no pruned-stream sample exists yet") as e:
            _hold(folder, refit_at=at)
        _one_line(e)
    with pytest.raises(ValueError, match="cross_term with mode='hold' feeds the re-fit only: pass refit_at"):
        PruneSchedule(mode="hold", masks_from=folder, cross_term=True)
    with pytest.raises(ValueError, match="pruned_stream"):
        _hold(folder, pruned_stream=False)

    def train(schedule, teacher, **config):
        cb = _callback(schedule, teacher, **config)
        weights = {n: p.detach().clone() for n, p in student.named_parameters()}
        args = training_args(tmp_path / "run", max_steps=MAX_STEPS, per_device_train_batch_size=2, learning_rate=1e-2,
                             save_strategy="no", logging_steps=1000)
        with pytest.raises(ValueError) as e:
            Trainer(model=student, args=args, train_dataset=Padded(), callbacks=[cb]).train()
        _one_line(e)
        assert all(torch.equal(p, weights[n]) for n, p in student.named_parameters())  # before any step
        return str(e.value)

    # A teacher whose Linears differ from the student's (e.g. a structurally pruned student): train begin, naming it.
    msg = train(_hold(folder), tiny_llama(seed=3, intermediate_size=48))
    assert "re-fits model.layers.0.mlp.gate_proj.weight (64, 32) from the teacher's weight of the same Linear, " \
           "but the teacher has shape (48, 32)" in msg, msg
    # Held weights the importance does not track: no Hessian to re-fit them from.
    msg = train(_hold(folder), tiny_llama(seed=3), target_modules=["q_proj"])
    assert "ImportanceConfig does not track 12 of them (e.g. model.layers.0.self_attn.k_proj.weight)" in msg, msg
    # A fraction that rounds to step 0, and a re-fit before the importance's first sample.
    msg = train(_hold(folder, refit_at=0.01), tiny_llama(seed=3))
    assert "refit_at=0.01 is step 0, which must be in 1..max_steps (8)" in msg, msg
    msg = train(_hold(folder, refit_at=3), tiny_llama(seed=3), every_n_steps=4)
    assert "would re-fit at step 3 with no pruned-stream sample since training began: the importance samples first " \
           "at step 4" in msg, msg
    # No sample planned before max_steps at all (every_n_steps past the run): refused, not left to fail at the re-fit.
    msg = train(_hold(folder, refit_at=6), tiny_llama(seed=3), every_n_steps=MAX_STEPS + 1)
    assert "would re-fit at step 6 with no pruned-stream sample since training began: the importance plans no " \
           "sample after step 0" in msg, msg


@pytest.mark.multiproc
def test_ddp_two_processes_refit_as_one(tmp_path):
    """2 ranks of 2 windows per step re-fit exactly as 1 process of 4 (the same global batches): the `H~` and cross
    terms the re-fit reads, and the weights it leaves, to float tolerance; the same bits on every rank."""
    from tests import ddp_cross
    from tests.test_distributed import torchrun

    _, folder = _pruned(tmp_path)
    torchrun("tests.ddp_cross", str(tmp_path), "--hold-refit", folder)
    r0, r1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    # Every rank holds the sums across ranks and ends with rank 0's weights.
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    one = ddp_cross.run_hold_refit(str(tmp_path / "single"), folder, batch=4)
    assert one.keys() == r0.keys() and int(one["refitted_at"]) == ddp_cross.REFIT
    masks = {k.removeprefix("mask."): v.bool() for k, v in one.items() if k.startswith("mask.")}
    # Each weight re-fitted once, by one rank (its owner; the other receives the result), and both ranks had a share.
    solves = [json.loads((tmp_path / f"solves{r}.json").read_text()) for r in (0, 1)]
    assert json.loads((tmp_path / "single" / "solves0.json").read_text()) == dict.fromkeys(masks, 1)
    assert all(solves) and not solves[0].keys() & solves[1].keys() and solves[0] | solves[1] == dict.fromkeys(masks, 1)
    assert masks and all(f"{p}.{n}" in one for n in masks for p in ("hessian", "refit"))
    assert sum(k.startswith("cross.") for k in one) >= 4  # q/k/v share one, gate/up another: per layer
    for k, want in one.items():
        if k.startswith(("mask.", "refitted_at")):
            assert torch.equal(r0[k], want), k
            continue
        # The same tokens summed in another order (two partial sums all-reduced), and the re-fit solved from them
        # (measured, as |diff| / max|ref|: H~ 1.4e-7, C 2.3e-7, the re-fitted weights 2.4e-5, the solve amplifying).
        torch.testing.assert_close(r0[k], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()), msg=k)
    pruned = load_file(tmp_path / "pruned" / "model.safetensors")
    for name, mask in masks.items():
        refit = r0[f"refit.{name}"]
        assert not bool(refit[~mask].any()), name
        # lr=0: the re-fit is the only move, away from the pruned checkpoint's weights, and the run ends on it.
        assert not torch.allclose(refit, pruned[name], atol=1e-4), name
        assert torch.equal(r0[f"final.{name}"], refit), name
