"""compressed-tensors interop: checkpoints written by the reference library load into SparseLinear
layers (2:4 as N:M, the rest unstructured) that compute what the dense model computes, and
sparse_ext's writer produces what the reference library decompresses to the same weights, with
the package's codec and with the built-in one."""
import json

import pytest
import torch
from torch import nn

import sparse_ext
from sparse_ext import SparseLinear
from sparse_ext.compressed_tensors import (load_compressed_tensors, save_compressed_tensors,
                                           to_compressed_tensors)
from sparse_ext.formats import NMWeight

safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(autouse=True, params=["package", "builtin"])
def codec(request, monkeypatch):
    """Every test runs with the package's compressors (where the installed compressed-tensors
    has them) and with the built-in codec that replaces them in newer releases."""
    from sparse_ext import compressed_tensors_codec

    if request.param == "package":
        if not isinstance(compressed_tensors_codec.codec(), compressed_tensors_codec.PackageCodec):
            pytest.skip("the installed compressed-tensors has no sparse compressors")
    else:
        monkeypatch.setattr("sparse_ext.compressed_tensors.codec",
                            compressed_tensors_codec.BuiltinCodec)
    return request.param


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 40, bias=False)
        self.head = nn.Linear(40, 8)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _pruned_dense(pattern):
    """A dense Net whose fc1/fc2 weights are already pruned (what llm-compressor saves)."""
    net = Net(0)
    with torch.no_grad():
        for layer in (net.fc1, net.fc2):
            if pattern == "2:4":
                keep = sparse_ext.nm_mask(layer.weight, 2, 4)
            else:
                keep = sparse_ext.magnitude_mask(layer.weight, 0.7)
            layer.weight.mul_(keep)
    return net


def _reference_compress(net, fmt):
    """The state dict the reference library's compressor writes for the pruned fc1 and fc2."""
    compressors = pytest.importorskip("compressed_tensors.compressors")
    config = pytest.importorskip("compressed_tensors.config")
    structure = "2:4" if fmt == "sparse-24-bitmask" else "unstructured"
    compressor = compressors.BaseCompressor.load_from_registry(
        fmt, config=config.SparsityCompressionConfig.load_from_registry(
            fmt, sparsity_structure=structure))
    return compressor.compress(net.state_dict(), compression_targets={"fc1", "fc2"})


@pytest.mark.parametrize("pattern,fmt", [("2:4", "sparse-24-bitmask"),
                                         ("unstructured", "sparse-bitmask"),
                                         ("2:4", "sparse-bitmask")])
def test_reads_the_reference_library_checkpoints(pattern, fmt):
    dense = _pruned_dense(pattern)
    state = _reference_compress(dense, fmt)
    model = Net(1)
    load_compressed_tensors(model, state)
    assert isinstance(model.fc1, SparseLinear) and isinstance(model.fc2, SparseLinear)
    assert not isinstance(model.head, SparseLinear)
    if fmt == "sparse-24-bitmask":
        assert isinstance(model.fc1.weight_format(), NMWeight) and model.fc1.pattern == "2:4"
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)


def _sparsified_net(pattern):
    net = Net(0)
    kwargs = {} if pattern == "2:4" else {"sparsity": 0.7}
    sparse_ext.sparsify(net, pattern=pattern, include=["fc1", "fc2"], **kwargs)
    return net


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_writes_what_the_reference_library_decompresses(pattern):
    ct = pytest.importorskip("compressed_tensors.compressors.sparse_compressors.sparse_bitmask")
    ct24 = pytest.importorskip(
        "compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask")
    net = _sparsified_net(pattern)
    state, fmt = to_compressed_tensors(net)
    assert fmt == ("sparse-24-bitmask" if pattern == "2:4" else "sparse-bitmask")
    for layer in ("fc1", "fc2"):
        module = getattr(net, layer)
        parts = {p: state[f"{layer}.{p}"] for p in ("shape", "compressed", "bitmask",
                                                     "row_offsets") if f"{layer}.{p}" in state}
        if fmt == "sparse-24-bitmask":
            dense = ct24.Sparse24BitMaskTensor.from_compressed_data(**parts).decompress()
        else:
            dense = ct.BitmaskTensor(**parts).decompress()
        torch.testing.assert_close(dense, module.weight_format().to_dense())


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_the_reference_model_compressor_decompresses_a_saved_folder(tmp_path, pattern):
    """The whole-model path the ecosystem (transformers, vLLM) takes: ModelCompressor built from
    the folder's quantization_config decompresses the safetensors into a dense model."""
    model_compressor = pytest.importorskip("compressed_tensors.compressors")
    net = _sparsified_net(pattern)
    save_compressed_tensors(net, tmp_path, config={"architectures": ["Net"]})
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    compressor = model_compressor.ModelCompressor.from_compression_config(config)
    assert compressor.sparsity_compressor is not None
    dense = Net(3)
    compressor.decompress(str(tmp_path), dense)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), net(x), rtol=1e-5, atol=1e-5)


def test_older_layout_with_weight_suffix_still_reads():
    """Checkpoints of older compressed-tensors releases name the parts <layer>.weight.<part>."""
    dense = _pruned_dense("unstructured")
    state = {}
    for name, tensor in _reference_compress(dense, "sparse-bitmask").items():
        layer, _, part = name.rpartition(".")
        renamed = f"{layer}.weight.{part}" if layer in ("fc1", "fc2") and part in (
            "shape", "compressed", "bitmask", "row_offsets") else name
        state[renamed] = tensor
    model = load_compressed_tensors(Net(1), state)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", ["2:4", "unstructured", "4x1"])
def test_round_trip_through_a_folder(tmp_path, pattern):
    net = Net(0)
    kwargs = {} if pattern == "2:4" else {"sparsity": 0.75}
    sparse_ext.sparsify(net, pattern=pattern, include=["fc1", "fc2"], **kwargs)
    save_compressed_tensors(net, tmp_path, config={"architectures": ["Net"]})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    fresh = load_compressed_tensors(Net(2), tmp_path)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), net(x), rtol=1e-5, atol=1e-5)


def test_quantized_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                 "config_groups": {"group_0": {}}}}))
    with pytest.raises(NotImplementedError, match="quantized"):
        load_compressed_tensors(Net(), tmp_path)


def test_inconsistent_compressed_weight_raises():
    state = {k: v for k, v in Net().state_dict().items() if not k.startswith("fc1.weight")}
    state["fc1.weight.shape"] = torch.tensor([96, 64])
    state["fc1.weight.compressed"] = torch.randn(10)
    state["fc1.weight.bitmask"] = torch.zeros(96, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="holds 10 values but its bitmask keeps 0"):
        load_compressed_tensors(Net(), state)
