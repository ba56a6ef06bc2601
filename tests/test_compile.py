"""torch.compile with inductor on the CPU: the compiled network computes what the eager one does.

`TrainConfig.compile` (`train --compile MODE`) compiles the network the training step calls,
and `sample --compile` the one the sampler calls. Here inductor really generates and compiles
its C++ kernels (test_device_data traces the same paths with the aot_eager backend, which
needs no compiler), in mode "default", for the tiny network of test_train:

- one training step after another, compiled against eager: the losses, the gradients, the
  weights, the EMA and Adam's moments;
- DDIM sampling from a seeded generator, compiled against eager;
- `train --compile default` under torchrun with two processes on gloo (DDP, whose buckets
  dynamo's DDPOptimizer compiles), against the eager run of one process.

They agree within float32 tolerance, not bit for bit: inductor fuses operations and sums the
reductions (convolutions, GroupNorm, attention's softmax, the loss's mean) in another order.

Compile time: inductor compiles each distinct kernel (about 70 for the training step of this
network, 30 for the sampling network) with the C++ compiler, a second or two of CPU each, so
the first step takes minutes on this 2-core machine when the kernel cache (inductor's, under
/tmp/torchinductor_$USER, kept between runs) is empty, and seconds when it holds them.
Measured with an empty cache (2026-12-07, the machine busy with other work, load 5-8): 206,
33 and 15 s for the three tests below, 2 minutes of CPU in all; with a full one 13, 4 and
40 s (at a lighter load 4, 2 and 14 s). The kernels are specialised to the thread count and the
shapes, so every test runs on one thread, as torchrun's processes do (OMP_NUM_THREADS=1),
and the first trains on batches of 4, the slice of each of the two processes: the third
test then finds every kernel of its network compiled.
"""

import subprocess
import time

import pytest
import torch
import torch._dynamo
from test_distributed import STEPS, TINY_FLAGS, log_lines, torchrun_command
from test_train import tiny_config
from torch._dynamo.eval_frame import OptimizedModule
from torch._dynamo.utils import counters

from naivediffusion import Diffusion, UNet
from naivediffusion.checkpoint import load_checkpoint
from naivediffusion.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")

# How far apart compiled and eager may be. float32 rounds at 6e-8 of a value; a reduction of n
# terms summed in another order moves the sum by up to about n times that of its largest
# term, and the errors compound through the ~30 layers of the network and back. Measured here
# (fp32, one thread), as a fraction of each tensor's largest entry: gradients 1e-5, Adam's
# moments 8e-6; losses 1e-7 relative. A wrong kernel (a term dropped, a wrong gradient) is
# off by the size of the quantity itself, orders of magnitude beyond these.
GRAD_TOL = 1e-4
LOSS_RTOL = 1e-5
# The weights (and the EMA) are compared with how far they moved, in norm over the whole
# network: Adam divides each gradient by its own running size, so that its first steps are
# about lr * sign(gradient), and an entry whose gradient is near 0 (hundreds are below 1e-7
# here) may take its step the other way when its rounding differs: a difference as large as
# that entry's movement, however small the rounding (no entry did here, but another CPU's
# vector width rounds otherwise). In norm over the ~0.1M weights such an entry weighs little
# (about 2 / sqrt(0.1M) = 0.6% of the movement), a wrong layer a lot (the gradients above
# catch one tensor by tensor). Measured: 7e-5 in one process, 1e-5 with two (entry by
# entry the largest difference was 6e-3 of the largest movement).
MOVED_TOL = 1e-2


@pytest.fixture
def fresh_dynamo():
    """Each test starts, and leaves, dynamo as a fresh process has it: no compiled frames or
    guards of an earlier test (whose modules are gone), no counts in `counters`. The kernels on
    disk stay: they are keyed by their code, so a later compile reuses them only where it
    generates the same code."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def wake_up(model: torch.nn.Module, seed: int = 1) -> None:
    """Give the network's zero-initialised convolutions (each residual block's last one, the
    attention projections, conv_out) PyTorch's default random weights. At initialisation they
    make every block the identity and the output 0, so the forward pass would not run through
    most kernels and the gradients of all but conv_out would be 0: nothing to compare."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.Conv2d) and not layer.weight.any():
                layer.reset_parameters()


