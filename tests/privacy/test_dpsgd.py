"""Sample-level DP-SGD with Opacus: clipping, noise, accounting from the stored history, budget, BatchNorm."""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from torch.utils.data import DataLoader, TensorDataset

from client.state import from_plain, to_plain
from client.trainer import fit, make_loader
from privacy.accounting import (
    PrivacyBudgetExhausted,
    budget_left,
    calibrate_noise,
    check_budget,
    epsilon,
    make_accountant,
    merge_history,
)
from privacy.dpsgd import (
    ACCOUNTANT_KEY,
    DPSGDClient,
    DPSGDParams,
    append_history,
    check_first_round,
    check_model,
    load_history,
    round_entry,
    save_history,
)
from server.scenario import LocalSection
from strategies.base import ClientRule, StrategyParams

N, BATCH, DIM, CLASSES = 32, 8, 6, 3  # 4 batches per epoch: q = 1/4
DELTA = 1e-5


class ToyTask:
    """Cross-entropy of a small classifier, a mean over the batch like every task loss."""

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)


def dataset(n: int = N, dim: int = DIM) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(3 * torch.randn(n, dim, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.Tanh(), torch.nn.Linear(8, CLASSES))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def loader(data: TensorDataset, seed: int = 1) -> DataLoader:
    return make_loader(data, BATCH, gen(seed))


def sgd_local(**changes: Any) -> LocalSection:
    return LocalSection(**{"epochs": 1, "batch_size": BATCH, "optimizer": "sgd", "lr": 0.1, **changes})


def one_step(client: DPSGDClient, model: torch.nn.Module, lr: float, data: TensorDataset) -> None:
    optimizer, private_loader = client.attach(model, torch.optim.SGD(model.parameters(), lr=lr), loader(data))
    optimizer.zero_grad(set_to_none=True)
    ToyTask().loss(model, next(iter(private_loader))).backward()
    optimizer.step()


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class LiveOpacus:
    """Opacus used the usual way: one PrivacyEngine whose accountant sees every round live."""

    def __init__(self, accountant: str, sigma: float) -> None:
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            self.engine = PrivacyEngine(accountant=accountant)
        self.sigma = sigma

    def attach(self, model, optimizer, data_loader):
        _, optimizer, data_loader = self.engine.make_private(
            module=model, optimizer=optimizer, data_loader=data_loader, noise_multiplier=self.sigma,
            max_grad_norm=1.0, noise_generator=gen(7), wrap_model=False)
        return optimizer, data_loader


# --- Opacus on the trainer's original model ------------------------------------------------------
def test_hooks_on_the_original_model_record_exact_per_sample_gradients() -> None:
    model, reference = mlp(), mlp()
    client = DPSGDClient(DPSGDParams(noise_multiplier=1.0), generator=gen(0))
    client.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), loader(dataset()))
    x, y = dataset()[:5]
    ToyTask().loss(model, (x, y)).backward()  # the original object, as client/trainer.py calls it
    per_example = [torch.autograd.grad(F.cross_entropy(reference(x[i:i + 1]), y[i:i + 1]), list(reference.parameters()))
                   for i in range(5)]
    for index, p in enumerate(model.parameters()):
        assert p.grad_sample.shape == (5, *p.shape)
        assert torch.allclose(p.grad_sample, torch.stack([g[index] for g in per_example]), atol=1e-6)
    client.close()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_update_is_the_mean_of_clipped_per_sample_gradients() -> None:
    data, lr, clip = dataset(), 0.5, 0.05
    model, reference = mlp(), mlp()
    client = DPSGDClient(DPSGDParams(noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False),
                         generator=gen(0))
    before = flat(model)
    one_step(client, model, lr, data)
    x, y = next(iter(loader(data)))  # the same shuffled batch (poisson_sampling=False keeps the loader)
    grads = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        F.cross_entropy(reference(x[i:i + 1]), y[i:i + 1]), list(reference.parameters()))]) for i in range(len(x))]
    norms = torch.stack([g.norm() for g in grads])
    assert norms.min() > 2 * clip  # every example is clipped: the bound is not vacuous
    clipped = sum(g * min(1.0, clip / (float(g.norm()) + 1e-6)) for g in grads)
    update = flat(model) - before
    assert torch.allclose(update, -lr * clipped / BATCH, atol=1e-7)
    assert update.norm() <= lr * clip * (1 + 1e-5)  # ‖Δw‖ ≤ η·C·|B|/(q n) with |B| = q n


