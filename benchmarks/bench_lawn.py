"""LAWN suite: the cost of LAWN's per-step work (gradient projection and weight rescale).

Each LAWN case starts its constrained phase at the first step (``free_steps=0``), so every timed
step projects and rescales; ``log_norms`` stays on (its default), as a user would run it.

- ``resnet`` / ``resnet+lawn``: timm resnet on digits at 32x32, Adam; LAWN constrains the classifier
  (the layer after the last BatchNorm) - the common case.
- ``resnet+lawn_all`` (``lawn_all``): the same with ``scope="all"``: every conv and linear weight is
  constrained (the weights that feed BatchNorm included), a fused projection and rescale over all
  weight tensors of the network; target <= 1.05x the plain step.
"""

from __future__ import annotations

import torch

from benchmarks.harness import SpeedCase
from lightning_logits.callbacks.lawn import LAWN
from lightning_logits.data.digits import DigitsDataModule
from lightning_logits.modules.classifier import Classifier


def _adam(params: object) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)  # type: ignore[arg-type]


def speed_cases(smoke: bool) -> list[SpeedCase]:
    model = "resnet10t" if smoke else "resnet18"

    def make_module() -> Classifier:
        return Classifier(model, num_classes=10, in_chans=1, optimizer=_adam)

    def make_data() -> DigitsDataModule:
        return DigitsDataModule(batch_size=16 if smoke else 64, image_size=32)

    return [
        SpeedCase("resnet", make_module, make_data),
        SpeedCase("resnet+lawn", make_module, make_data, lambda: [LAWN(free_steps=0)], baseline="resnet", target=1.02),
        SpeedCase(
            "resnet+lawn_all",
            make_module,
            make_data,
            lambda: [LAWN(free_steps=0, scope="all")],
            baseline="resnet",
            target=1.05,
        ),
    ]


def op_cost(repeats: int = 5) -> str:
    """LAWN's per-step work alone (fused projection + rescale) against a plain Adam step, interleaved.

    timm resnet18, 1 input channel, batch 64 at 32x32 (the suite's setting), on the CPU: isolates the
    cost that ``resnet+lawn_all`` adds from the Trainer's noise. ``python -m benchmarks.bench_lawn``.
    """
    import statistics
    import time

    import timm

    from lightning_logits.functional.lawn import frobenius_norms, project_to_tangent_, rescale_to_norm_
    from lightning_logits.networks.lawn import weight_matrices

    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=10, in_chans=1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,))
    every = [p for m in net.modules() for _, p in weight_matrices(m)]
    scopes = {"all": every, "final": [net.fc.weight]}

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()

    step()
    targets = {k: frobenius_norms(v) for k, v in scopes.items()}
    times: dict[str, list[float]] = {"plain": [], "all": [], "final": []}
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times["plain"].append(time.perf_counter() - start)
        for scope, weights in scopes.items():
            start = time.perf_counter()
            project_to_tangent_([w.grad for w in weights], weights)  # type: ignore[misc]
            rescale_to_norm_(weights, targets[scope])
            times[scope].append(time.perf_counter() - start)
    plain = statistics.median(times["plain"])
    lines = [f"plain step {1e3 * plain:.1f} ms (median of {repeats})"]
    for scope in ("final", "all"):
        cost = statistics.median(times[scope])
        lines.append(
            f"LAWN ops, scope={scope} ({len(scopes[scope])} tensors): {1e3 * cost:.2f} ms = {cost / plain:.4f} step"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(op_cost())
