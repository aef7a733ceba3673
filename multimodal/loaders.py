"""Datasets and loaders of a training run, with batches that are a pure function of (seed, epoch, position).

Every sample is augmented under RNG seeds derived from (seed, epoch, dataset index), and the epoch's order comes from
its own generator, so a run resumed in the middle of an epoch sees exactly the batches an uninterrupted run would —
whatever the worker count — and the loader never draws from the global RNG that the model's denoising uses.
(The Mosaic cache of the "deimv2" preset is the one exception: it lives in each worker and restarts with it.)
"""

import random
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from deim_lib.data.collate import BatchImageCollate
from deim_lib.data.dataset import CocoDetection, DatasetError
from deim_lib.data.recipes import augmentation_recipe
from deim_lib.data.synthetic import generate
from deim_lib.data.transforms import build_train_transforms, build_val_transforms
from deim_lib.variants import IMAGENET_MEAN, IMAGENET_STD, Variant
from multimodal.config import DataConfig

_SEED_STRIDE = 1_000_003  # a prime, so (epoch, index) pairs map to distinct seeds for any realistic dataset


def data_paths(data: DataConfig) -> dict[str, Path]:
    """The four dataset paths; with ``synthetic_dir`` they point into the generated dataset."""
    if data.synthetic_dir:
        root = Path(data.synthetic_dir)
        return {
            "train_images": root / "images" / "train",
            "train_annotations": root / "annotations" / "train.json",
            "val_images": root / "images" / "val",
            "val_annotations": root / "annotations" / "val.json",
        }
    names = ("train_images", "train_annotations", "val_images", "val_annotations")
    return {name: Path(getattr(data, name)) for name in names}


def prepare_synthetic_data(data: DataConfig) -> bool:
    """Generate the synthetic demo dataset when configured and missing; True when it was generated now."""
    paths = data_paths(data)
    if not data.synthetic_dir or paths["val_annotations"].is_file():
        return False
    num_train, num_val = data.synthetic_images
    generate(data.synthetic_dir, seed=data.synthetic_seed, num_train=num_train, num_val=num_val)
    return True


class SeededSamples(Dataset):
    """Items addressed by (epoch, index): augmentation RNGs are seeded from (seed, epoch, index) before loading."""

    def __init__(self, dataset: CocoDetection, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        sample_seed = (self.seed * _SEED_STRIDE + epoch) * _SEED_STRIDE + index
        # Forked so that loading in the main process (num_workers 0) leaves the training RNG streams untouched.
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(sample_seed)
            torch.manual_seed(sample_seed % 2**63)
            self.dataset.set_epoch(epoch)
            item = self.dataset[index]
        random.setstate(python_state)
        return item


class EpochBatchSampler(Sampler):
    """This rank's batches of one epoch: a seeded permutation, sharded across ranks, from batch ``start`` on.

    The global batch is ``batch_size × world_size``; incomplete trailing batches are dropped (as DEIMv2 does).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.start = 0

    def batches(self) -> list[list[tuple[int, int]]]:
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        per_rank = self.num_samples // self.world_size
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()
        count = len(mine) // self.batch_size
        return [[(self.epoch, i) for i in mine[b * self.batch_size : (b + 1) * self.batch_size]] for b in range(count)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches()[self.start :])

    def __len__(self) -> int:
        return (self.num_samples // self.world_size) // self.batch_size


def normalization(variant: Variant) -> tuple[tuple, tuple] | None:
    return (IMAGENET_MEAN, IMAGENET_STD) if variant.imagenet_normalize else None


def build_datasets(
    data: DataConfig, variant: Variant, image_size: int, augmentation: str
) -> tuple[CocoDetection, CocoDetection]:
    """Train and validation datasets; the configured class names must equal the dataset's categories."""
    paths = data_paths(data)
    class_names = list(data.classes) or None
    recipe = augmentation_recipe(variant.name)
    train_transforms = build_train_transforms(augmentation, image_size, normalization(variant), recipe)
    val_transforms = build_val_transforms(image_size, normalization(variant))
    train = CocoDetection(paths["train_images"], paths["train_annotations"], train_transforms, class_names)
    val = CocoDetection(paths["val_images"], paths["val_annotations"], val_transforms, class_names)
    for name, dataset in (("training", train), ("validation", val)):
        if len(dataset) == 0:
            raise DatasetError(f"{dataset.annotation_file}: the {name} set has no images; point data.* at real data")
    return train, val


def build_train_loader(
    dataset: CocoDetection,
    data: DataConfig,
    variant: Variant,
    image_size: int,
    augmentation: str,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[DataLoader, EpochBatchSampler]:
    """One epoch's loader (re-made each epoch so the collate and the workers see that epoch)."""
    batch_size = data.batch_size // world_size
    if len(dataset) // world_size < batch_size:
        raise DatasetError(
            f"{dataset.annotation_file}: {len(dataset)} training images cannot fill one batch of {batch_size} per "
            f"process; lower data.batch_size"
        )
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, epoch, rank, world_size)
    recipe = augmentation_recipe(variant.name) if augmentation == "deimv2" else None
    collate = BatchImageCollate(recipe, base_size=image_size)
    collate.set_epoch(epoch)
    loader = DataLoader(
        SeededSamples(dataset, seed),
        batch_sampler=sampler,
        num_workers=data.num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed + epoch),  # worker seeds must not consume the global RNG
        persistent_workers=False,
    )
    return loader, sampler


def build_val_loader(
    dataset: CocoDetection, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """This rank's share of the validation set, in order (ranks take interleaved images)."""
    indices = list(range(rank, len(dataset), world_size))
    return DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=BatchImageCollate(None),
        generator=torch.Generator().manual_seed(0),
    )
