"""Class-conditional training and sampling through the Trainer and the command line: the
labels reach the network with per-image dropping, the checkpoint rebuilds a conditional
model, `sample --label/--guidance` draws the classes asked for, and each bad input is one
line with exit status 2 and nothing written."""


import pytest
import torch
from PIL import Image
from test_cli import TINY, assert_one_line_error, grid_size
from test_train import assert_same_state, tiny_config

from naivediffusion import Diffusion, sampling
from naivediffusion.__main__ import labels_path, main, parse_labels
from naivediffusion.checkpoint import load_checkpoint, load_model
from naivediffusion.config import TrainConfig
from naivediffusion.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """A finished 4-step class-conditional run made by `naivediffusion train`."""
    path = tmp_path_factory.mktemp("conditional") / "run"
    assert main(["train", "--dataset", "mnist", "--steps", "4", "--run-dir", str(path),
                 "--class-conditional", "--p-uncond", "0.2", "--sample-every", "4",
                 "--checkpoint-every", "4", *TINY]) == 0
    return path


# ------------------------------------------------------------------ the trainer


def test_the_config_checks_p_uncond_and_labelled_data(tmp_path):
    with pytest.raises(ValueError, match="p_uncond must be a probability"):
        tiny_config(tmp_path / "r", class_conditional=True, p_uncond=1.5)
    with pytest.raises(ValueError, match="no class labels"):
        TrainConfig.for_dataset(f"folder:{tmp_path}", class_conditional=True, run_dir=str(tmp_path / "r"))


