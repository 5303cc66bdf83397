"""Same seed, same trained numbers: the training loop's results pinned bit for bit.

``GOLDEN`` holds what main's ``passes/finetune.py`` produced (commit 79df1f8, before the training loop moved to
``passes/train.py``) for a set of runs that together reach every branch of the loop: each optimizer, each
scheduler (per step, per epoch, a user factory), ``max_steps_per_epoch``, ``eval_fn`` with keep best/last and both
modes, distillation (KL with a temperature, MSE, weighted with a loss, bare inputs), the ``sum`` rule, exact-zero
codewords under weight decay, trained biases and norms, and ``finetune_float`` with masks. A digest covers every
parameter and buffer of the model afterwards; the history is compared exactly (floats by ``repr``).

Tiny models, one thread: exact float results depend on the CPU's kernels (the pinned torch 2.13.0 CPU build picks
them by ``torch.backends.cpu.get_cpu_capability()``), so ``GOLDEN_BY_CPU`` holds one set per CPU it was generated
on, each from 79df1f8's code, never from the code under test. On a CPU capability with no set of its own, a result
matching none of them skips with a note (regenerate: ``PYTHONPATH=<79df1f8 unpacked, passes/ and export/ copied
into udnc_fx/> python tests/passes/test_train_golden.py``); on a CPU with a set, it must match.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import udnc_fx
from udnc_fx.passes.finetune import finetune, finetune_float


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 4)
        self.ln = nn.LayerNorm(4)

    def forward(self, x):
        return self.ln(self.fc2(F.relu(self.bn(self.fc1(x)))))


class NoLen:
    """A re-iterable without ``len``: the scheduler steps once per epoch."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _batches(seed: int, count: int = 4, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(count)]


def _float_model(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    return SmallNet().eval()


def _compressed(seed: int = 0, **config):
    config = {"step": 0.1, "seed": 5, **config}
    return udnc_fx.compress(_float_model(seed), udnc_fx.CompressConfig(**config))


def _digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(list(model.named_parameters()) + list(model.named_buffers())):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _summary(model, result):
    history = [
        (h["epoch"], repr(h["loss"]), repr(h["metric"]), repr(h["lr"]), h["steps"]) for h in result.history
    ]
    return {
        "digest": _digest(model),
        "history": history,
        "best": (result.best_epoch, repr(result.best_metric), result.kept, result.steps),
    }


def _probe_metric(batch):
    x, y = batch

    def metric(m):
        return -float(F.cross_entropy(m(x), y))

    return metric


def scenario_default_adam_cosine():
    gm = _compressed()
    r = finetune(gm, _batches(1), F.cross_entropy, epochs=2, progress=False)
    return _summary(gm, r)


def scenario_sgd_wd_exact_zero_bias_norm():
    gm = _compressed(exact_zero=True, step=0.2)
    r = finetune(gm, _batches(2), F.cross_entropy, epochs=2, lr=5e-2, optimizer="sgd", weight_decay=1e-2,
                 train_bias=True, train_norm=True, scheduler="constant", progress=False)
    return _summary(gm, r)


def scenario_adamw_no_len_per_epoch_cap_keep_best():
    gm = _compressed()
    r = finetune(gm, NoLen(_batches(3, count=5)), F.cross_entropy, epochs=3, lr=2e-2, optimizer="adamw",
                 weight_decay=1e-3, max_steps_per_epoch=3, eval_fn=_probe_metric(_batches(9, 1)[0]), keep="best",
                 train_norm=True, progress=False)
    return _summary(gm, r)


def scenario_keep_last_mode_min_sum_rule():
    gm = _compressed()
    r = finetune(gm, _batches(4), F.cross_entropy, epochs=2, lr=1e-2, grad_rule="sum", scheduler=None,
                 eval_fn=lambda m: -_probe_metric(_batches(9, 1)[0])(m), keep="last", mode="min",
                 max_steps_per_epoch=2, progress=False)
    return _summary(gm, r)


def scenario_user_factories():
    gm = _compressed()
    r = finetune(gm, _batches(5), F.cross_entropy, epochs=2, lr=0.1,
                 optimizer=lambda groups, lr: torch.optim.SGD(groups, lr=lr),
                 scheduler=lambda opt, total: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9),
                 progress=False)
    return _summary(gm, r)


def scenario_distill_kl_bare_inputs():
    teacher = _float_model(1)
    gm = _compressed(seed=1)
    inputs = [x for x, _ in _batches(6)]
    r = finetune(gm, inputs, teacher=teacher, temperature=2.0, epochs=2, lr=1e-2, progress=False)
    return _summary(gm, r)


