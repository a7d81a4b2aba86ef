"""The trainer: tiny runs of every image size on both --ops, exact resume, a 2-process DDP run,
NaN handling, bad arguments, the gradient penalty against the eager model, data loaders, metrics."""
import os
import pickle
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from sagan_ext import data, evaluation, models, train
from sagan_ext_testing import ROOT, TINY, free_port, metrics, run


@pytest.mark.parametrize("image_size", [32, 64, 128])
@pytest.mark.parametrize("ops", ["fused", "eager"])
def test_tiny_run_writes_everything(tmp_path, classifier_file, image_size, ops):
    extra = ["--amp", "bf16", "--channels-last", "--attention", "biggan"] if image_size == 64 else []
    assert run(tmp_path, classifier_file, "--image-size", str(image_size), "--ops", ops, "--steps", "2",
               "--eval-every", "2", "--checkpoint-every", "2", *extra) == 0
    rows = metrics(tmp_path)
    assert [int(r["step"]) for r in rows] == [1, 2]
    for key in ("loss_d", "loss_g", "d_real", "d_fake", "gamma/G.attention", "sigma/D.embed"):
        assert np.isfinite(float(rows[-1][key])), key
    assert 0 <= float(rows[-1]["class_consistency"]) <= 1 and float(rows[-1]["fd_proxy"]) > 0
    for name in ("samples/latest.png", "samples/step_0000002.png", "attention/G_latest.png", "attention/D_latest.png",
                 "checkpoints/step_0000002.pt", "config.json"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tensorboard").iterdir())
    from PIL import Image
    with Image.open(tmp_path / "samples" / "latest.png") as im:  # 10 class rows of 8 samples
        assert im.size == (8 * (image_size + 2), 10 * (image_size + 2))


def test_a_first_kernel_build_is_announced_before_the_progress_bar_starts(tmp_path, classifier_file, monkeypatch,
                                                                          capsys):
    """The JIT build of the kernels (here: its announcement, then the real loader, which finds
    the library built) runs before the bar, so that it neither interrupts the bar nor counts in
    its ETA."""
    from sagan_ext import _build
    real = _build._jit_build

    def announced_build(kind):
        print(f"sagan_ext: compiling the {kind} kernels (test)...", file=sys.stderr, flush=True)
        return real(kind)

    monkeypatch.setattr(_build, "_status", {})  # as in a fresh process: nothing loaded yet
    monkeypatch.setattr(_build, "_jit_build", announced_build)
    shutil.copy(classifier_file, tmp_path / "classifier.pt")
    assert train.main(["--out", str(tmp_path), *[a for a in TINY if a != "--no-progress"], "--steps", "2",
                       "--eval-every", "100", "--checkpoint-every", "100"]) == 0
    err = capsys.readouterr().err
    assert "compiling the cpu kernels (test)" in err and "2/2" in err  # the bar ran to its end
    assert err.index("compiling the cpu kernels (test)") < err.index("0/2")  # and started after the build


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, classifier_file):
    common = ["--steps", "4", "--checkpoint-every", "2", "--eval-every", "100"]
    assert run(tmp_path / "straight", classifier_file, *common) == 0
    assert run(tmp_path / "split", classifier_file, *common[:1], "2", *common[2:]) == 0
    assert run(tmp_path / "split", classifier_file, "--resume", str(tmp_path / "split"), "--steps", "4") == 0
    straight, split = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == ["1", "2", "3", "4"]
    for a, b in zip(straight, split):
        for key in ("loss_d", "loss_g", "d_real", "d_fake", "sigma/D.linear", "gamma/G.attention"):
            assert float(a[key]) == float(b[key]), (a["step"], key)
    ckpt_a = torch.load(tmp_path / "straight" / "checkpoints" / "step_0000004.pt", weights_only=True)
    ckpt_b = torch.load(tmp_path / "split" / "checkpoints" / "step_0000004.pt", weights_only=True)
    for k, v in ckpt_a["G_ema"].items():
        assert torch.equal(v, ckpt_b["G_ema"][k]), k


