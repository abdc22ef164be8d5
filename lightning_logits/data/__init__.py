"""DataModules: stdlib text corpus, digits (embedded) with OOD/corrupted variants, CIFAR-10/100, streams, graphs."""

from lightning_logits.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_logits.data.corpus import StdlibCorpus, StdlibCorpusDataModule, split_of, stdlib_files
from lightning_logits.data.digits import DigitsDataModule, load_digits_tensors
from lightning_logits.data.graphs import CSBMConfig, GraphDataModule, csbm_graph, edge_homophily, networkx_graph
from lightning_logits.data.ood import (
    CIFAR10ShiftDataModule,
    DigitsShiftDataModule,
    corrupt_images,
    shape_images,
    split_held_out_classes,
    uniform_noise_images,
)
from lightning_logits.data.packing import pack_documents
from lightning_logits.data.streams import ClassIncrementalStream

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFAR10ShiftDataModule",
    "CSBMConfig",
    "ClassIncrementalStream",
    "DigitsDataModule",
    "DigitsShiftDataModule",
    "GraphDataModule",
    "StdlibCorpus",
    "StdlibCorpusDataModule",
    "corrupt_images",
    "csbm_graph",
    "edge_homophily",
    "load_digits_tensors",
    "networkx_graph",
    "pack_documents",
    "shape_images",
    "split_held_out_classes",
    "split_of",
    "stdlib_files",
    "uniform_noise_images",
]
