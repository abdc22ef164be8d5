"""Graphs for full-batch node classification: a contextual SBM generator, networkx graphs, Planetoid, OGB.

Every source ends as one :class:`torch_geometric.data.Data` with ``x [N, F]``, ``y [N]``,
``edge_index [2, E]`` and boolean ``train_mask`` / ``val_mask`` / ``test_mask`` ``[N]``.
:class:`GraphDataModule` serves it as the single "batch" of every epoch (full batch: neighbour
sampling needs pyg-lib, which is not assumed here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torch_geometric.data import Data
from torch_geometric.utils import coalesce, remove_self_loops, to_undirected

from lightning_logits.functional.mowst import check_node_mask

__all__ = ["CSBMConfig", "GraphDataModule", "csbm_graph", "edge_homophily", "networkx_graph", "random_split_masks"]


@dataclass
class CSBMConfig:
    """Knobs of :func:`csbm_graph` (a dataclass so a YAML can set them under ``csbm:``).

    Attributes:
        num_nodes: nodes ``N``.
        num_classes: classes ``K`` (balanced).
        homophily: target edge homophily, the share of edges that join two nodes of the same class:
            0 is strongly heterophilous, ``1 / K`` structure-free, 1 strongly homophilous.
        avg_degree: mean degree of the undirected graph.
        num_features: feature dimension ``F``.
        feature_signal: length of the class means; 0 makes features pure noise (unit-variance noise).
        train_ratio: share of the nodes in the training split.
        val_ratio: share of the nodes in the validation split; the rest is the test set.
        seed: seed of everything random here (graph, features, split).

    Example:
        >>> config = CSBMConfig(num_nodes=400, num_classes=4, homophily=0.2, seed=1)
        >>> graph = csbm_graph(config)
        >>> graph.x.shape, round(edge_homophily(graph.edge_index, graph.y), 1)
        (torch.Size([400, 32]), 0.2)
    """

    num_nodes: int = 1000
    num_classes: int = 4
    homophily: float = 0.5
    avg_degree: float = 10.0
    num_features: int = 32
    feature_signal: float = 1.0
    train_ratio: float = 0.5
    val_ratio: float = 0.25
    seed: int = 0


def random_split_masks(
    num_nodes: int, train_ratio: float, val_ratio: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Disjoint random boolean masks ``[N]`` (train, val, test) of the given sizes.

    Args:
        num_nodes: ``N``.
        train_ratio: share of the nodes in the training mask (at least one node).
        val_ratio: share in the validation mask; the rest goes to the test mask.
        generator: the random stream of the permutation.

    Example:
        >>> import torch
        >>> train, val, test = random_split_masks(10, 0.5, 0.2, torch.Generator().manual_seed(0))
        >>> int(train.sum()), int(val.sum()), int(test.sum()), bool((train & val).any())
        (5, 2, 3, False)
    """
    if not (train_ratio > 0 and val_ratio >= 0 and train_ratio + val_ratio <= 1):
        raise ValueError(
            f"need 0 < train_ratio, 0 <= val_ratio and train_ratio + val_ratio <= 1, got "
            f"train_ratio={train_ratio}, val_ratio={val_ratio}"
        )
    perm = torch.randperm(num_nodes, generator=generator)
    n_train = max(1, round(train_ratio * num_nodes))
    n_val = round(val_ratio * num_nodes)
    masks = []
    for idx in (perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]):
        mask = torch.zeros(num_nodes, dtype=torch.bool)
        mask[idx] = True
        masks.append(mask)
    return masks[0], masks[1], masks[2]


def edge_homophily(edge_index: Tensor, y: Tensor) -> float:
    """Share of (directed) edges whose two ends have the same label; ``nan`` without edges.

    Args:
        edge_index: ``[2, E]`` int64 edges (source row, target row).
        y: ``[N]`` node labels.

    Example:
        >>> import torch
        >>> edges = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 0]])  # 0-1 and 1-0 join class 0; 2-3 and 3-0 do not
        >>> edge_homophily(edges, torch.tensor([0, 0, 1, 2]))
        0.5
    """
    if edge_index.shape[1] == 0:
        return float("nan")
    return float((y[edge_index[0]] == y[edge_index[1]]).float().mean())


