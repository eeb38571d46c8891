"""Sparse checkpoints are tensors only: safetensors, torch.load(weights_only=True),
torch.distributed.checkpoint and Hugging Face save_pretrained take them; checkpoints whose metadata is a dict (older files) still load."""
import io

import pytest
import torch
from torch import nn

import sparse_ext
from sparse_ext import SparseConv2d, SparseLinear
from sparse_ext.nn._stored import decode_extra_state

safetensors_torch = pytest.importorskip("safetensors.torch")


def _linear(pattern, seed):
    torch.manual_seed(seed)
    kwargs = {} if ":" in pattern else {"sparsity": 0.75}
    return SparseLinear.from_dense(nn.Linear(64, 48), pattern=pattern, **kwargs)


def _conv(seed):
    torch.manual_seed(seed)
    return SparseConv2d.from_dense(nn.Conv2d(16, 24, 3, padding=1, stride=2), sparsity=0.8,
                                   activation="relu")


MODULES = {"csr": lambda s: _linear("unstructured", s), "4x1": lambda s: _linear("4x1", s),
           "2:4": lambda s: _linear("2:4", s), "conv3x3": _conv}


def _input(name):
    return torch.randn(2, 16, 9, 9) if name.startswith("conv") else torch.randn(5, 64)


@pytest.mark.parametrize("name", MODULES)
def test_state_dict_is_tensors_and_round_trips_through_safetensors(name, tmp_path):
    source, target = MODULES[name](0), MODULES[name](1)
    sd = source.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    meta = decode_extra_state(sd["_extra_state"])
    assert meta["pattern"] == source.pattern
    path = tmp_path / "m.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    target.load_state_dict(safetensors_torch.load_file(str(path)))
    x = _input(name)
    torch.testing.assert_close(target(x), source(x))
    if name.startswith("conv"):
        assert target.activation == "relu" and target.stride == (2, 2)


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_distributed_checkpoint_round_trip(name, tmp_path):
    """torch.distributed.checkpoint saves and loads in place (single process, no group): the
    target must hold tensors of the saved sizes, as any DCP load requires; the same pattern and
    sparsity give that."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    source, target = MODULES[name](0), MODULES[name](1)
    dcp.save(source.state_dict(), checkpoint_id=str(tmp_path))
    state = target.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path))
    target.load_state_dict(state)
    x = _input(name)
    torch.testing.assert_close(target(x), source(x))


@pytest.mark.parametrize("name", MODULES)
def test_weights_only_torch_load(name):
    source, target = MODULES[name](0), MODULES[name](1)
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    buf.seek(0)
    target.load_state_dict(torch.load(buf, weights_only=True))
    x = _input(name)
    torch.testing.assert_close(target(x), source(x))


@pytest.mark.parametrize("name", MODULES)
def test_older_dict_metadata_still_loads(name):
    source, target = MODULES[name](0), MODULES[name](1)
    sd = dict(source.state_dict())
    sd["_extra_state"] = decode_extra_state(sd["_extra_state"])  # how older checkpoints hold it
    target.load_state_dict(sd)
    x = _input(name)
    torch.testing.assert_close(target(x), source(x))


def test_hf_save_pretrained_of_a_sparsified_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=128)

    def sparse_bert(seed):
        torch.manual_seed(seed)
        model = transformers.BertModel(cfg).eval()
        sparse_ext.sparsify(model, sparsity=0.6, include="encoder.*")
        return model

    model = sparse_bert(0)
    model.save_pretrained(tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    loaded = sparse_bert(1)
    _, unexpected = loaded.load_state_dict(safetensors_torch.load_file(str(path)), strict=False)
    assert not unexpected
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


def _tiny_bert(seed):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=128)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4x1"])
def test_load_sparse_into_a_dense_model_from_save_pretrained(tmp_path, pattern):
    model = _tiny_bert(0)
    kwargs = {} if ":" in pattern else {"sparsity": 0.7}
    sparse_ext.sparsify(model, pattern=pattern, include="encoder.*", **kwargs)
    model.save_pretrained(tmp_path)
    fresh = _tiny_bert(1)  # dense, different weights
    sparse_ext.load_sparse(fresh, tmp_path)
    assert sum(isinstance(m, SparseLinear) for m in fresh.modules()) == 12
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).last_hidden_state, model(ids).last_hidden_state)


def test_load_sparse_from_torch_save_with_convs(tmp_path):
    def net():
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1),
                             nn.Flatten(), nn.Linear(32 * 16, 64))

    model = net()
    sparse_ext.sparsify(model, sparsity=0.8, min_features=0)
    path = tmp_path / "sparse.pt"
    torch.save(model.state_dict(), path)
    fresh = net()
    sparse_ext.load_sparse(fresh, path)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_load_sparse_errors():
    model = nn.Sequential(nn.Linear(64, 64))
    sd = sparse_ext.sparsify(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), sparsity=0.5,
                             min_features=0)[0].state_dict()
    with pytest.raises(KeyError, match="sparse layer '1'"):
        sparse_ext.load_sparse(model, sd)