def test_noise_has_std_sigma_c_over_batch_and_comes_from_the_given_generator() -> None:
    sigma, clip, lr, width = 2.0, 0.5, 1.0, 200
    data = TensorDataset(torch.randn(N, width), torch.zeros(N, dtype=torch.long))

    class ZeroLoss:  # per-sample gradients are all 0: the update is the noise alone
        def loss(self, model, batch):
            return 0.0 * model(batch[0]).mean()

    def step(seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Linear(width, 50)
        before = flat(model)
        client = DPSGDClient(DPSGDParams(noise_multiplier=sigma, max_grad_norm=clip, poisson_sampling=False),
                             generator=gen(seed))
        optimizer, private_loader = client.attach(model, torch.optim.SGD(model.parameters(), lr=lr),
                                                  make_loader(data, BATCH, gen(1)))
        optimizer.zero_grad(set_to_none=True)
        ZeroLoss().loss(model, next(iter(private_loader))).backward()
        optimizer.step()
        return model, flat(model) - before

    model, update = step(seed=3)
    expected_std = lr * sigma * clip / BATCH
    assert update.std().item() == pytest.approx(expected_std, rel=0.03)  # 10 050 draws: ~0.7% sampling error
    assert abs(update.mean().item()) < 4 * expected_std / math.sqrt(update.numel())
    g = gen(3)  # the same seed gives exactly Opacus's draws, parameter by parameter
    noise = torch.cat([torch.normal(0.0, sigma * clip, size=p.shape, generator=g).reshape(-1)
                       for p in model.parameters()])
    assert torch.allclose(update, -lr * noise / BATCH, atol=1e-7)
    assert torch.equal(step(seed=3)[1], update)
    assert not torch.allclose(step(seed=4)[1], update)


def test_no_noise_and_no_clipping_trains_exactly_like_plain_sgd() -> None:
    data, local = dataset(), sgd_local(epochs=2, momentum=0.9)
    plain, private = mlp(), mlp()
    fit(plain, ToyTask(), data, local, ClientRule(StrategyParams()), gen(5))
    client = DPSGDClient(DPSGDParams(noise_multiplier=0.0, max_grad_norm=1e6, poisson_sampling=False),
                         generator=gen(0), epochs=2)
    result = fit(private, ToyTask(), data, local, ClientRule(StrategyParams()), gen(5), private=client)
    assert result.steps == 8
    assert not torch.allclose(flat(plain), flat(mlp()))  # training moved the weights
    assert torch.allclose(flat(private), flat(plain), atol=1e-6)
    assert client.history() == [(0.0, 0.25, 8)]
    assert client.epsilon() == math.inf  # clipping alone is not DP


# --- accountant history ----------------------------------------------------------------------------
# Accounting tests use q = 1/50 (Opacus's RDP of a subsampled Gaussian is slow to compute for large q);
# 13% of these Poisson batches are empty (0.98^100).
ACCOUNTING_DATA, ACCOUNTING_STEPS, ACCOUNTING_RATE = dataset(100), 5, 0.02


def private_round(private: Any, seed: int) -> None:
    """One round of ACCOUNTING_STEPS steps; an empty batch takes DPSGDClient.noise_step (where
    client/trainer.py would raise NonFiniteLossError on its NaN mean loss)."""
    model = mlp()
    optimizer, private_loader = private.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                               make_loader(ACCOUNTING_DATA, 2, gen(seed)))
    for _, batch in zip(range(ACCOUNTING_STEPS), private_loader):
        if isinstance(private, DPSGDClient) and private.is_empty(batch):
            private.noise_step(optimizer)
            continue
        optimizer.zero_grad(set_to_none=True)
        ToyTask().loss(model, batch).backward()  # Opacus's own loop: NaN loss, zero per-sample gradients
        optimizer.step()


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_from_the_stored_history_equals_opacus_accountant_that_saw_every_round(accountant: str) -> None:
    state, live = RecordDict(), LiveOpacus(accountant, 1.0)
    for k, sigma in enumerate([1.0, 1.0, 1.5]):  # round k: a fresh model and client, the state kept
        client = DPSGDClient(DPSGDParams(noise_multiplier=sigma, accountant=accountant), generator=gen(10 + k),
                             prior=load_history(state), max_steps=ACCOUNTING_STEPS)
        private_round(client, seed=20 + k)
        append_history(state, client.history())
        live.sigma = sigma  # Opacus's own way: one engine, its accountant kept in memory across rounds
        private_round(live, seed=20 + k)
    history = load_history(state)
    assert history == live.engine.accountant.history == [(1.0, ACCOUNTING_RATE, 10), (1.5, ACCOUNTING_RATE, 5)]
    stored = epsilon(history, DELTA, accountant)
    assert stored == pytest.approx(live.engine.get_epsilon(DELTA), rel=1e-9, abs=1e-9)
    assert client.epsilon() == stored
    assert 0.0 < epsilon(history[:1], DELTA, accountant) < stored  # the third round cost something


