"""guidekit.ops.shapes: layouts (canonical (b, c, *spatial) conversion round trips for any axis order, and
clear errors), the per-sample dim helpers, and the half-precision upcast."""

from __future__ import annotations

import pytest
import torch
from gen import layouts, shapes
from hypothesis import given
from hypothesis import strategies as st

from guidekit.errors import LayoutError, ShapeError
from guidekit.ops.shapes import (
    append_dims,
    canonical_layout,
    check_layout,
    from_canonical,
    non_batch_dims,
    parse_layout,
    to_canonical,
    upcast,
)

extra_axes = st.lists(st.sampled_from(["f", "h", "w", "t", "d", "l"]), max_size=3, unique=True)
any_layout = st.one_of(layouts(), extra_axes.flatmap(lambda rest: st.permutations(["b", "c", *rest]).map(" ".join)))


@given(data=st.data(), layout=any_layout)
def test_to_canonical_moves_b_and_c_first_and_keeps_the_rest_in_order(data, layout):
    axes = layout.split()
    shape = data.draw(shapes(layout, max_side=5))
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)
    canon = to_canonical(x, layout)
    order = canonical_layout(layout).split()
    assert order[:2] == ["b", "c"] and order[2:] == [a for a in axes if a not in ("b", "c")]
    assert torch.equal(canon, x.permute([axes.index(a) for a in order]))
    assert torch.equal(from_canonical(canon, layout), x)  # exact round trip


@given(data=st.data(), layout=any_layout)
def test_from_canonical_then_to_canonical_is_identity(data, layout):
    order = canonical_layout(layout).split()
    native_shape = data.draw(shapes(layout, max_side=5))
    axes = layout.split()
    canon = torch.randn([native_shape[axes.index(a)] for a in order], dtype=torch.float64)
    assert torch.equal(to_canonical(from_canonical(canon, layout), layout), canon)


def test_canonical_layouts_are_returned_without_a_copy():
    x = torch.zeros(2, 3, 4, 5)
    assert to_canonical(x, "b c h w") is x and from_canonical(x, "b c h w") is x
    y = torch.zeros(2, 4, 3, 5, 6)  # CogVideoX (b, f, c, h, w)
    assert to_canonical(y, "b f c h w").shape == (2, 3, 4, 5, 6)
    assert to_canonical(y, "b f c h w").data_ptr() == y.data_ptr()  # a view


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        ("", "expected axis names such as 'b c h w', got an empty string"),
        ("b c h h", r"expected each axis once, got 'b c h h' \(repeated: \['h'\]\)"),
        ("b h w", "expected an axis named 'c', got 'b h w'"),
        ("c h w", "expected an axis named 'b'"),
        ("b c 2w", r"bad: \['2w'\]"),
        (3, "expected a string such as 'b c h w', got int"),
    ],
)
def test_malformed_layouts_are_named(layout, match):
    with pytest.raises(LayoutError, match=match):
        parse_layout(layout)


def test_rank_mismatch_names_the_layout_and_shape():
    with pytest.raises(
        LayoutError, match=r"layout 'b c f h w' has 5 axes but the tensor has 4 dims \(shape \(1, 2, 3, 4\)\)"
    ):
        check_layout(torch.zeros(1, 2, 3, 4), "b c f h w")
    with pytest.raises(LayoutError):
        to_canonical(torch.zeros(1, 2, 3), "b c h w")


@given(ndim=st.integers(2, 6))
def test_non_batch_dims_and_append_dims(ndim):
    x = torch.zeros([2] * ndim)
    assert non_batch_dims(x) == tuple(range(1, ndim))
    v = torch.arange(2.0)
    assert append_dims(v, ndim).shape == (2,) + (1,) * (ndim - 1)
    assert torch.equal((x + append_dims(v, ndim))[1], torch.ones([2] * (ndim - 1)))


def test_reduction_helpers_refuse_too_few_or_too_many_dims():
    with pytest.raises(ShapeError, match=r"expected at least 2 dims \(b, c, ...\), got shape \(3,\)"):
        non_batch_dims(torch.zeros(3))
    with pytest.raises(ShapeError, match=r"expected at most 2 dims, got shape \(1, 1, 1\)"):
        append_dims(torch.zeros(1, 1, 1), 2)


def test_upcast_keeps_float64_and_raises_half():
    assert upcast(torch.zeros(1, dtype=torch.bfloat16)).dtype == torch.float32
    assert upcast(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    x = torch.zeros(1)
    assert upcast(x) is x