def csbm_graph(config: CSBMConfig | None = None, **overrides: Any) -> Data:
    """Sample a contextual stochastic block model graph.

    Labels are balanced over ``K`` classes. Each undirected edge starts at a uniformly drawn node
    ``u``; with probability ``homophily`` its other end is a uniform node of ``u``'s class, otherwise
    a uniform node of another class; duplicates and self loops are dropped, so the realised edge
    homophily is close to ``homophily``. Features are ``x_v = feature_signal * mu_{y_v} + eps_v``
    with random unit class means ``mu_k`` and standard normal noise ``eps_v``.

    Args:
        config: a :class:`CSBMConfig`; keyword ``overrides`` replace its fields.

    Returns:
        ``Data(x [N, F] float32, y [N] int64, edge_index [2, E] undirected, train_mask, val_mask,
        test_mask)``.

    Example:
        >>> data = csbm_graph(num_nodes=200, num_classes=3, homophily=0.9, seed=1)
        >>> data.x.shape, int(data.train_mask.sum())
        (torch.Size([200, 32]), 100)
        >>> edge_homophily(data.edge_index, data.y) > 0.85
        True
    """
    cfg = CSBMConfig(**{**(config.__dict__ if config is not None else {}), **overrides})
    n, k = cfg.num_nodes, cfg.num_classes
    if k < 2 or n < 2 * k:
        raise ValueError(f"need num_classes >= 2 and num_nodes >= 2 * num_classes, got N={n}, K={k}")
    if not 0.0 <= cfg.homophily <= 1.0:
        raise ValueError(f"homophily must be in [0, 1] (share of same-class edges), got {cfg.homophily}")
    if cfg.avg_degree <= 0 or cfg.num_features < 1 or cfg.feature_signal < 0:
        raise ValueError(
            f"need avg_degree > 0, num_features >= 1 and feature_signal >= 0, got {cfg.avg_degree}, "
            f"{cfg.num_features}, {cfg.feature_signal}"
        )
    g = torch.Generator().manual_seed(cfg.seed)
    y = torch.arange(n) % k
    y = y[torch.randperm(n, generator=g)]
    members = [torch.nonzero(y == c).flatten() for c in range(k)]
    counts = torch.tensor([len(m) for m in members])

    num_edges = max(1, round(cfg.avg_degree * n / 2))
    src = torch.randint(n, (num_edges,), generator=g)
    same = torch.rand(num_edges, generator=g) < cfg.homophily
    # destination class: the source's own class, or a uniform other class (shift by 1..K-1)
    shift = torch.randint(1, k, (num_edges,), generator=g)
    dst_class = torch.where(same, y[src], (y[src] + shift) % k)
    # a uniform member of dst_class, drawn by a uniform position inside that class
    pos = (torch.rand(num_edges, generator=g) * counts[dst_class]).long().clamp_max(counts[dst_class] - 1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)[:-1]])
    dst = torch.cat(members)[offsets[dst_class] + pos]
    edge_index, _ = remove_self_loops(torch.stack([src, dst]))
    edge_index = coalesce(to_undirected(edge_index, num_nodes=n), num_nodes=n)

    means = torch.randn(k, cfg.num_features, generator=g)
    means = means / means.norm(dim=1, keepdim=True)
    x = cfg.feature_signal * means[y] + torch.randn(n, cfg.num_features, generator=g)
    train, val, test = random_split_masks(n, cfg.train_ratio, cfg.val_ratio, g)
    return Data(x=x, y=y, edge_index=edge_index, train_mask=train, val_mask=val, test_mask=test)