def test_history_survives_the_node_state_checkpoint_and_the_wire() -> None:
    history = [(1.1, 0.01, 100), (0.9, 0.02, 7)]
    state = RecordDict()
    save_history(state, history)
    buffer = io.BytesIO()
    torch.save(to_plain(state), buffer)  # what a checkpoint's state.pt holds
    buffer.seek(0)
    assert load_history(from_plain(torch.load(buffer, weights_only=False))) == history
    proto = ProtoRecordDict()
    proto.ParseFromString(recorddict_to_proto(state).SerializeToString())  # an export_state reply
    restored = recorddict_from_proto(proto)
    assert load_history(restored) == history
    assert epsilon(load_history(restored), DELTA) == epsilon(history, DELTA) > 0
    assert load_history(RecordDict()) == []
    assert ACCOUNTANT_KEY in state


def test_history_merges_consecutive_rounds_like_opacus_accountants() -> None:
    accountant = make_accountant([], "rdp")
    for sigma, rate, steps in [(1.0, 0.1, 3), (1.0, 0.1, 2), (2.0, 0.1, 1), (1.0, 0.1, 4)]:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=rate)
    merged: list = []
    for entry in [(1.0, 0.1, 3), (1.0, 0.1, 2), (2.0, 0.1, 1), (1.0, 0.2, 0), (1.0, 0.1, 4)]:
        merged = merge_history(merged, [entry])
    assert merged == accountant.history == [(1.0, 0.1, 5), (2.0, 0.1, 1), (1.0, 0.1, 4)]


# --- budget ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_target_epsilon_calibrates_sigma_and_stops_the_client_after_the_planned_rounds(accountant: str) -> None:
    target, rounds = 1.0, 2
    params = DPSGDParams(target_epsilon=target, accountant=accountant)
    state = RecordDict()
    for k in range(rounds):
        client = DPSGDClient(params, generator=gen(k), prior=load_history(state), rounds=rounds,
                             max_steps=ACCOUNTING_STEPS)
        private_round(client, seed=30 + k)
        append_history(state, client.history())
    assert client.noise_multiplier == calibrate_noise(target, DELTA, ACCOUNTING_RATE, 10, accountant)
    spent = epsilon(load_history(state), DELTA, accountant)
    assert target - 0.01 <= spent <= target  # calibrated: within the search tolerance, never above
    assert budget_left(load_history(state), DELTA, accountant, target) == pytest.approx(target - spent)
    extra = DPSGDClient(params, generator=gen(9), prior=load_history(state), rounds=rounds,
                        max_steps=ACCOUNTING_STEPS)
    model = mlp()
    with pytest.raises(PrivacyBudgetExhausted) as refused:
        extra.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), make_loader(ACCOUNTING_DATA, 2, gen(0)))
    assert "\n" not in str(refused.value) and "target_epsilon 1 " in str(refused.value)
    assert refused.value.spent == pytest.approx(spent) and refused.value.next_epsilon > target
    assert not hasattr(next(model.parameters()), "grad_sample")  # refused before Opacus touched the model


