"""The single-process importance writer takes tensors that are slices of one larger buffer (what a reduction into one
flat buffer returns) and writes each as its own tensor; huggingface_hub's writer alone refuses them."""

import torch
from safetensors.torch import load_file

from hf_weightprune.files import importance_files as F


def test_slices_of_one_flat_buffer_are_written_as_their_own_tensors(tmp_path):
    flat = torch.arange(20, dtype=torch.float32)
    tensors = {"a.weight": flat[:6].view(2, 3), "b.weight": flat[6:18].view(3, 4), "c.weight": torch.ones(2)}
    F.write_single(str(tmp_path), tensors)
    got = load_file(str(tmp_path / F.WEIGHTS_NAME))
    assert got.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(got[name], t), name
    assert flat.equal(torch.arange(20, dtype=torch.float32))  # the inputs are untouched