def networkx_graph(
    name: str = "karate_club_graph",
    label_attr: str = "club",
    train_ratio: float = 0.5,
    val_ratio: float = 0.25,
    seed: int = 0,
) -> Data:
    """One of networkx's small real graphs as ``Data``, with one-hot node identity features.

    Args:
        name: a function of :mod:`networkx` that returns a graph (``"karate_club_graph"``,
            ``"davis_southern_women_graph"`` with ``label_attr="bipartite"``, ...).
        label_attr: the node attribute holding the class (strings or ints are mapped to ``0..K-1``
            in sorted order).
        train_ratio: share of the nodes in the training split.
        val_ratio: share of the nodes in the validation split (the rest is the test split).
        seed: seed of the random split.

    Example:
        >>> data = networkx_graph("karate_club_graph")
        >>> data.num_nodes, int(data.y.max()) + 1, data.x.shape
        (34, 2, torch.Size([34, 34]))
    """
    import networkx as nx
    from torch_geometric.utils import from_networkx

    factory = getattr(nx, name, None)
    if not callable(factory):
        raise ValueError(f"networkx has no graph function {name!r}; try 'karate_club_graph'")
    graph = factory()
    values = [graph.nodes[v].get(label_attr) for v in graph.nodes]
    if any(v is None for v in values):
        raise ValueError(f"graph {name!r} lacks the node attribute {label_attr!r}; pass label_attr=<attribute>")
    classes = sorted(set(values), key=str)
    index = {c: i for i, c in enumerate(classes)}
    order = list(graph.nodes)  # relabel to 0..N-1 in node order, so labels and features line up
    relabeled = nx.Graph()
    relabeled.add_nodes_from(range(len(order)))
    pos = {v: i for i, v in enumerate(order)}
    relabeled.add_edges_from((pos[a], pos[b]) for a, b in graph.edges())
    data = from_networkx(relabeled)
    n = len(order)
    y = torch.tensor([index[graph.nodes[v][label_attr]] for v in order])
    g = torch.Generator().manual_seed(seed)
    train, val, test = random_split_masks(n, train_ratio, val_ratio, g)
    return Data(x=torch.eye(n), y=y, edge_index=data.edge_index, train_mask=train, val_mask=val, test_mask=test)


def _planetoid(name: str, root: str, download: bool) -> Data:
    from torch_geometric.datasets import Planetoid

    raw = Path(root) / name / "raw"
    if not download and not (raw.is_dir() and any(raw.iterdir())):
        raise FileNotFoundError(
            f"Planetoid {name!r} is not under {raw} and download=False: pass download=True (needs internet) "
            f"or copy the raw files there"
        )
    return Planetoid(root, name)[0]


def _ogb(name: str, root: str, download: bool) -> Data:
    try:
        from ogb.nodeproppred import PygNodePropPredDataset
    except ImportError as err:
        raise ImportError(f"OGB dataset {name!r} needs the ogb package: pip install ogb") from err
    folder = Path(root) / name.replace("-", "_")
    if not download and not folder.is_dir():
        raise FileNotFoundError(f"OGB {name!r} is not under {folder} and download=False: pass download=True")
    dataset = PygNodePropPredDataset(name, root=root)
    data = dataset[0]
    split = dataset.get_idx_split()
    n = data.num_nodes
    for key, part in (("train_mask", "train"), ("val_mask", "valid"), ("test_mask", "test")):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[split[part]] = True
        data[key] = mask
    data.y = data.y.view(-1)
    data.edge_index = to_undirected(data.edge_index, num_nodes=n)
    return data


class _OneGraph(Dataset[Data]):
    def __init__(self, data: Data) -> None:
        self.data = data

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Data:
        return self.data


class _Once(Sampler[int]):
    """Yields index 0 once; every DDP rank gets the whole graph (the module splits the train nodes)."""

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Any:
        return iter([0])


def _identity(item: Any) -> Any:  # module level: picklable for ddp_spawn
    return item


