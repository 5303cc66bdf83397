"""Progress bars: drawn only on a terminal (or when forced), never into logs or pipes."""

import torch
from torch import nn

import udnc_fx
from udnc_fx.progress import progress_enabled


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_progress_enabled_follows_the_terminal_unless_told(monkeypatch):
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.setattr("sys.stderr", Stream(False))
    assert not progress_enabled(None)
    assert progress_enabled(True)
    monkeypatch.setattr("sys.stderr", Stream(True))
    assert progress_enabled(None)
    assert not progress_enabled(False)


def test_compress_draws_a_layer_bar_only_when_asked(capsys):
    config = udnc_fx.CompressConfig(target_bits=3.0, seed=0)
    udnc_fx.compress(_model(), config)  # stderr is not a terminal under pytest: no bar
    assert "quantizing" not in capsys.readouterr().err
    udnc_fx.compress(_model(), config, progress=False)
    assert "quantizing" not in capsys.readouterr().err
    forced = udnc_fx.compress(_model(), config, progress=True)
    assert "quantizing" in capsys.readouterr().err
    # the bar changes nothing in the result
    plain = udnc_fx.compress(_model(), config, progress=False)
    x = torch.randn(3, 16)
    assert torch.equal(forced(x), plain(x))