def test_budget_check_raises_at_the_first_round_that_would_overspend() -> None:
    target, round_steps = 4.0, [(1.0, 0.1, 10)]
    reference = make_accountant([], "rdp")  # an independent count: Opacus stepping one step at a time
    history: list = []
    for k in range(1, 50):  # noqa: B007 - read after the loop
        for _ in range(10):
            reference.step(noise_multiplier=1.0, sample_rate=0.1)
        if reference.get_epsilon(DELTA) > target:
            with pytest.raises(PrivacyBudgetExhausted):
                check_budget(history, round_steps, delta=DELTA, accountant="rdp", target_epsilon=target)
            break
        assert check_budget(history, round_steps, delta=DELTA, accountant="rdp",
                            target_epsilon=target) == pytest.approx(reference.get_epsilon(DELTA))
        history = merge_history(history, round_steps)
    assert 1 < k < 49 and epsilon(history, DELTA) <= target


# --- models and configurations ---------------------------------------------------------------------
def test_batchnorm_model_is_rejected_with_the_norm_setting_or_converted() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, CLASSES))
    with pytest.raises(ValueError, match=r"BatchNorm layers \(1\).*task\.params\.norm: group") as rejected:
        check_model(model)
    assert "\n" not in str(rejected.value)
    with pytest.raises(ValueError, match="task.params.norm"):
        DPSGDClient(DPSGDParams(noise_multiplier=1.0), generator=gen(0)).attach(
            model, torch.optim.SGD(model.parameters(), lr=0.1), loader(dataset()))
    converted = check_model(model, convert=True)
    assert isinstance(converted[1], torch.nn.GroupNorm) and converted[1].num_groups == 8
    assert isinstance(model[1], torch.nn.BatchNorm1d)  # the original is left alone
    assert check_model(converted) is None and check_model(mlp()) is None


def test_batchnorm_without_parameters_is_rejected_although_opacus_validator_accepts_it() -> None:
    from opacus.validators import ModuleValidator

    model = torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.BatchNorm1d(8, affine=False),
                                torch.nn.Linear(8, CLASSES))
    assert ModuleValidator.is_valid(model)  # it mixes the batch all the same
    with pytest.raises(ValueError, match="BatchNorm"):
        check_model(model)
    assert isinstance(check_model(model, convert=True)[1], torch.nn.GroupNorm)


def test_params_need_noise_or_budget_and_forbid_unknown_keys() -> None:
    with pytest.raises(ValueError, match="noise_multiplier or target_epsilon"):
        DPSGDParams()
    with pytest.raises(ValueError, match="extra"):
        DPSGDParams(noise_multiplier=1.0, clip=1.0)
    with pytest.raises(ValueError):
        DPSGDParams(noise_multiplier=1.0, secure_mode=True)
    assert DPSGDParams(target_epsilon=8.0).accountant == "rdp"


# --- steps the trainer must route through the client -------------------------------------------
def test_empty_poisson_batch_still_takes_a_noisy_counted_step() -> None:
    sigma, clip, lr = 1.0, 1.0, 0.1
    model = mlp()
    client = DPSGDClient(DPSGDParams(noise_multiplier=sigma, max_grad_norm=clip), generator=gen(0))
    optimizer, _ = client.attach(model, torch.optim.SGD(model.parameters(), lr=lr), loader(dataset()))
    empty = (torch.empty(0, DIM), torch.empty(0, dtype=torch.long))
    assert client.is_empty(empty) and client.is_empty({"x": empty[0]}) and not client.is_empty(dataset()[:2])
    before = flat(model)
    client.noise_step(optimizer)
    update = flat(model) - before
    assert bool((update != 0).all())  # pure noise: N(0, (σC)²)·η/(qn) on every weight
    assert update.abs().max() < 6 * lr * sigma * clip / BATCH
    assert client.history() == [(sigma, 0.25, 1)]