def test_a_conditional_trainer_builds_a_network_with_a_null_class(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", class_conditional=True))
    assert trainer.model.num_classes == 10
    assert trainer.model.class_embedding.num_embeddings == 11  # ten digits and the null class
    assert Trainer(tiny_config(tmp_path / "plain")).model.num_classes is None


def test_train_step_passes_each_image_its_label_and_drops_them_per_image(tmp_path, monkeypatch):
    """What the network sees: the batch's labels, some replaced by the null class 10, drawn
    from the run's noise generator (so a replay with the same generator drops the same)."""
    trainer = Trainer(tiny_config(tmp_path / "run", class_conditional=True, p_uncond=0.5, batch_size=64))
    seen = []
    real = trainer.network

    def spy(x_t, t, labels):
        seen.append(labels.clone())
        return real(x_t, t, labels)

    monkeypatch.setattr(trainer, "network", spy)
    labels = torch.arange(64) % 10
    x0 = torch.zeros(64, 1, 28, 28)
    state = trainer.noise_generator.get_state()
    trainer.train_step(x0, labels)
    (given,) = seen
    dropped = given == 10
    assert 0 < dropped.sum() < 64  # per image: a per-batch drop gives none or all
    assert torch.equal(given[~dropped], labels[~dropped])
    # The mask comes from the noise generator after t and eps, as Diffusion.loss draws it.
    generator = torch.Generator().set_state(state)
    torch.randint(0, 50, (64,), generator=generator)
    torch.randn((64, 1, 28, 28), generator=generator)
    assert torch.equal(dropped, torch.rand(64, generator=generator) < 0.5)


@pytest.mark.parametrize("p_uncond", [0.0, 0.5])
def test_train_step_drops_exactly_the_drawn_labels_and_draws_nothing_more(tmp_path, monkeypatch, p_uncond):
    """The Trainer drops the labels itself: the network sees the batch's labels with exactly the
    images whose coin came up set to the null class 10 (no coins at all when p_uncond is 0), the
    loss drops none of its own, the caller's labels are left alone, and the noise generator ends
    where t, eps and the coins leave it."""
    trainer = Trainer(tiny_config(tmp_path / "run", class_conditional=True, p_uncond=p_uncond))
    seen, real = [], trainer.network

    def spy(x_t, t, labels):
        seen.append(labels.clone())
        return real(x_t, t, labels)

    monkeypatch.setattr(trainer, "network", spy)
    labels = torch.tensor([3, 1, 2, 0, 9, 4, 7, 5])
    state = trainer.noise_generator.get_state()
    trainer.train_step(torch.zeros(8, 1, 28, 28), labels)
    generator = torch.Generator().set_state(state)
    torch.randint(0, 50, (8,), generator=generator)
    torch.randn((8, 1, 28, 28), generator=generator)
    drop = torch.zeros(8, dtype=torch.bool)
    if p_uncond > 0:
        drop = torch.rand(8, generator=generator) < p_uncond
        assert drop.any() and not drop.all()  # the mask matters in this batch
    (given,) = seen
    assert given.tolist() == labels.masked_fill(drop, 10).tolist()
    assert labels.tolist() == [3, 1, 2, 0, 9, 4, 7, 5]
    assert torch.equal(trainer.noise_generator.get_state(), generator.get_state())


def test_train_step_needs_labels_exactly_when_conditional(tmp_path):
    conditional = Trainer(tiny_config(tmp_path / "c", class_conditional=True))
    plain = Trainer(tiny_config(tmp_path / "p"))
    x0 = torch.zeros(8, 1, 28, 28)
    with pytest.raises(ValueError, match="needs the batch's labels"):
        conditional.train_step(x0)
    with pytest.raises(ValueError, match="takes none"):
        plain.train_step(x0, torch.zeros(8, dtype=torch.long))


def test_the_checkpoint_rebuilds_a_conditional_model(conditional_run):
    checkpoint = load_checkpoint(conditional_run / "checkpoint.pt")
    assert checkpoint["train_config"]["class_conditional"] is True
    assert checkpoint["train_config"]["p_uncond"] == 0.2
    model, diffusion, info = load_model(conditional_run / "ema.pt")
    assert model.num_classes == 10 and info["model_config"]["num_classes"] == 10
    # The class embedding (ten digits and the null class) was loaded, not left at its init.
    saved = load_checkpoint(conditional_run / "ema.pt")["ema"]["class_embedding.weight"]
    assert saved.shape[0] == 11 and torch.equal(model.class_embedding.weight, saved)


def test_a_conditional_run_resumes_exactly(tmp_path):
    settings = dict(steps=4, class_conditional=True, p_uncond=0.5)
    straight = Trainer(tiny_config(tmp_path / "straight", **settings))
    straight.train(progress=False)
    first = Trainer(tiny_config(tmp_path / "split", **{**settings, "steps": 2}))
    first.train(progress=False)
    resumed = Trainer.resume(tmp_path / "split", steps=4)
    resumed.train(progress=False)
    assert_same_state(resumed.model.state_dict(), straight.model.state_dict())
    with pytest.raises(ValueError, match="cannot change class_conditional"):
        Trainer.resume(tmp_path / "split", class_conditional=False)


def test_the_training_grid_draws_one_class_per_column(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path / "run", class_conditional=True, num_sample_images=12))
    asked = {}
    real = Diffusion.sample

    def spy(self, model, shape, **kwargs):
        asked["labels"] = kwargs["labels"]
        return real(self, model, shape, **kwargs)

    monkeypatch.setattr(Diffusion, "sample", spy)
    path = trainer.save_samples()
    assert asked["labels"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert Image.open(path).size == grid_size(12, nrow=10)


# ------------------------------------------------------------------ the command line


@pytest.mark.parametrize("values, expected", [
    (["7"], [7]), (["0-9"], list(range(10))), (["3", "1"], [3, 1]), (["2-4", "9"], [2, 3, 4, 9]),
])
def test_parse_labels(values, expected):
    assert parse_labels(values, 10) == expected


def test_sample_draws_n_of_each_class_one_row_per_class(conditional_run, tmp_path, capsys, monkeypatch):
    asked = []
    real = sampling.sample

    def spy(diffusion, model, shape, **kwargs):
        asked.append((kwargs["labels"].tolist(), kwargs["guidance_scale"], kwargs["null_label"]))
        return real(diffusion, model, shape, **kwargs)

    monkeypatch.setattr(sampling, "sample", spy)
    out, saved = tmp_path / "grid.png", tmp_path / "s" / "samples.pt"
    assert main(["sample", "--checkpoint", str(conditional_run), "--label", "0-2", "--label", "7",
                 "--n", "3", "--guidance", "2.5", "--steps", "3", "--batch-size", "5",
                 "--out", str(out), "--save-samples", str(saved), "--no-progress"]) == 0
    expected = [0, 0, 0, 1, 1, 1, 2, 2, 2, 7, 7, 7]
    assert [label for chunk, _, _ in asked for label in chunk] == expected  # in batches of 5
    assert {(w, null) for _, w, null in asked} == {(2.5, 10)}
    assert Image.open(out).size == grid_size(12, nrow=3)  # four rows, one per class
    images, labels = torch.load(saved, weights_only=True), torch.load(labels_path(saved), weights_only=True)
    assert images.dtype == torch.uint8 and images.shape == (12, 1, 28, 28)
    assert labels.tolist() == expected and labels_path(saved).name == "samples.labels.pt"
    assert "12 samples of classes 0,1,2,7 (guidance w=2.5)" in capsys.readouterr().out


def test_sample_without_a_label_draws_from_the_null_class(conditional_run, tmp_path, monkeypatch):
    asked = []
    real = sampling.sample

    def spy(diffusion, model, shape, **kwargs):
        asked.append(kwargs["labels"])
        return real(diffusion, model, shape, **kwargs)

    monkeypatch.setattr(sampling, "sample", spy)
    saved = tmp_path / "samples.pt"
    assert main(["sample", "--checkpoint", str(conditional_run), "--n", "2", "--steps", "2",
                 "--out", str(tmp_path / "g.png"), "--save-samples", str(saved), "--no-progress"]) == 0
    assert asked == [None] and not labels_path(saved).exists()


@pytest.mark.parametrize("flags, words", [
    (["--label", "10"], ["--label 10", "classes 0-9"]),
    (["--label", "-1"], ["--label"]),
    (["--label", "5-3"], ["empty range"]),
    (["--label", "seven"], ["not a class index"]),
    (["--label", "3", "--guidance", "-1"], ["--guidance must be at least 0"]),
    (["--guidance", "1"], ["--guidance needs --label"]),
])
def test_bad_labels_and_guidance(conditional_run, tmp_path, capsys, flags, words):
    out, saved = tmp_path / "g.png", tmp_path / "s.pt"
    code = main(["sample", "--checkpoint", str(conditional_run), *flags, "--n", "2", "--steps", "2",
                 "--out", str(out), "--save-samples", str(saved), "--no-progress"])
    assert_one_line_error(capsys, code, *words)
    assert not out.exists() and not saved.exists()


@pytest.mark.parametrize("flags", [["--label", "3"], ["--guidance", "1"], ["--label", "3", "--guidance", "1"]])
def test_labels_and_guidance_need_a_conditional_model(tmp_path, capsys, flags):
    out = tmp_path / "g.png"
    code = main(["sample", "--checkpoint", "pretrained:mnist", *flags, "--out", str(out), "--no-progress"])
    assert_one_line_error(capsys, code, "class-conditional model", "--class-conditional")
    assert not out.exists()


def test_p_uncond_without_class_conditional(tmp_path, capsys):
    code = main(["train", "--dataset", "mnist", "--p-uncond", "0.2", "--run-dir", str(tmp_path / "r"), *TINY])
    assert_one_line_error(capsys, code, "--p-uncond", "--class-conditional")
    assert not (tmp_path / "r").exists()


def test_evaluate_a_conditional_model_reports_the_accuracy_on_the_asked_for_class(conditional_run, tmp_path,
                                                                                   monkeypatch):
    import json

    from naivediffusion import quality

    asked = []
    real = sampling.sample

    def spy(diffusion, model, shape, **kwargs):
        asked.append((kwargs["labels"].tolist(), kwargs["guidance_scale"]))
        return real(diffusion, model, shape, **kwargs)

    monkeypatch.setattr(sampling, "sample", spy)
    # The classifier calls every sample a 3: the accuracy is then the fraction of 3s asked for.
    monkeypatch.setattr(quality, "class_probabilities",
                        lambda classifier, x: torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float())
    out = tmp_path / "m.json"
    assert main(["evaluate", "--checkpoint", str(conditional_run), "--metric", "fid", "--n", "20",
                 "--guidance", "1.5", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    assert asked == [(list(range(10)) * 2, 1.5)]
    result = json.loads(out.read_text())
    assert result["guidance"] == 1.5 and result["accuracy"] == pytest.approx(0.1)
    assert result["class_counts"][3] == 20


def test_evaluate_guidance_errors(conditional_run, tmp_path, capsys):
    out = tmp_path / "m.json"
    code = main(["evaluate", "--checkpoint", "pretrained:mnist", "--metric", "fid", "--guidance", "1",
                 "--out", str(out)])
    assert_one_line_error(capsys, code, "--guidance needs a class-conditional model")
    code = main(["evaluate", "--checkpoint", str(conditional_run), "--metric", "bpd", "--guidance", "1",
                 "--out", str(out)])
    assert_one_line_error(capsys, code, "--guidance applies to --metric fid")
    code = main(["evaluate", "--checkpoint", str(conditional_run), "--metric", "fid", "--guidance", "-2",
                 "--out", str(out)])
    assert_one_line_error(capsys, code, "--guidance must be at least 0")
    assert not out.exists()