def test_evaluating_does_not_change_training(tmp_path, classifier_file):
    """Evaluation (samples, maps, metrics) puts G and D in eval mode: no BN statistics or SN power
    iteration leak into training, even without an EMA copy of G."""
    common = ["--steps", "3", "--ema-decay", "0", "--checkpoint-every", "100"]
    assert run(tmp_path / "often", classifier_file, *common, "--eval-every", "1") == 0
    assert run(tmp_path / "never", classifier_file, *common, "--eval-every", "100") == 0
    for a, b in zip(metrics(tmp_path / "often"), metrics(tmp_path / "never")):
        assert (a["loss_d"], a["loss_g"], a["sigma/G.linear"]) == (b["loss_d"], b["loss_g"], b["sigma/G.linear"])


def test_resume_drops_metrics_rows_past_the_checkpoint_and_keeps_the_last_k(tmp_path, classifier_file):
    assert run(tmp_path, classifier_file, "--steps", "5", "--checkpoint-every", "2", "--keep-checkpoints", "2",
               "--eval-every", "100") == 0
    assert [p.name for p in train.checkpoints(tmp_path)] == ["step_0000004.pt", "step_0000005.pt"]
    (tmp_path / "checkpoints" / "step_0000005.pt").unlink()  # as if the run died after step 5's metrics row
    assert run(tmp_path, classifier_file, "--resume", str(tmp_path), "--steps", "6") == 0
    assert [r["step"] for r in metrics(tmp_path)] == ["1", "2", "3", "4", "5", "6"]


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, classifier_file, monkeypatch, capsys):
    hinge = train.discriminator_loss
    calls = []

    def poisoned(real, fake, loss):
        calls.append(1)
        value = hinge(real, fake, loss)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(train, "discriminator_loss", poisoned)
    assert run(tmp_path, classifier_file, "--steps", "6", "--checkpoint-every", "2", "--log-every", "2",
               "--eval-every", "100") == 3
    message = capsys.readouterr().err
    assert "NaN or inf at step 3" in message and "step_0000002.pt" in message
    assert [p.name for p in train.checkpoints(tmp_path)] == ["step_0000002.pt"]


def test_two_process_ddp_run_on_gloo_with_sync_bn_is_the_single_process_run(tmp_path, classifier_file):
    """2 processes x 2 images with --sync-bn against 1 process x 4: the same noise, labels, real
    batches, BN statistics and mean-loss gradients, so the same logged losses and weights."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir()
    shutil.copy(classifier_file, ddp / "classifier.pt")
    common = ["--steps", "3", "--checkpoint-every", "3", "--eval-every", "3", "--sync-bn"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "sagan_ext.train", "--out", str(ddp), *TINY, *common]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout + result.stderr
    assert run(single, classifier_file, *common, "--batch-size", "4") == 0
    # the checkpoint is written after the ranks compared their weights and SN vectors (check_replicas)
    state = torch.load(ddp / "checkpoints" / "step_0000003.pt", weights_only=True)
    assert state["step"] == 3 and len(metrics(ddp)) == 3
    expected = torch.load(single / "checkpoints" / "step_0000003.pt", weights_only=True)
    for a, b in zip(metrics(ddp), metrics(single)):
        for key in ("loss_d", "loss_g", "d_real", "d_fake", "gamma/G.attention", "sigma/G.linear"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), (a["step"], key)
    for net in ("G", "D", "G_ema"):  # every parameter and buffer, batch-norm statistics included
        assert state[net].keys() == expected[net].keys()
        for name, value in expected[net].items():
            torch.testing.assert_close(state[net][name], value, rtol=1e-4, atol=1e-5, msg=f"{net}.{name}")


def test_g_has_no_bias_that_a_batch_norm_removes():
    """Every GBlock conv feeds a batch norm (see models.Generator): a bias there has a zero
    gradient, and Adam walked it on rounding noise. G.linear's (C, 4, 4) bias is a real template."""
    for image_size in (32, 64, 128):
        g, _ = models.build_models(image_size, 3, 10, ch=8)
        biases = [name for name, _ in g.named_parameters() if name.endswith("bias")]
        assert [b for b in biases if b.startswith("blocks.")] == [], image_size
        assert "linear.bias" in biases and "to_image.bias" in biases