def scenario_distill_mse_weighted_with_loss():
    teacher = _float_model(2)
    gm = _compressed(seed=2)
    r = finetune(gm, _batches(7), F.cross_entropy, teacher=teacher, distill="mse", distill_weight=0.5, epochs=2,
                 lr=1e-2, train_bias=True, progress=False)
    return _summary(gm, r)


def scenario_finetune_float_masks():
    model = _float_model(3)
    g = torch.Generator().manual_seed(11)
    masks = {"fc1.weight": torch.rand(8, 6, generator=g) > 0.5, "fc2.weight": torch.rand(4, 8, generator=g) > 0.3}
    r = finetune_float(model, masks, _batches(8), F.cross_entropy, epochs=2, lr=1e-2, weight_decay=1e-3,
                       eval_fn=_probe_metric(_batches(9, 1)[0]), progress=False)
    return _summary(model, r)


SCENARIOS = {name: fn for name, fn in globals().items() if name.startswith("scenario_")}

#: 79df1f8's results on the machine the tests were first written on (its CPU capability was not recorded).
_GOLDEN_FIRST: dict = {'scenario_adamw_no_len_per_epoch_cap_keep_best': {'best': (1, '-1.607128620147705', 'best', 9),
                                                   'digest': 'a90c9e15706c47879296d2bcea28a917',
                                                   'history': [(0, 'None', '-1.6554555892944336', '0.02', 0),
                                                               (1,
                                                                '1.8465120792388916',
                                                                '-1.607128620147705',
                                                                '0.015',
                                                                3),
                                                               (2,
                                                                '1.6236833731333415',
                                                                '-1.6743004322052002',
                                                                '0.005000000000000003',
                                                                6),
                                                               (3,
                                                                '1.5498261054356892',
                                                                '-1.6890348196029663',
                                                                '0.0',
                                                                9)]},
 'scenario_default_adam_cosine': {'best': (None, 'None', 'last', 8),
                                  'digest': '2166cbe0a140687b0fceea32679f8484',
                                  'history': [(1, '2.1343786120414734', 'None', '0.0005', 4),
                                              (2, '2.126282513141632', 'None', '0.0', 8)]},
 'scenario_distill_kl_bare_inputs': {'best': (None, 'None', 'last', 8),
                                     'digest': 'a6cc8536b15895a27b6d026ed85e0965',
                                     'history': [(1, '0.00642180594149977', 'None', '0.005', 4),
                                                 (2, '0.0035592002095654607', 'None', '0.0', 8)]},
 'scenario_distill_mse_weighted_with_loss': {'best': (None, 'None', 'last', 8),
                                             'digest': '1d39e0f8d19a55b2976a6159f336f663',
                                             'history': [(1, '1.8874468505382538', 'None', '0.005', 4),
                                                         (2, '1.7631999552249908', 'None', '0.0', 8)]},
 'scenario_finetune_float_masks': {'best': (1, '-2.1338250637054443', 'best', 8),
                                   'digest': '325add3ee787c437cefa1ee94f0ec3d8',
                                   'history': [(0, 'None', '-2.1588387489318848', '0.01', 0),
                                               (1, '1.927845060825348', '-2.1338250637054443', '0.005', 4),
                                               (2, '1.7995184063911438', '-2.1406116485595703', '0.0', 8)]},
 'scenario_keep_last_mode_min_sum_rule': {'best': (2, '1.7099287509918213', 'last', 4),
                                          'digest': 'd1ff41fcae788870b35a4f740698bb10',
                                          'history': [(0, 'None', '1.6554555892944336', '0.01', 0),
                                                      (1, '1.861560046672821', '1.6874932050704956', '0.01', 2),
                                                      (2, '1.769893229007721', '1.7099287509918213', '0.01', 4)]},
 'scenario_sgd_wd_exact_zero_bias_norm': {'best': (None, 'None', 'last', 8),
                                          'digest': 'c30d83e225a3e9edc49d77713382e80a',
                                          'history': [(1, '2.046577215194702', 'None', '0.05', 4),
                                                      (2, '1.6093915700912476', 'None', '0.05', 8)]},
 'scenario_user_factories': {'best': (None, 'None', 'last', 8),
                             'digest': 'b70e6db7015eea920a0e9b57b1b1da7d',
                             'history': [(1, '1.7837953865528107', 'None', '0.06561000000000002', 4),
                                         (2, '1.66551274061203', 'None', '0.043046721000000024', 8)]}}