class GraphDataModule(pl.LightningDataModule):
    """One graph for full-batch node classification: each epoch is one "batch", the whole graph.

    Give exactly one source: ``data`` (any PyG ``Data`` with ``x``, ``y``, ``edge_index`` and
    ``train_mask``/``val_mask``/``test_mask``, each a boolean mask ``[N]`` or int64 node indices,
    turned into boolean masks; a 0/1 integer mask is refused: pass ``mask.bool()``), ``csbm``
    (a :class:`CSBMConfig`: the default when nothing is given), ``networkx`` (a networkx graph function name, see
    :func:`networkx_graph`), ``planetoid`` (``"Cora"``, ``"CiteSeer"``, ``"PubMed"``) or ``ogb``
    (``"ogbn-arxiv"``; needs the ``ogb`` package).

    Args:
        root: where Planetoid/OGB files live.
        download: allow Planetoid/OGB downloads (internet); off by default: a missing dataset is an error.
        label_attr: the node attribute holding the class, for ``networkx`` graphs.
        split_seed: seed of the random split of ``networkx`` graphs.

    ``setup("fit")`` fails when the training or the validation split selects no node.

    Under DDP every rank receives the whole graph (no sampler split); :class:`~lightning_logits.modules.mowst.Mowst`
    splits the training nodes across ranks itself.

    Example:
        >>> dm = GraphDataModule(csbm=CSBMConfig(num_nodes=100, num_classes=2))
        >>> dm.setup("fit")
        >>> dm.num_features, dm.num_classes
        (32, 2)
        >>> next(iter(dm.train_dataloader())).num_nodes
        100
    """

    def __init__(
        self,
        data: Data | None = None,
        csbm: CSBMConfig | None = None,
        networkx: str | None = None,
        planetoid: str | None = None,
        ogb: str | None = None,
        root: str = "data",
        download: bool = False,
        label_attr: str = "club",
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        sources = {"data": data, "csbm": csbm, "networkx": networkx, "planetoid": planetoid, "ogb": ogb}
        given = [name for name, value in sources.items() if value is not None]
        if len(given) > 1:
            raise ValueError(f"give one graph source, got {given}")
        self.source = given[0] if given else "csbm"
        self.csbm = csbm if csbm is not None else CSBMConfig()
        self.networkx, self.planetoid, self.ogb = networkx, planetoid, ogb
        self.root, self.download = os.fspath(root), download
        self.label_attr, self.split_seed = label_attr, split_seed
        self.data: Data | None = data
        if data is not None:
            self._validate(data)

    @staticmethod
    def _validate(data: Data) -> None:
        """Check the graph's fields; turn int64 index masks into boolean masks ``[N]`` (in place).

        A 0/1 integer mask, a boolean mask of the wrong length or out-of-range indices are refused
        (see :func:`~lightning_logits.functional.mowst.check_node_mask`).
        """
        for key in ("x", "y", "edge_index", "train_mask", "val_mask", "test_mask"):
            if getattr(data, key, None) is None:
                raise ValueError(
                    f"the graph lacks {key!r}: node classification needs x, y, edge_index and boolean "
                    "train_mask/val_mask/test_mask (see random_split_masks)"
                )
        if data.y.ndim != 1:
            raise ValueError(f"y must be class indices of shape [N], got {tuple(data.y.shape)}: flatten it")
        num_nodes = int(data.x.shape[0])
        for key in ("train_mask", "val_mask", "test_mask"):
            data[key] = check_node_mask(data[key], num_nodes, key)

    @staticmethod
    def _check_splits(data: Data, stage: str) -> None:
        """A split the stage needs must select at least one node: fitting needs training and validation nodes."""
        needed = {"fit": ("train_mask", "val_mask"), "validate": ("val_mask",), "test": ("test_mask",)}
        for key in needed.get(stage, ()):
            if not bool(data[key].any()):
                raise ValueError(
                    f"the graph's {key} selects no node (of {data.num_nodes}), and {stage!r} needs it: training on no "
                    "node would give chance accuracy, and validating on none a NaN accuracy that never stops early; "
                    "give the split nodes (see random_split_masks)"
                )

    def _load(self) -> Data:
        if self.source == "csbm":
            return csbm_graph(self.csbm)
        if self.source == "networkx":
            assert self.networkx is not None
            return networkx_graph(self.networkx, self.label_attr, seed=self.split_seed)
        if self.source == "planetoid":
            assert self.planetoid is not None
            return _planetoid(self.planetoid, self.root, self.download)
        assert self.ogb is not None
        return _ogb(self.ogb, self.root, self.download)

    def graph(self) -> Data:
        """The graph (loaded or generated on first use)."""
        if self.data is None:
            self.data = self._load()
            self._validate(self.data)
        return self.data

    @property
    def num_features(self) -> int:
        return int(self.graph().x.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.graph().y.max()) + 1

    def setup(self, stage: str) -> None:
        self._check_splits(self.graph(), stage)

    def _loader(self) -> DataLoader[Data]:
        return DataLoader(_OneGraph(self.graph()), batch_size=None, sampler=_Once(), collate_fn=_identity)

    def train_dataloader(self) -> DataLoader[Data]:
        return self._loader()

    def val_dataloader(self) -> DataLoader[Data]:
        return self._loader()

    def test_dataloader(self) -> DataLoader[Data]:
        return self._loader()

    def predict_dataloader(self) -> DataLoader[Data]:
        return self._loader()