def assert_close_per_tensor(actual: dict, expected: dict, tol: float, what: str) -> None:
    """|actual - expected| <= tol * max |expected| for every float tensor, tensor by tensor;
    the other tensors equal."""
    assert actual.keys() == expected.keys(), what
    for key, want in expected.items():
        if not want.is_floating_point():
            assert torch.equal(actual[key], want), (what, key)
            continue
        scale = want.abs().max().item()
        assert scale > 0, (what, key, "is 0: nothing to compare")  # the test would prove nothing
        difference = (actual[key] - want).abs().max().item()
        assert difference <= tol * scale, (what, key, difference / scale)


def assert_moved_alike(actual: dict, expected: dict, start: dict, tol: float, what: str) -> None:
    """Two state dicts that moved from `start`: ||actual - expected|| <= tol * ||expected - start||
    over all float tensors together; the other tensors equal."""
    assert actual.keys() == expected.keys(), what
    floats = [key for key, value in expected.items() if value.is_floating_point()]
    for key in expected.keys() - set(floats):
        assert torch.equal(actual[key], expected[key]), (what, key)
    distance = torch.cat([(actual[k] - expected[k]).flatten() for k in floats]).norm().item()
    moved = torch.cat([(expected[k] - start[k]).flatten() for k in floats]).norm().item()
    assert moved > 0 and distance <= tol * moved, (what, distance / moved)


def compiled_frames() -> dict:
    """What dynamo compiled since `fresh_dynamo`: frames, distinct graphs and graph breaks."""
    return {"frames": counters["frames"]["ok"], "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values())}


# ------------------------------------------------------------------ one process


def test_the_compiled_train_step_matches_the_eager_one(tmp_path):
    # Batches of 4: the slice of each of the two processes below, whose kernels (specialised
    # to their shapes) are then these.
    settings = dict(dropout=0.0, batch_size=4)
    eager = Trainer(tiny_config(tmp_path / "eager", **settings))
    compiled = Trainer(tiny_config(tmp_path / "compiled", compile="default", **settings))
    assert eager.network is eager.model
    assert isinstance(compiled.network, OptimizedModule) and compiled.network._orig_mod is compiled.model
    wake_up(eager.model)
    compiled.model.load_state_dict(eager.model.state_dict())  # in place: the optimizer's tensors
    initial = {k: v.clone() for k, v in eager.model.state_dict().items()}

    batches = eager.batches()  # real MNIST; both take the same images, and draw the same t and eps
    for step in range(3):
        images, _ = next(batches)
        start = time.perf_counter()
        loss = compiled.train_step(images)
        seconds = time.perf_counter() - start
        expected = eager.train_step(images)
        assert loss.item() == pytest.approx(expected.item(), rel=LOSS_RTOL), step
        # The gradients of this step (zeroed only at the start of the next): every parameter's.
        grads = {name: p.grad for name, p in compiled.model.named_parameters()}
        expected_grads = {name: p.grad for name, p in eager.model.named_parameters()}
        assert_close_per_tensor(grads, expected_grads, GRAD_TOL, f"gradient, step {step}")
        print(f"compiled step {step}: {seconds:.2f} s")
    # One graph for the whole network, compiled at the first step and reused at the others
    # (no recompilation), with no graph break.
    assert compiled_frames() == {"frames": 1, "graphs": 1, "graph_breaks": 0}

    assert_moved_alike(compiled.model.state_dict(), eager.model.state_dict(), initial, MOVED_TOL, "weights")
    # The EMA's first update copied the (woken) initial weights, so they are where it started.
    ema_start = {f"module.{k}": v for k, v in initial.items()}
    assert_moved_alike(compiled.ema.state_dict(), eager.ema.state_dict(), ema_start, MOVED_TOL, "EMA")
    assert compiled.ema.updates == eager.ema.updates == 3
    compiled_state = compiled.optimizer.state_dict()["state"]
    for index, state in eager.optimizer.state_dict()["state"].items():
        assert_close_per_tensor(compiled_state[index], state, GRAD_TOL, f"Adam state of parameter {index}")


def test_compiled_sampling_draws_the_eager_images():
    """DDIM with fresh noise at each step (eta = 1), from the same seed: the random draws come
    from the generator outside the network, so only the network's rounding differs."""
    # Smaller than the training tests' network (two levels, one block each, attention at 14x14
    # still): sampling compiles a graph of its own (no backward, no saved activations), and
    # this one has a third fewer kernels for the C++ compiler.
    model = UNet.from_preset("mnist", base_channels=8, channel_mults=(1, 2), num_res_blocks=1, dropout=0.0)
    wake_up(model)
    diffusion = Diffusion(50)
    compiled = torch.compile(model, mode="default")  # as `sample --compile` does

    def draw(network) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return diffusion.sample(network, (4, 1, 28, 28), sampler="ddim", steps=5, eta=1.0,
                                generator=generator, progress=False)

    start = time.perf_counter()
    images = draw(compiled)
    print(f"compiled sampling: {time.perf_counter() - start:.2f} s")
    expected = draw(model)
    # Five network calls, each a few 1e-6 off in float32, the errors carried into the next x_t.
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)
    # One graph for all five steps: t is a tensor, so its value does not specialise the graph.
    assert compiled_frames() == {"frames": 1, "graphs": 1, "graph_breaks": 0}


