"""Datasets and loaders of a training run, with batches that are a pure function of (seed, epoch, position).

Every sample is augmented under RNG seeds derived from (seed, epoch, dataset index), and the epoch's order comes from
its own generator, so a run resumed in the middle of an epoch sees exactly the batches an uninterrupted run would —
whatever the worker count — and the loader never draws from the global RNG that the model's denoising uses.
(The Mosaic cache of the "deimv2" preset is the one exception: it lives in each worker and restarts with it.)
"""

import json
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from deim_lib.data.collate import BatchImageCollate
from deim_lib.data.dataset import CocoDetection, DatasetError
from deim_lib.data.recipes import augmentation_recipe
from deim_lib.data.transforms import build_train_transforms, build_val_transforms
from deim_lib.variants import IMAGENET_MEAN, IMAGENET_STD, Variant
from multimodal.config import DataConfig
from multimodal.data.synthetic import generate

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
    """Generate the synthetic demo dataset when configured and missing, or when the folder holds another one (other
    image counts or seed: the config, not an old folder, decides the data); True when it was generated now."""
    if not data.synthetic_dir:
        return False
    paths = data_paths(data)
    wanted = [*data.synthetic_images, data.synthetic_seed]
    try:
        found = [json.loads(paths[f"{split}_annotations"].read_text()) for split in ("train", "val")]
        if [len(found[0]["images"]), len(found[1]["images"]), found[0]["info"]["seed"]] == wanted:
            return False
    except (OSError, ValueError, KeyError):
        pass  # missing or unreadable: generate
    for generated in ("images", "annotations"):  # only what the generator writes: the folder may hold other files
        shutil.rmtree(Path(data.synthetic_dir) / generated, ignore_errors=True)
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


def _dataset(data: DataConfig, split: str, transforms, warn) -> CocoDetection:
    """The ``split`` ("train" or "val") dataset; its problems are errors naming the config key."""
    paths = data_paths(data)
    key = f"data.{split}_annotations" if not data.synthetic_dir else "data.synthetic_dir"
    try:
        dataset = CocoDetection(
            paths[f"{split}_images"], paths[f"{split}_annotations"], transforms, list(data.classes) or None
        )
    except DatasetError as error:
        raise DatasetError(f"{key}: {error}") from None
    name = "training" if split == "train" else "validation"
    if len(dataset) == 0:
        raise DatasetError(f"{key}: {dataset.annotation_file} lists no images: the {name} set is empty")
    if not dataset.coco.getAnnIds():
        if split == "val":
            raise DatasetError(
                f"{key}: {dataset.annotation_file} has no boxes, so AP is undefined; validate on annotated images"
            )
        warn(f"warning: {key}: {dataset.annotation_file} has no boxes; every training image is background")
    return dataset


def build_train_dataset(
    data: DataConfig, variant: Variant, image_size: int, augmentation: str, warn=print
) -> CocoDetection:
    """The training set with the ``augmentation`` preset; the configured class names must equal its categories."""
    transforms = build_train_transforms(
        augmentation, image_size, normalization(variant), augmentation_recipe(variant.name)
    )
    return _dataset(data, "train", transforms, warn)


def build_val_dataset(data: DataConfig, variant: Variant, image_size: int) -> CocoDetection:
    """The validation set, preprocessed as DEIMv2 evaluates: its categories fix the class list and ids."""
    return _dataset(data, "val", build_val_transforms(image_size, normalization(variant)), print)


@dataclass
class TrainingData:
    """A phase's training set and how its epochs are loaded: this rank's share of ``data.batch_size``, batches that
    are a pure function of (seed, epoch, position)."""

    dataset: CocoDetection
    data: DataConfig
    variant: Variant
    image_size: int
    augmentation: str
    seed: int
    rank: int = 0
    world_size: int = 1
    pin_memory: bool = False  # on CUDA: page-locked batches, so that the non-blocking copies do not wait

    def __post_init__(self) -> None:
        per_process = self.data.batch_size // self.world_size
        if len(self.dataset) // self.world_size < per_process:
            raise DatasetError(
                f"data.batch_size: {len(self.dataset)} training images cannot fill one batch of {per_process} per "
                f"process ({self.dataset.annotation_file}); lower data.batch_size"
            )

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.world_size // (self.data.batch_size // self.world_size)

    def loader(self, epoch: int, start_batch: int = 0) -> DataLoader:
        """Epoch ``epoch``'s loader from batch ``start_batch`` on (re-made each epoch so the collate and the workers
        see that epoch)."""
        sampler = EpochBatchSampler(
            len(self.dataset), self.data.batch_size // self.world_size, self.seed, epoch, self.rank, self.world_size
        )
        sampler.start = start_batch
        recipe = augmentation_recipe(self.variant.name) if self.augmentation == "deimv2" else None
        collate = BatchImageCollate(recipe, base_size=self.image_size)
        collate.set_epoch(epoch)
        return DataLoader(
            SeededSamples(self.dataset, self.seed),
            batch_sampler=sampler,
            num_workers=self.data.num_workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.seed + epoch),  # worker seeds must not consume the global RNG
            persistent_workers=False,
            pin_memory=self.pin_memory,
        )


def build_val_loader(
    dataset: CocoDetection,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """This rank's share of the validation set, in order (ranks take interleaved images); ``pin_memory`` on CUDA."""
    indices = list(range(rank, len(dataset), world_size))
    return DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=BatchImageCollate(None),
        generator=torch.Generator().manual_seed(0),
        pin_memory=pin_memory,
    )