#: 79df1f8's results on an AMD EPYC with capability AVX2 (stop 18; the code under test matched them there).
_GOLDEN_AVX2: dict = {'scenario_adamw_no_len_per_epoch_cap_keep_best': {'best': (1, '-1.6071285009384155', 'best', 9),
                                                   'digest': '8298e5fa88d6c83a442f3c3a764690d6',
                                                   'history': [(0, 'None', '-1.6554555892944336', '0.02', 0),
                                                               (1,
                                                                '1.8465120792388916',
                                                                '-1.6071285009384155',
                                                                '0.015',
                                                                3),
                                                               (2,
                                                                '1.623683253924052',
                                                                '-1.674300193786621',
                                                                '0.005000000000000003',
                                                                6),
                                                               (3,
                                                                '1.5498261451721191',
                                                                '-1.6890349388122559',
                                                                '0.0',
                                                                9)]},
 'scenario_default_adam_cosine': {'best': (None, 'None', 'last', 8),
                                  'digest': 'c3919564dc103d4ffccd4a6e28e466e4',
                                  'history': [(1, '2.134378671646118', 'None', '0.0005', 4),
                                              (2, '2.126282513141632', 'None', '0.0', 8)]},
 'scenario_distill_kl_bare_inputs': {'best': (None, 'None', 'last', 8),
                                     'digest': '22039d3dfa88489dee3f29226f08168c',
                                     'history': [(1, '0.006421739934012294', 'None', '0.005', 4),
                                                 (2, '0.0035592172062024474', 'None', '0.0', 8)]},
 'scenario_distill_mse_weighted_with_loss': {'best': (None, 'None', 'last', 8),
                                             'digest': 'e99b4e9dfc86003b005e598b9df8be3d',
                                             'history': [(1, '1.8874468505382538', 'None', '0.005', 4),
                                                         (2, '1.7632000148296356', 'None', '0.0', 8)]},
 'scenario_finetune_float_masks': {'best': (1, '-2.1338253021240234', 'best', 8),
                                   'digest': 'a13c4acf12491b113f150917485045da',
                                   'history': [(0, 'None', '-2.1588387489318848', '0.01', 0),
                                               (1, '1.927845060825348', '-2.1338253021240234', '0.005', 4),
                                               (2, '1.7995184063911438', '-2.140611171722412', '0.0', 8)]},
 'scenario_keep_last_mode_min_sum_rule': {'best': (2, '1.7099285125732422', 'last', 4),
                                          'digest': '9f7daa5f9b10f2be330d15d860b01667',
                                          'history': [(0, 'None', '1.6554555892944336', '0.01', 0),
                                                      (1, '1.8615601658821106', '1.6874932050704956', '0.01', 2),
                                                      (2, '1.769893229007721', '1.7099285125732422', '0.01', 4)]},
 'scenario_sgd_wd_exact_zero_bias_norm': {'best': (None, 'None', 'last', 8),
                                          'digest': '8fa3c9a217bbefaf5753225ff22a1ebd',
                                          'history': [(1, '2.046577513217926', 'None', '0.05', 4),
                                                      (2, '1.6093916594982147', 'None', '0.05', 8)]},
 'scenario_user_factories': {'best': (None, 'None', 'last', 8),
                             'digest': 'd314b5eb38e1e2d15bd9466aca2f4a2a',
                             'history': [(1, '1.7837953865528107', 'None', '0.06561000000000002', 4),
                                         (2, '1.6655127108097076', 'None', '0.043046721000000024', 8)]}}

GOLDEN_BY_CPU: dict = {None: _GOLDEN_FIRST, "AVX2": _GOLDEN_AVX2}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_training_numerics_match_main_bit_for_bit(name):
    result = SCENARIOS[name]()
    if any(result == golden[name] for golden in GOLDEN_BY_CPU.values()):
        return
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in GOLDEN_BY_CPU:
        pytest.skip(f"no golden results for CPU capability {capability!r}; regenerate them from 79df1f8 (see the docstring)")
    assert result == GOLDEN_BY_CPU[capability][name]


if __name__ == "__main__":  # prints GOLDEN from the code on the import path (run it on main's code only)
    import pprint

    torch.set_num_threads(1)
    pprint.pprint({name: SCENARIOS[name]() for name in sorted(SCENARIOS)}, width=118)
