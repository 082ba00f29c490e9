"""Datasets for examples and demos, read from locally installed files (nothing is downloaded)."""

from .mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, MNIST_MEAN, MNIST_STD, load_mnist, read_idx

__all__ = ["FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "MNIST_MEAN", "MNIST_STD", "load_mnist", "read_idx"]
