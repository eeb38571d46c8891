"""The SparseWeight interface every format implements, the pattern -> format registry, and the
one scoring rule of per-layer and global pruning."""
import pytest
import torch

from sparse_ext.formats import CSRWeight, NMWeight, SparseWeight, build_weight, format_for
from sparse_ext.prune import block_mask, global_masks, magnitude_mask

PATTERNS = {"unstructured": CSRWeight, "4x1": CSRWeight, "1x4": CSRWeight, "2:4": NMWeight,
            "1:8": NMWeight}


def _dense(out=16, inp=40, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_registry_builds_the_pattern_format(pattern):
    assert format_for(pattern) is PATTERNS[pattern]
    sparsity = None if ":" in pattern else 0.75
    w = build_weight(_dense(), pattern, sparsity=sparsity)
    assert type(w) is PATTERNS[pattern] and isinstance(w, SparseWeight)
    assert w.validate() is w
    assert w.config_for(pattern, w.block_rows, w.shape) == w.state_config()


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_state_round_trip_and_sizes(pattern):
    dense = _dense()
    w = build_weight(dense, pattern, sparsity=None if ":" in pattern else 0.5)
    again = type(w).from_state(w.state_tensors(), w.shape, w.state_config())
    assert torch.equal(again.to_dense(), w.to_dense())
    assert set(w.state_tensors()) == set(w.structure_names) | {"values"}
    assert w.nbytes == sum(t.numel() * t.element_size() for t in w.state_tensors().values())
    assert w.nnz == w.values.numel()
    stored = w.to_dense()
    assert w.zero_fraction() == pytest.approx(float((stored == 0).float().mean()))
    assert not stored[~w.mask()].any()
    kept = stored != 0
    assert torch.equal(stored[kept], dense[kept])
    ones = w.with_values(torch.ones_like(w.values)).to_dense()
    assert torch.equal(ones != 0, w.mask())
    x = torch.randn(3, dense.shape[1])
    torch.testing.assert_close(w.linear(x), x @ stored.t())


def test_csr_validate_names_the_tensor():
    w = CSRWeight.from_dense(_dense(8, 300), torch.rand(8, 300) < 0.5)
    offsets = w.offsets.clone()
    offsets[3] = 10**6
    with pytest.raises(ValueError, match="offsets must not decrease"):
        CSRWeight(offsets, w.indices, w.values, w.shape).validate()
    kb = w.k_blocks
    last = int(w.offsets[kb - 1])            # first entry of row 0's last (partial) block
    indices = w.indices.clone()
    indices[last] = 200
    with pytest.raises(ValueError, match="indices"):
        CSRWeight(w.offsets, indices, w.values, w.shape).validate()
    with pytest.raises(ValueError, match="values"):
        CSRWeight(w.offsets, w.indices, w.values[:-1], w.shape).validate()


@pytest.mark.parametrize("pattern,block", [("unstructured", (1, 1)), ("4x1", (4, 1)),
                                           ("2x2", (2, 2))])
def test_global_masks_of_one_layer_are_the_per_layer_mask(pattern, block):
    w = _dense(16, 40)
    (mask,) = global_masks([w], 0.6, pattern)
    per_layer = magnitude_mask(w, 0.6) if block == (1, 1) else block_mask(w, 0.6, block)
    assert torch.equal(mask, per_layer)
