"""Real data, offline: Fashion-MNIST, Moving Fashion-MNIST clips, ViSP camera footage, and a user's image folder."""

from unitok.data.errors import DataNotFoundError
from unitok.data.fashion_mnist import CLASS_NAMES, FashionMNIST, class_index, load_fashion_mnist
from unitok.data.folder import load_image_folder
from unitok.data.hf import dataset_to_arrays, to_hf_dataset
from unitok.data.info import data_info
from unitok.data.moving import Clip, MovingFashionMNIST, MovingFashionMNISTConfig
from unitok.data.visp import ViSPClips, ViSPClipsConfig, load_sequence

__all__ = [
    "CLASS_NAMES",
    "Clip",
    "DataNotFoundError",
    "FashionMNIST",
    "MovingFashionMNIST",
    "MovingFashionMNISTConfig",
    "ViSPClips",
    "ViSPClipsConfig",
    "class_index",
    "data_info",
    "dataset_to_arrays",
    "load_fashion_mnist",
    "load_image_folder",
    "load_sequence",
    "to_hf_dataset",
]