def test_a_run_of_the_earlier_g_with_conv_biases_resumes_and_samples(tmp_path, classifier_file, monkeypatch, capsys):
    """Checkpoints written before G's block convs lost their biases: --resume and sagan-sample
    rebuild that G (strict loading), and the resumed run is the uninterrupted one."""
    build = train.build_models
    monkeypatch.setattr(train, "build_models", lambda *a, **k: build(*a, **{**k, "g_conv_bias": True}))
    common = ["--steps", "3", "--checkpoint-every", "2", "--eval-every", "100"]
    assert run(tmp_path / "straight", classifier_file, *common) == 0
    assert run(tmp_path / "split", classifier_file, "--steps", "2", *common[2:]) == 0
    monkeypatch.undo()  # from here on, as the current sagan_ext
    assert models.has_conv_bias(torch.load(tmp_path / "split" / "checkpoints" / "step_0000002.pt",
                                           weights_only=True)["G"])
    assert run(tmp_path / "split", classifier_file, "--resume", str(tmp_path / "split"), "--steps", "3") == 0
    assert "this run's G has biases in its block convs" in capsys.readouterr().out
    for a, b in zip(metrics(tmp_path / "straight"), metrics(tmp_path / "split")):
        assert (a["loss_d"], a["loss_g"]) == (b["loss_d"], b["loss_g"]), a["step"]
    assert train.sample_main([str(tmp_path / "split"), "--output", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()


def _sync_bn_rank(rank: int, world: int, store: str, inputs: dict, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    bn = models.sync_batch_norm(torch.nn.BatchNorm2d(3).double())
    bn.load_state_dict(inputs["state"])
    share = slice(rank * 2, rank * 2 + 2)
    x = inputs["x"][share].clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:  # a step must not warn (it did: a deprecated all_reduce)
        warnings.simplefilter("always")
        bn(x * 3 + 1)  # a first step of the running statistics
        (bn(x) * inputs["dy"][share]).sum().backward()
    for p in bn.parameters():  # the global batch's gradient: the sum of the ranks' parts
        torch.distributed.all_reduce(p.grad)
    torch.save(dict(y=bn.train()(x.detach()), eval_y=bn.eval()(x.detach()), dx=x.grad, dweight=bn.weight.grad,
                    dbias=bn.bias.grad, state=bn.state_dict(), warnings=[str(w.message) for w in caught]),
               f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_sync_batch_norm_is_batch_norm_over_the_global_batch(tmp_path):
    """Two gloo processes with 2 rows each against BatchNorm2d on all 4, in float64: the output,
    every gradient and the running statistics."""
    reference = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2), reference.bias.uniform_(-1, 1)
    inputs = dict(x=torch.randn(4, 3, 5, 7, dtype=torch.float64) * 2 + 0.5,
                  dy=torch.randn(4, 3, 5, 7, dtype=torch.float64),
                  state={k: v.clone() for k, v in reference.state_dict().items()})
    torch.multiprocessing.spawn(_sync_bn_rank, (2, str(tmp_path / "store"), inputs, str(tmp_path / "out")), nprocs=2)
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    x = inputs["x"].clone().requires_grad_()
    reference(x * 3 + 1)
    (reference(x) * inputs["dy"]).sum().backward()
    expected = dict(y=reference(x.detach()), eval_y=reference.eval()(x.detach()), dx=x.grad)
    for key, value in expected.items():
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), value, rtol=1e-10, atol=1e-10, msg=key)
    for r in ranks:
        assert r["warnings"] == []
        torch.testing.assert_close(r["dweight"], reference.weight.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(r["dbias"], reference.bias.grad, rtol=1e-10, atol=1e-10)
        for name, value in reference.state_dict().items():  # three updates: two above and the y row
            torch.testing.assert_close(r["state"][name], value, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("args, message", [
    (["--dataset", "no-such-dataset"], "unknown dataset 'no-such-dataset'"),
    (["--image-size", "48"], "--image-size must be one of (32, 64, 128)"),
    (["--attention-res", "32"], "attention resolution for 32-pixel images must be one of (8, 16)"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--resume", "/nonexistent/run"], "not a run folder"),
])
def test_bad_arguments_get_one_clear_message(tmp_path, args, message, capsys):
    assert train.main(["--out", str(tmp_path / "run"), *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--lr_g", "2e-4"], "unrecognized arguments: --lr_g 2e-4 (did you mean --lr-g?)"),
    (["--batchsize", "4"], "unrecognized arguments: --batchsize 4 (did you mean --batch-size?)"),
    (["--ema_decay=0.9", "--lr_d", "1"], "(did you mean --ema-decay for --ema_decay, --lr-d for --lr_d?)"),
    (["--no-such-thing", "3"], "unrecognized arguments: --no-such-thing 3\n"),
])
def test_a_mistyped_option_gets_the_closest_one(tmp_path, args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        train.main(["--out", str(tmp_path / "run"), *args])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.sample_main([str(tmp_path), "--per_class", "3"])
    assert "(did you mean --per-class?)" in capsys.readouterr().err
    (tmp_path / "options.json").write_text('{"lr_gg": 1, "steps": 2, "zzz": 0}')
    assert train.main(["--config", str(tmp_path / "options.json")]) == 2
    assert "unknown options: lr_gg (did you mean lr_g?), zzz" in capsys.readouterr().err


def test_bad_dataset_folder_and_corrupt_checkpoint(tmp_path, classifier_file, capsys):
    (tmp_path / "empty").mkdir()
    assert train.main(["--out", str(tmp_path / "a"), *TINY, "--dataset", str(tmp_path / "empty")]) == 2
    assert "no sub-folders" in capsys.readouterr().err
    assert run(tmp_path / "b", classifier_file, "--steps", "1", "--eval-every", "100") == 0
    (tmp_path / "b" / "checkpoints" / "step_0000001.pt").write_bytes(b"not a checkpoint")
    assert train.main(["--resume", str(tmp_path / "b"), "--steps", "2"]) == 2
    assert "step_0000001.pt is unreadable or corrupt" in capsys.readouterr().err
    assert train.main(["--resume", str(tmp_path / "b"), "--ch", "16"]) == 2
    assert "cannot change --ch" in capsys.readouterr().err


def test_sample_command_writes_a_grid(tmp_path, classifier_file, capsys):
    assert run(tmp_path, classifier_file, "--steps", "1", "--eval-every", "100") == 0
    out = tmp_path / "grid.png"
    assert train.sample_main([str(tmp_path), "--output", str(out), "--per-class", "3", "--classes", "1", "7"]) == 0
    from PIL import Image
    with Image.open(out) as im:
        assert im.size == (3 * 34, 2 * 34)
    assert train.sample_main([str(tmp_path / "nothing")]) == 2


def test_config_file_sets_options(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('steps = 7\nlr_g = 2e-4\nloss = "ns"\n')
    o = train.resolve_options(["--config", str(cfg), "--steps", "9"])
    assert (o["steps"], o["lr_g"], o["loss"], o["lr_d"]) == (9, 2e-4, "ns", 4e-4)
    (tmp_path / "bad.json").write_text('{"stepz": 3}')
    with pytest.raises(train.UsageError, match=r"unknown options: stepz \(did you mean steps\?\)"):
        train.resolve_options(["--config", str(tmp_path / "bad.json")])


@pytest.mark.parametrize("variant", ["sagan", "biggan"])
def test_fused_and_eager_models_agree_including_the_gradient_penalty(variant):
    """Same state dict, same logits, same WGAN-GP penalty and the same gradients (the penalty's
    double backward runs through the fused op's reference double backward)."""
    torch.manual_seed(0)
    nets = {ops: models.build_models(32, 1, 10, ch=8, attention=variant, ops=ops) for ops in ("fused", "eager")}
    nets["eager"][0].load_state_dict(nets["fused"][0].state_dict())
    nets["eager"][1].load_state_dict(nets["fused"][1].state_dict())
    z, y = torch.randn(3, 128, dtype=torch.float64), torch.tensor([0, 4, 9])
    real = torch.rand(3, 1, 32, 32, dtype=torch.float64) * 2 - 1
    grads = {}
    for ops, (g, d) in nets.items():
        g.double(), d.double()
        for m in (g, d):
            torch.nn.init.constant_(m.attention.gamma, 0.7)
        fake = g(z, y)
        mixed = (0.3 * real + 0.7 * fake).detach().requires_grad_(True)
        penalty = train.gradient_penalty(d(mixed, y), mixed)
        loss = train.discriminator_loss(d(real, y), d(fake, y), "wgan-gp") + 10 * penalty
        loss.backward()
        named = [*g.named_parameters(), *d.named_parameters()]
        grads[ops] = (loss.detach(), penalty.detach(), {n: p.grad for n, p in named})
    (loss_f, pen_f, g_f), (loss_e, pen_e, g_e) = grads["fused"], grads["eager"]
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pen_f, pen_e, rtol=1e-9, atol=1e-9)
    assert pen_f > 0
    for name, grad in g_f.items():
        torch.testing.assert_close(grad, g_e[name], rtol=1e-7, atol=1e-9, msg=name)


def test_batch_indices_split_a_global_batch_across_ranks_and_cover_each_epoch():
    single = [data.batch_indices(20, 4, s, seed=1) for s in range(5)]
    assert sorted(torch.cat(single).tolist()) == list(range(20))  # one epoch, every image once
    assert not torch.equal(data.batch_indices(20, 4, 0, seed=1), data.batch_indices(20, 4, 5, seed=1))
    for step in range(4):  # 2 ranks x 2 = rank shares of the same global batch
        ranks = torch.cat([data.batch_indices(20, 2, step, seed=1, rank=r, world_size=2) for r in range(2)])
        assert torch.equal(ranks, single[step])
    with pytest.raises(data.DatasetError, match="fewer than one global batch"):
        data.batch_indices(3, 4, 0, seed=0)


def test_dataset_loaders(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(3):
            image = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
            image.save(tmp_path / "folder" / cls / f"{i}.png")
    folder = data.load_dataset(str(tmp_path / "folder"), 32)
    assert folder.images.shape == (6, 3, 32, 32) and folder.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert folder.class_names == ["cat", "dog"] and folder.num_classes == 2

    np.savez(tmp_path / "set.npz", images=rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8), labels=np.arange(5) % 2)
    npz = data.load_dataset(str(tmp_path / "set.npz"), 32)
    assert npz.images.shape == (5, 3, 32, 32) and npz.num_classes == 2

    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [i % 10] * 4}
        (cifar / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    c10 = data.load_dataset(str(tmp_path), 32)
    assert c10.images.shape == (20, 3, 32, 32) and c10.labels[:4].tolist() == [1] * 4
    # a pixel survives the trip (no resize at 32): channel-major rows as CIFAR stores them
    raw = pickle.loads((cifar / "data_batch_1").read_bytes())[b"data"][0].reshape(3, 32, 32)
    assert torch.equal(c10.images[0], torch.from_numpy(raw))

    digits = data.load_dataset("digits", 32)
    assert digits.images.shape == (1797, 1, 32, 32) and digits.num_classes == 10


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    mu_a, mu_b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    var_a, var_b = torch.rand(5, dtype=torch.float64) + 0.1, torch.rand(5, dtype=torch.float64) + 0.1
    expected = (mu_a - mu_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum()
    got = evaluation.frechet_distance((mu_a, torch.diag(var_a)), (mu_b, torch.diag(var_b)))
    assert abs(got - expected.item()) < 1e-9
    # and a rotated (non-diagonal) pair: the distance is rotation invariant
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    rotated = evaluation.frechet_distance((q @ mu_a, q @ torch.diag(var_a) @ q.T),
                                          (q @ mu_b, q @ torch.diag(var_b) @ q.T))
    assert abs(rotated - expected.item()) < 1e-8


def test_attention_overlays_put_the_heat_where_the_attention_is():
    images = torch.zeros(1, 1, 16, 16)
    attention = torch.zeros(1, 64, 64)
    attention[0, :, 63] = 1.0  # every query looks at the bottom-right key
    overlays = evaluation.attention_overlays(images, attention)  # the legend, then (3, T + 2, 4 * (T + 2))
    tiles = overlays[:, evaluation.LEGEND_TOP:overlays.shape[1] - evaluation.LEGEND_BOTTOM]
    t = tiles.shape[1] - 2
    assert t >= 64 and tiles.shape[2] == 4 * (t + 2)
    heat = tiles[0, 1:t + 1, t + 3:2 * t + 3].float()  # red channel of the first overlay
    corner = t // 8
    assert heat[-corner:, -corner:].min() > 180 and heat[:t // 2, :t // 2].max() < 100


def test_attention_overlays_have_a_legend_of_query_points_and_colour_scale():
    """Above the tiles, each overlay column is titled with its query point's marker colour (the
    same colour marks that point in the image and in its overlay); below, the heat's colour scale
    from black (0) to white (the query's largest weight)."""
    images = torch.zeros(2, 3, 32, 32)
    overlays = evaluation.attention_overlays(images, torch.softmax(torch.randn(2, 256, 256), -1))
    top, bottom = evaluation.LEGEND_TOP, overlays.shape[1] - evaluation.LEGEND_BOTTOM
    column = (overlays.shape[2]) // 4

    def has(region, colour):
        target = torch.tensor([round(255 * v) for v in colour], dtype=torch.uint8)[:, None, None]
        return bool((region == target).all(0).any())

    for k, colour in enumerate(evaluation.QUERY_COLOURS, start=1):
        assert has(overlays[:, :top, k * column:(k + 1) * column], colour), k  # its title's swatch
        assert has(overlays[:, top:bottom, k * column:(k + 1) * column], colour), k  # its marker in its overlay
        assert has(overlays[:, top:bottom, :column], colour), k  # and in the image
        assert not has(overlays[:, top:bottom, (k % 3 + 1) * column:(k % 3 + 2) * column], colour), k
    scale = overlays[:, bottom:].float()
    brightness = scale.sum(0)
    row = int((scale.std(0).sum(1)).argmax())  # the colour bar's middle row: the most colourful one
    bar = [x for x in range(overlays.shape[2]) if scale[:, row, x].std() > 20]  # its coloured pixels
    assert len(bar) > 20
    ramp = brightness[row, bar[0]:bar[-1] + 1]
    assert bool((ramp[1:] >= ramp[:-1]).all()) and ramp[0] < 100 and ramp[-1] > 600  # black ... white


class FakeInception(torch.nn.Module):
    """Stands in for a TorchScript Inception-v3 feature extractor: same calling convention
    (uint8 images, return_features=True -> (N, 2048)), a fixed random projection inside."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, 2048)

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        small = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 8)
        return self.proj(small.flatten(1))


def test_inception_file_adds_fid(tmp_path, classifier_file, capsys):
    inception = tmp_path / "inception.pt"
    torch.jit.script(FakeInception()).save(str(inception))
    assert run(tmp_path / "run", classifier_file, "--steps", "2", "--eval-every", "2",
               "--inception", str(inception)) == 0
    fid = float(metrics(tmp_path / "run")[-1]["fid"])
    assert np.isfinite(fid) and fid > 0
    (tmp_path / "bad.pt").write_bytes(b"nope")
    assert run(tmp_path / "bad", classifier_file, "--steps", "1", "--inception", str(tmp_path / "bad.pt")) == 2
    assert "not a TorchScript archive" in capsys.readouterr().err
