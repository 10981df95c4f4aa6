"""``isc search`` keys index reuse on the model's content: another model at the same local path rebuilds."""

from __future__ import annotations

import shutil

import numpy as np
import pytest


def _local_pyfunc(checkpoint, dst):
    """A descriptor pyfunc saved as a plain local folder (what ``--model /path/to/model`` points at)."""
    import mlflow

    from registry.model_logging import log_descriptor_model

    info = log_descriptor_model(checkpoint)
    return mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=str(dst))


@pytest.mark.slow
def test_other_model_at_the_same_path_rebuilds_the_index(tracking, mini_data, tmp_path):
    import torch

    from isc.models import create_model, save_checkpoint
    from registry.image_search import search_images

    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ckpt = save_checkpoint(
            tmp_path / f"m{seed}.pth.tar", create_model("test_efficientnet", input_size=32), epoch=0
        )
        folders.append(_local_pyfunc(ckpt, tmp_path / f"pyfunc{seed}"))

    model_path = tmp_path / "model"  # one path, two different models over time
    index = tmp_path / "search" / "ref.index"
    refs, queries = [mini_data.reference_dir], [mini_data.query_dir]

    shutil.copytree(folders[0], model_path)
    first = search_images(str(model_path), refs, queries, index, topk=3)
    again = search_images(str(model_path), refs, queries, index, topk=3)
    assert (first.index_reused, again.index_reused) == (False, True)  # loading the model changes nothing

    shutil.rmtree(model_path)
    shutil.copytree(folders[1], model_path)
    other = search_images(str(model_path), refs, queries, index, topk=3)
    assert other.index_reused is False
    fresh = search_images(str(folders[1]), refs, queries, tmp_path / "fresh" / "ref.index", topk=3)
    assert other.reference_ids == fresh.reference_ids
    np.testing.assert_allclose(other.scores, fresh.scores, atol=1e-5)
    assert other.model["content_sha256"] != first.model["content_sha256"]
