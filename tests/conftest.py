"""Shared pytest fixtures.

`synthetic_coco`: a session-wide small COCO dataset made by `ddetr_cli.synth.make_synthetic_coco`
(8 train / 4 val JPEGs of 96..160 px, five shape classes with category ids 1, 2, 3, 5, 7). It is a
`pathlib.Path` to a directory laid out as

    train/*.jpg   val/*.jpg   annotations/instances_train.json   annotations/instances_val.json

Treat it as read-only: it is shared by every test in the session.
"""

import pytest

from ddetr_cli.synth import make_synthetic_coco


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    return make_synthetic_coco(
        tmp_path_factory.mktemp("synthetic_coco"), num_train=8, num_val=4, image_size=(96, 160), seed=0
    )