def test_gradient_edits_before_the_step_are_discarded_and_after_noise_ones_apply() -> None:
    lr, data = 0.1, dataset()

    def run(edit_before_step: bool, after_noise: Any) -> torch.Tensor:
        model = mlp()
        client = DPSGDClient(DPSGDParams(noise_multiplier=0.5, poisson_sampling=False), generator=gen(0),
                             after_noise=after_noise)
        optimizer, private_loader = client.attach(model, torch.optim.SGD(model.parameters(), lr=lr), loader(data))
        optimizer.zero_grad(set_to_none=True)
        ToyTask().loss(model, next(iter(private_loader))).backward()
        if edit_before_step:  # where client/trainer.py calls rule.after_backward (SCAFFOLD's correction)
            for p in model.parameters():
                p.grad.add_(1.0)
        optimizer.step()
        return flat(model)

    def add_one(model: torch.nn.Module) -> None:
        for p in model.parameters():
            p.grad.add_(1.0)

    private = run(False, None)
    assert torch.equal(run(True, None), private)  # DPOptimizer rebuilt p.grad from grad_sample
    assert torch.allclose(run(False, add_one), private - lr, atol=1e-6)


@pytest.mark.parametrize("history", [[(1.1, 0.2, 150)], [(1.1, 0.2, 150), (1.3, 0.25, 40)], [(0.7, 0.02, 3), (2.0, 1.0, 1)]])
def test_rdp_epsilon_from_cached_per_step_curves_equals_opacus_accountant(history) -> None:

    reference = float(make_accountant(history, "rdp").get_epsilon(delta=1e-5))
    assert epsilon(history, 1e-5, "rdp") == reference  # RDP is linear in steps: the same number exactly
    assert epsilon(history, 1e-5, "rdp") == reference  # and again from the per-process cache


def test_first_round_check_refuses_a_noise_multiplier_that_one_round_already_overspends() -> None:
    local = LocalSection(epochs=1, batch_size=32)
    sites = {0: (5, local), 1: (5, local), 2: (20, local)}  # q = 1/5 (5 steps) at two sites, 1/20 at one
    over = epsilon([(1.0, 0.2, 5)], DELTA)
    assert over > 4.0 > epsilon([(1.0, 0.05, 20)], DELTA)
    with pytest.raises(ValueError) as refused:
        check_first_round(DPSGDParams(noise_multiplier=1.0, target_epsilon=4.0), sites, rounds=30)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("privacy.params: ")
    assert "at 2 of 3 sites" in message and f"ε = {over:.4g}" in message and "site 0" in message
    check_first_round(DPSGDParams(noise_multiplier=1.0, target_epsilon=over + 0.01), sites, rounds=30)
    check_first_round(DPSGDParams(target_epsilon=4.0), sites, rounds=30)  # calibrated: never refused
    check_first_round(DPSGDParams(noise_multiplier=1.0), sites, rounds=30)  # no budget: nothing to refuse


def test_round_entry_is_what_attach_uses() -> None:
    params = DPSGDParams(target_epsilon=2.0)
    client = DPSGDClient(params, generator=gen(0), rounds=3, max_steps=ACCOUNTING_STEPS)
    model = mlp()
    loader = make_loader(ACCOUNTING_DATA, 2, gen(0))
    client.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
    client.close()
    entry = round_entry(params, len(loader), rounds=3, epochs=1, max_steps=ACCOUNTING_STEPS)
    assert entry == (client.noise_multiplier, client.sample_rate, min(len(loader), ACCOUNTING_STEPS))
