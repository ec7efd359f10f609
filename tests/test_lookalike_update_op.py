"""lookalike_update_ (C++ host op) against protomem.reference.lookalike_update_ref, bit for bit:
random pairs with repeats (groups longer than 8), ties, ignored pairs, lists that fill and
overflow, every k / decay / symmetric; a case where the order of the float32 sums decides the
ranking; bad input."""
import numpy as np
import pytest
import torch

import protomem  # noqa: F401  (loads the ops)
from protomem.ops import lookalike_update_
from protomem.reference import lookalike_update_ref


def random_pairs(rng, C, n):
    rows = rng.integers(-2, C + 2, n)
    # half the pairs hit a few favourite look-alikes: repeated (a, b) groups, some longer than 8
    others = np.where(rng.random(n) < 0.5, (rows * 7 + 1) % max(C, 1), rng.integers(-1, C + 1, n))
    if n:
        rows[: n // 4] = rows[0]
        others[: n // 4] = (rows[0] + 1) % max(C, 1)
    cos = rng.choice(np.concatenate([np.linspace(-1, 1, 9), rng.uniform(-1, 1, 7)]), n)
    cos = cos.astype(np.float32)
    cos[rng.random(n) < 0.05] = np.nan
    cos[rng.random(n) < 0.03] = 1.5  # clipped to evidence 1
    return (torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(others.astype(np.int64)),
            torch.from_numpy(cos))


@pytest.mark.parametrize("C,k,decay,symmetric", [(37, 3, 0.9, True), (11, 1, 1.0, False),
                                                  (200, 4, 0.5, True), (5, 6, 0.97, False)])
def test_matches_the_reference_bit_for_bit(C, k, decay, symmetric):
    rng = np.random.default_rng(C * k)
    got_o, got_s = torch.full((C, k), -1, dtype=torch.int32), torch.zeros(C, k, dtype=torch.float16)
    ref_o, ref_s = got_o.clone(), got_s.clone()
    for step in range(20):
        rows, others, cos = random_pairs(rng, C, int(rng.integers(0, 60)))
        lookalike_update_(got_o, got_s, rows, others, cos, decay, symmetric)
        lookalike_update_ref(ref_o, ref_s, rows, others, cos, decay, symmetric)
        assert torch.equal(got_o, ref_o), f"step {step}"
        assert torch.equal(got_s.view(torch.int16), ref_s.view(torch.int16)), f"step {step}"
    assert (got_o >= 0).float().mean() > 0.3  # the lists did fill
    # listed ids are distinct per class, never the class itself, best first
    for a in range(C):
        ids = [b for b in got_o[a].tolist() if b >= 0]
        assert len(set(ids)) == len(ids) and a not in ids
        assert got_o[a].tolist() == ids + [-1] * (k - len(ids))
        s = got_s[a, : len(ids)].float()
        assert bool((s[:-1] >= s[1:]).all())


def test_ties_keep_the_smaller_id_and_long_sums_match_the_reference():
    o, s = torch.full((4, 2), -1, dtype=torch.int32), torch.zeros(4, 2, dtype=torch.float16)
    rows = torch.tensor([0, 0, 0])
    lookalike_update_(o, s, rows, torch.tensor([3, 2, 1]), torch.tensor([0.5, 0.5, 0.5]), 1.0, False)
    assert o[0].tolist() == [1, 2]  # equal evidence: the smaller ids
    # 0.1f + 1e-8 repeated: sequential float32 sums from 0, as the reference
    n = 30
    cos = torch.full((n,), -0.8) + torch.arange(n) * 1e-7
    lookalike_update_(o, s, torch.full((n,), 3), torch.full((n,), 2), cos, 1.0, False)
    ref_o, ref_s = torch.full((4, 2), -1, dtype=torch.int32), torch.zeros(4, 2, dtype=torch.float16)
    lookalike_update_ref(ref_o, ref_s, torch.full((n,), 3), torch.full((n,), 2), cos, 1.0, False)
    assert o[3].tolist() == ref_o[3].tolist() == [2, -1] and s[3, 0] == ref_s[3, 0]


def test_nothing_valid_changes_nothing():
    o = torch.tensor([[1, -1], [0, -1]], dtype=torch.int32)
    s = torch.tensor([[0.5, 0.0], [0.25, 0.0]], dtype=torch.float16)
    o0, s0 = o.clone(), s.clone()
    lookalike_update_(o, s, torch.tensor([0, 5, 1]), torch.tensor([0, 1, -1]),
                      torch.tensor([0.1, 0.2, 0.3]), 0.5, True)
    lookalike_update_(o, s, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                      torch.zeros(0), 0.5, True)
    assert torch.equal(o, o0) and torch.equal(s, s0)


@pytest.mark.parametrize("bad", ["others_dtype", "scores_dtype", "shape", "rows_dtype", "length", "decay"])
def test_bad_input_raises_before_writing(bad):
    o, s = torch.full((4, 2), -1, dtype=torch.int32), torch.zeros(4, 2, dtype=torch.float16)
    rows, others, cos, decay = torch.tensor([0]), torch.tensor([1]), torch.tensor([0.5]), 0.9
    if bad == "others_dtype":
        o = o.long()
    elif bad == "scores_dtype":
        s = s.float()
    elif bad == "shape":
        s = s[:3]
    elif bad == "rows_dtype":
        rows = rows.int()
    elif bad == "length":
        cos = torch.tensor([0.5, 0.5])
    else:
        decay = 0.0
    error = TypeError if bad.endswith("dtype") else ValueError
    with pytest.raises(error):
        lookalike_update_(o, s, rows, others, cos, decay, True)
    assert bool((o == -1).all())


def test_a_score_sums_its_evidence_in_pair_order():
    """Look-alike 1 of class 0 gets evidence 1 then four of 2^-25 (each lost against 1 in float32:
    1.0), look-alike 2 gets 1 then 2^-23 (1 + 2^-23): 2 ranks first. Summed in another order,
    look-alike 1 would reach 1 + 2^-23 too and win the tie as the smaller id."""
    tiny = lambda ev: -1.0 + 2.0 * ev  # the cosine whose evidence (1 + cos) / 2 is ev, exactly
    rows = torch.zeros(7, dtype=torch.long)
    others = torch.tensor([1, 1, 1, 1, 1, 2, 2])
    cos = torch.tensor([1.0] + [tiny(2.0 ** -25)] * 4 + [1.0, tiny(2.0 ** -23)], dtype=torch.float32)
    for update in (lookalike_update_, lookalike_update_ref):
        o, s = torch.full((3, 2), -1, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.float16)
        update(o, s, rows, others, cos, 1.0, False)
        assert o[0].tolist() == [2, 1], update
