"""Which index stands for a training set: the folder names of cached indices."""

from __future__ import annotations

from knnflow.training_sets import default_index_folder


def test_index_folders_of_the_two_photo_sizes_differ():
    assert default_index_folder("photos", "train") == default_index_folder("photos", "train", 32)
    assert str(default_index_folder("photos", "train")) == "indices/photos-train"
    assert str(default_index_folder("photos", "train", 64)) == "indices/photos64-train"
    assert str(default_index_folder("folder:a/imgs", "test", 16)) == "indices/folder-imgs16-test"
    assert str(default_index_folder("folder:b/cifar10", "train", 16)) \
        == "indices/folder-cifar10-16-train"
