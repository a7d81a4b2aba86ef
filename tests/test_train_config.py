"""sagan-train's options as TrainConfig declares them: every flag and config-file key, default and
check reaches the command line and config files from that one declaration."""
import json

import pytest

from sagan_ext import train, train_config
from sagan_ext.train_config import TrainConfig, UsageError

# what sagan-train took before its options became TrainConfig's fields: none may go or change
FLAGS = ['--amp', '--attention', '--attention-res', '--batch-size', '--beta1', '--beta2', '--ch', '--channels-last',
         '--checkpoint-every', '--compile', '--config', '--d-ch', '--d-steps', '--dataset', '--device', '--ema-decay',
         '--eval-every', '--eval-samples', '--gp-weight', '--help', '--image-size', '--inception', '--keep-checkpoints',
         '--log-every', '--loss', '--lr-d', '--lr-g', '--max-loss', '--no-progress', '--ops', '--out', '--overwrite',
         '--resume', '--seed', '--steps', '--sync-bn', '--threads', '--unconditional', '--version', '--z-dim', '-h']
DEFAULTS = {'dataset': 'digits', 'image_size': 32, 'steps': 1500, 'batch_size': 32, 'out': 'runs/sagan', 'resume': None,
            'device': 'auto', 'ops': 'fused', 'attention': 'sagan', 'attention_res': None, 'unconditional': False,
            'ch': 16, 'd_ch': None, 'z_dim': 128, 'loss': 'hinge', 'gp_weight': 10.0, 'lr_g': 0.0001, 'lr_d': 0.0004,
            'beta1': 0.0, 'beta2': 0.9, 'd_steps': 1, 'ema_decay': 0.999, 'amp': 'none', 'channels_last': False,
            'compile': False, 'seed': 0, 'sync_bn': False, 'log_every': 25, 'eval_every': 250, 'eval_samples': 1000,
            'checkpoint_every': 250, 'keep_checkpoints': 3, 'inception': None, 'progress': True, 'threads': None,
            'max_loss': 10000.0, 'overwrite': False}
RUNTIME = {'checkpoint_every', 'compile', 'device', 'eval_every', 'eval_samples', 'inception', 'keep_checkpoints',
           'log_every', 'max_loss', 'out', 'overwrite', 'progress', 'resume', 'steps', 'threads'}


def test_every_flag_key_default_and_resumable_option_is_as_it_was():
    parser = train_config.parser()
    assert sorted(o for action in parser._actions for o in action.option_strings) == FLAGS
    assert {a.dest for a in parser._actions} - {"help", "version", "config"} == set(TrainConfig.names())
    assert TrainConfig().as_dict() == DEFAULTS == train.DEFAULTS
    assert TrainConfig.runtime_names() == RUNTIME


def test_the_command_line_and_a_config_file_set_every_option_alike(tmp_path):
    """Each option through its flag and through its config-file key (with '_' or '-') gives the
    same TrainConfig; flags without a value (store_true, --no-progress) flip their default."""
    values = dict(dataset="d.npz", image_size=64, steps=7, batch_size=3, out=str(tmp_path / "o"), device="cpu",
                  ops="eager", attention="biggan", attention_res=16, unconditional=True, ch=24, d_ch=8, z_dim=5,
                  loss="ns", gp_weight=2.5, lr_g=3e-4, lr_d=5e-4, beta1=0.5, beta2=0.99, d_steps=2, ema_decay=0.5,
                  amp="bf16", channels_last=True, compile=True, sync_bn=True, seed=4, threads=2, log_every=3,
                  eval_every=4, eval_samples=6, checkpoint_every=8, keep_checkpoints=2, max_loss=5.0, progress=False,
                  overwrite=True)
    argv = []
    for name, value in values.items():
        if isinstance(value, bool):
            argv.append("--no-progress" if name == "progress" else train_config.flag(name))
        else:
            argv += [train_config.flag(name), str(value)]
    from_command_line = train_config.explicit_options(argv)
    (tmp_path / "options.json").write_text(json.dumps({k.replace("_", "-") if i % 2 else k: v
                                                       for i, (k, v) in enumerate(values.items())}))
    from_file = train_config.explicit_options(["--config", str(tmp_path / "options.json")])
    assert from_command_line == from_file == values
    assert TrainConfig(**{**DEFAULTS, **values}).as_dict() == {**DEFAULTS, **values}


@pytest.mark.parametrize("option, value, message", [
    ("threads", 0, "--threads must be a positive integer, got 0"),
    ("max_loss", -1.0, "--max-loss must be a number >= 0 (0: off), got -1.0"),
    ("ema_decay", 1.0, "--ema-decay must be in [0, 1), got 1.0"),
    ("inception", "no/such/file.pt", "--inception no/such/file.pt: no such file"),
    ("keep_checkpoints", 2.5, "--keep-checkpoints must be a positive integer, got 2.5"),
    # a config file's values arrive as written: a type or choice argparse would have refused
    ("ema_decay", "0.99", "--ema-decay must be in [0, 1), got '0.99'"),
    ("lr_g", True, "--lr-g must be a number, got True"),
    ("compile", "yes", "--compile must be true or false, got 'yes'"),
    ("inception", 5, "--inception must be a string or none, got 5"),
    ("loss", "wgan", "--loss must be one of ['hinge', 'ns', 'wgan-gp'], got 'wgan'"),
])
def test_each_declared_check_names_its_flag(option, value, message):
    TrainConfig(**{**DEFAULTS, option: DEFAULTS[option]}).check()
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        TrainConfig(**{**DEFAULTS, option: value}).check()


def test_options_saved_by_an_earlier_version_load_with_todays_defaults():
    saved = {k: v for k, v in DEFAULTS.items() if k not in ("sync_bn", "threads", "max_loss", "overwrite")}
    config = TrainConfig.from_saved({**saved, "ch": 8, "an_option_since_removed": 1})
    assert config.ch == 8 and config.max_loss == 1e4 and config["ch"] == 8
