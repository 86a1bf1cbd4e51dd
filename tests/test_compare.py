"""CIFAR-10 comparisons: models, loaders, the runner end to end on real images, and its errors."""

import csv
import json
import subprocess
import sys

import pytest
import torch

import gradscope
from gradscope import cli
from gradscope.bench import compare
from gradscope.bench.data import CLASSES, SYNTHETIC, Batches, load_cifar10, read_image_folder
from gradscope.bench.models import SequenceClassifier, build_model, cifar_resnet


def n_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_cifar_resnet_parameter_counts_match_he_et_al():
    assert n_params(cifar_resnet(20)) == 269_722
    assert n_params(cifar_resnet(56)) == 853_018
    assert n_params(cifar_resnet(56, shortcuts=False)) == 853_018  # option A shortcuts have no parameters
    assert build_model("plain20").layer1[0].shortcut is None and build_model("resnet20").layer1[0].shortcut is not None
    x = torch.randn(2, 3, 32, 32)
    assert build_model("resnet32")(x).shape == (2, 10) and build_model("rnn-pixels")(x).shape == (2, 10)


def test_sequence_readers_see_rows_and_pixels():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    seen = []
    for mode, shape in (("rows", (2, 32, 96)), ("pixels", (2, 1024, 3))):
        model = SequenceClassifier("gru", mode)
        model.rnn.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        model(x)
        assert seen[-1].shape == shape
    assert torch.equal(seen[0][0, 1, :3], x[0, :, 1, 0])  # row 1, pixel 0, its 3 channels
    assert torch.equal(seen[1][0, 33], x[0, :, 1, 1])  # pixel (1, 1)


def test_image_folder_loader_shapes_labels_and_class_order(cifar_root):
    images, labels = read_image_folder(cifar_root, "test", n=200, seed=1)
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (200,)
    assert CLASSES == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(cifar_root / "train"))
    assert tuple(folder.classes) == CLASSES  # torchvision's CIFAR10 order
    assert (str(cifar_root / "train/cat/0000.jpg"), 3) in folder.samples  # a cat image, labelled 3
    data = load_cifar10(cifar_root, train_subset=300, test_subset=100)
    assert data.train_images.shape == (300, 3, 32, 32) and data.test_labels.shape == (100,)
    assert not data.synthetic and str(cifar_root) in data.source


def test_synthetic_fallback_announces_itself(tmp_path, capsys):
    data = load_cifar10(None, cache_dir=tmp_path, download=False, train_subset=64, test_subset=32, search=False)
    assert data.synthetic and data.source == SYNTHETIC
    assert "SYNTHETIC" in capsys.readouterr().err
    out, rows = compare.run(compare.Config(models=["mlp3-relu-kaiming"], steps=3, subset=64, test_subset=32,
                                           synthetic=True, out=str(tmp_path), progress=False))
    assert rows[0]["data"] == SYNTHETIC
    assert "SYNTHETIC" in (out / "comparison.md").read_text()
    assert json.loads((out / "mlp3-relu-kaiming/config.json").read_text())["data"] == SYNTHETIC


def test_batches_normalise_and_augment():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(10)
    plain = Batches(images, labels, 4, "cpu", augment=False, seed=0)
    x, y = next(plain)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    seen = set(y.tolist())
    for _ in range(3):
        seen |= set(next(plain)[1].tolist())
    assert seen == set(range(10))  # reshuffles every epoch, covers the set
    aug_x, _ = next(Batches(images, labels, 10, "cpu", augment=True, seed=0))
    assert aug_x.shape == (10, 3, 32, 32)


def test_quick_preset_end_to_end_on_real_images(cifar_root, tmp_path):
    code = compare.main(["--preset", "quick", "--steps", "12", "--subset", "256", "--test-subset", "64",
                         "--batch-size", "16", "--evals", "2", "--out", str(tmp_path), "--no-progress",
                         "--data-dir", str(cifar_root)])
    assert code == 0
    (out,) = tmp_path.iterdir()
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert [r["model"] for r in rows] == compare.PRESETS["quick"]
    assert all("image folder" in r["data"] for r in rows)
    for name in compare.PRESETS["quick"]:
        run_dir = out / name
        assert {p.name for p in run_dir.iterdir()} >= {"config.json", "gradscope.jsonl", "metrics.csv", "summary.txt"}
        metrics = list(csv.DictReader(open(run_dir / "metrics.csv")))
        assert [int(m["step"]) for m in metrics] == [6, 12]
        assert 0 <= float(metrics[-1]["test_acc"]) <= 1
    sigmoid = next(r for r in rows if r["model"] == "mlp20-sigmoid-default")
    assert "vanishing" in sigmoid["alerts"] and float(sigmoid["signal_in/out_init"]) < 1e-6
    assert sigmoid["verdict"].startswith("flagged: vanishing from step") and "active" in sigmoid["alerts"]
    kaiming = next(r for r in rows if r["model"] == "mlp20-relu-kaiming")
    assert float(kaiming["dead_max"]) >= float(kaiming["dead_final"]) >= 0  # max over the run vs the last step
    last = gradscope.load(out / "mlp20-relu-kaiming" / "gradscope.jsonl").history.records()[-1]
    assert float(kaiming["dead_final"]) == pytest.approx(max(st["dead_fraction"] for st in last.layers.values()
                                                             if "dead_fraction" in st))
    assert float(next(r for r in rows if r["model"] == "lstm-rows")["reach_steps"]) > 0
    assert "| model | params |" in (out / "comparison.md").read_text()
    assert (out / "figures/report.html").is_file() and (out / "figures/comparison.png").is_file()
    page = (out / "figures/report.html").read_text()
    assert "test acc" in page and f"{float(sigmoid['test_acc']):.3f}" in page  # compare's facts join the table


@pytest.mark.parametrize("args,message", [
    (["--models", "vgg16"], "unknown model 'vgg16'"),
    (["--models", "resnet21"], "depth must be 6n+2"),
    (["--models", "mlp20-swish-default"], "activation must be one of"),
    (["--data-dir", "/nonexistent/cifar"], "not a CIFAR-10 image folder"),
    (["--preset", "depth", "--models", "resnet20"], "not both"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--preset", "bogus"], "invalid choice"),
])
def test_bad_arguments_get_clear_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        compare.main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_gradscope_command_line(capsys):
    ok = subprocess.run([sys.executable, "-m", "gradscope.cli", "compare", "-h"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--preset" in ok.stdout  # the module entry point, in a process of its own
    assert cli.main(["frobnicate"]) == 2  # its exit status (sys.exit(main()), as above)
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
