"""DataModules: digits (embedded, no download), CIFAR-10/100, class-incremental streams, graphs."""

from lightning_logits.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_logits.data.digits import DigitsDataModule, load_digits_tensors
from lightning_logits.data.graphs import CSBMConfig, GraphDataModule, csbm_graph, edge_homophily, networkx_graph
from lightning_logits.data.streams import ClassIncrementalStream

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CSBMConfig",
    "ClassIncrementalStream",
    "DigitsDataModule",
    "GraphDataModule",
    "csbm_graph",
    "edge_homophily",
    "load_digits_tensors",
    "networkx_graph",
]