# ------------------------------------------------------------------ two processes


def test_train_compile_default_on_two_processes(tmp_path):
    """`train --compile default` under torchrun: DDP wraps the network and torch.compile wraps
    DDP. Dynamo traces DDP's forward (its Python bookkeeping breaks the graph, as torch
    expects) and hands the network's graph to its DDPOptimizer (torch._dynamo.config.optimize_ddp,
    on by default), which splits it at DDP's gradient buckets (one for this tiny network) so
    that each bucket's all-reduce can start while backward goes on. The run ends, rank 0
    writes its files, and it takes the steps of the eager run of one process."""
    reference = tmp_path / "one"
    eager = Trainer(tiny_config(reference, dropout=0.0))
    initial = {k: v.clone() for k, v in eager.model.state_dict().items()}
    eager.train(progress=False)

    run_dir = tmp_path / "two"
    command, env = torchrun_command(2, run_dir, *TINY_FLAGS, "--compile", "default")
    # DDPOptimizer's one line per compiled graph is the sign that each process compiled the
    # network inside DDP (an eager fallback would not write it).
    env["TORCH_LOGS"] = "torch._dynamo.backends.distributed"
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-4000:]
    print(f"torchrun, 2 processes, compiled: {seconds:.0f} s")
    for rank in (0, 1):
        assert any(line.startswith(f"[rank{rank}]:") and "DDPOptimizer used bucket cap" in line
                   for line in done.stderr.splitlines()), done.stderr[-4000:]
    assert f"done: step {STEPS}" in done.stdout and "on 2 processes (4 each)" in done.stdout

    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "ema.pt", "log.jsonl", "samples"]
    one, two = load_checkpoint(reference / "checkpoint.pt"), load_checkpoint(run_dir / "checkpoint.pt")
    assert two["step"] == one["step"] == STEPS and two["data_position"] == one["data_position"]
    assert two["train_config"]["compile"] == "default"
    assert torch.equal(two["rng"]["noise"], one["rng"]["noise"])
    assert_moved_alike(two["model"], one["model"], initial, MOVED_TOL, "weights")
    ema_start = {f"module.{k}": v for k, v in initial.items()}
    assert_moved_alike(two["ema"], one["ema"], ema_start, MOVED_TOL, "EMA")
    ema_pt = load_checkpoint(run_dir / "ema.pt")["ema"]  # the EMA weights alone, as `sample` reads them
    assert_moved_alike(ema_pt, load_checkpoint(reference / "ema.pt")["ema"], initial, MOVED_TOL, "ema.pt")
    for index, state in one["optimizer"]["state"].items():
        assert_close_per_tensor(two["optimizer"]["state"][index], state, GRAD_TOL, f"Adam state of parameter {index}")
    assert two["scheduler"]["last_epoch"] == one["scheduler"]["last_epoch"]
    for line, want in zip(log_lines(run_dir), log_lines(reference), strict=True):
        assert line["step"] == want["step"] and line["loss"] == pytest.approx(want["loss"], rel=LOSS_RTOL)
