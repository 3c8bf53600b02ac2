"""The MELO neuron-key index: insertion rules, routing, removal, IVF switch, persistence,
transactions (begin / commit / rollback restore the index exactly), copies, in-memory
state and block reassignment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.editors.melo.index import AddResult, Displaced, NeuronIndex, Route
from daemon.errors import EditConflictError, NeuronIndexError

DIM = 16
JOURNAL_DIM = 2  # transactions: hand-placed keys in the plane
STATE_DIM = 8


def _spread(n: int, seed: int = 0, dim: int = DIM, scale: float = 10.0) -> np.ndarray:
    """n keys far apart (pairwise L2 ~ scale * sqrt(2 * dim)), float32."""
    return (np.random.default_rng(seed).normal(size=(n, dim)) * scale).astype(np.float32)


def _unit(dim: int, axis: int) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    v[axis] = 1.0
    return v


def _filled(n: int, **kwargs: object) -> tuple[NeuronIndex, np.ndarray]:
    keys = _spread(n)
    index = NeuronIndex(DIM, radius=1.0, **kwargs)  # type: ignore[arg-type]
    index.add_batch([f"e{i}" for i in range(n)], keys, [f"t{i}" for i in range(n)], block=0)
    return index, keys


def _route_table(routes: list[Route | None]) -> list[tuple[int, int] | None]:
    return [None if r is None else (r.block, r.cluster_id) for r in routes]


def test_exact_and_perturbed_keys_route_within_radius_only() -> None:
    """A stored key and a near perturbation route to its block; a far one runs the base."""
    index = NeuronIndex(DIM, radius=1.0)
    keys = _spread(3)
    for i in range(3):
        index.add(f"e{i}", keys[i], f"t{i}", block=10 + i)
    near = keys[1] + 0.5 * _unit(DIM, 3)
    far = keys[1] + 1.5 * _unit(DIM, 3)
    routes = index.query(np.stack([keys[0], keys[1], near, far]))
    assert routes[0] == Route(10, 0, 0.0)
    assert routes[1] == Route(11, 1, 0.0)
    assert routes[2] is not None
    assert (routes[2].block, routes[2].cluster_id) == (11, 1)
    assert routes[2].distance == pytest.approx(0.5, abs=1e-5)  # plain L2, not squared
    assert routes[3] is None
    assert NeuronIndex(DIM, radius=1.0).query(keys) == [None, None, None]


def test_new_join_and_split_with_displaced_key_reinserted() -> None:
    """Far key opens, same target joins, other target splits radii and reports displaced keys."""
    index = NeuronIndex(2, radius=1.0)
    a, b, c = np.array([0.0, 0.0]), np.array([0.5, 0.0]), np.array([0.0, 0.8])
    assert index.add("a", a, "Paris", block=0) == AddResult("a", 0, 0, "opened")
    assert index.add("b", b, "Paris", block=0) == AddResult("b", 0, 0, "joined")
    result = index.add("c", c, "Rome", block=1)
    # c is 0.8 from a: both radii shrink to 0.4, so b (0.5 from a) leaves cluster 0
    # and is re-inserted: it opens cluster 2 (nearest centre a is beyond a's radius)
    assert result == AddResult("c", 1, 1, "split", (Displaced("b", 0, 2),))
    table = {
        cid: (c.radius, c.target, c.block, c.edit_ids, c.centre.tolist())
        for cid, c in index.clusters().items()
    }
    assert table == {
        0: (pytest.approx(0.4), "Paris", 0, ["a"], [0.0, 0.0]),
        1: (pytest.approx(0.4), "Rome", 1, ["c"], [0.0, pytest.approx(0.8)]),
        2: (1.0, "Paris", 0, ["b"], [0.5, 0.0]),
    }
    assert _route_table(index.query(np.stack([a, b, c]))) == [(0, 0), (0, 2), (1, 1)]
    assert index.query(np.array([[-0.3, 0.42]])) == [None]  # between the shrunken balls


def test_conflicts_in_a_batch_and_identical_keys_raise_and_change_nothing() -> None:
    """Near keys with different targets in one batch, or an identical key, are rejected."""
    index = NeuronIndex(DIM, radius=1.0)
    keys = _spread(3)
    keys[2] = keys[0] + 0.3 * _unit(DIM, 0)
    with pytest.raises(EditConflictError, match=r"'x0', 'x2'") as info:
        index.add_batch(["x0", "x1", "x2"], keys, ["A", "B", "C"], block=0)
    assert info.value.context["edit_ids"] == ["x0", "x2"]
    assert index.key_count == 0
    index.add_batch(["x0", "x1", "x2"], keys, ["A", "B", "A"], block=0)  # same target: fine
    assert index.key_count == 3
    assert len(index.clusters()) == 2
    with pytest.raises(EditConflictError, match="same key"):
        index.add("y", keys[1], "other", block=1)
    assert index.key_count == 3


def test_remove_drops_empty_clusters_and_queries_return_none() -> None:
    """Removing an edit's keys drops clusters left empty; their keys route nowhere."""
    index = NeuronIndex(DIM, radius=1.0)
    keys = _spread(2)
    index.add("a", keys[0], "A", block=0)
    index.add("a2", keys[0] + 0.2, "A", block=0)
    index.add("b", keys[1], "B", block=1)
    assert index.remove(["a"]) == []  # cluster 0 still holds a2
    assert _route_table(index.query(keys)) == [(0, 0), (1, 1)]
    assert index.remove(["a2", "b"]) == [0, 1]
    assert index.query(keys) == [None, None]
    assert index.key_count == 0
    assert index.clusters() == {}


def test_ivf_switch_routes_like_the_exact_index() -> None:
    """Past exact_max the index runs on IVF, with the same routes as an exact index."""
    n = 80
    ivf, keys = _filled(n, exact_max=50, nlist=4, nprobe=4)
    exact, _ = _filled(n)
    assert ivf.is_approximate
    assert not exact.is_approximate
    rng = np.random.default_rng(1)
    queries = np.concatenate(
        [keys, keys + rng.normal(scale=0.1, size=keys.shape), keys + 3.0]
    ).astype(np.float32)
    got, want = ivf.query(queries), exact.query(queries)
    assert _route_table(got) == _route_table(want)
    assert sum(r is not None for r in got) == 2 * n
    for g, w in zip(got, want, strict=True):
        if g is not None and w is not None:
            assert g.distance == pytest.approx(w.distance, abs=1e-4)
    ivf.remove([f"e{i}" for i in range(40)])  # IVF removal rebuilds, back to exact below 50
    assert not ivf.is_approximate
    assert _route_table(ivf.query(keys[38:42])) == [None, None, (0, 40), (0, 41)]


@pytest.mark.parametrize("exact_max", [10_000, 20])
def test_save_load_round_trip_gives_identical_queries(tmp_path: Path, exact_max: int) -> None:
    """A loaded index answers every query exactly as the saved one, and keeps working."""
    index, keys = _filled(30, exact_max=exact_max, nlist=2, nprobe=2)
    index.add("extra", keys[0] + 0.1, "t0", block=3)
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["version"] == 1
    loaded = NeuronIndex.load(tmp_path / "idx")
    queries = np.concatenate([keys, keys + 0.3, keys + 5.0]).astype(np.float32)
    assert loaded.query(queries) == index.query(queries)
    assert loaded.is_approximate == index.is_approximate
    assert loaded.edit_ids() == index.edit_ids()
    assert loaded.add("new", keys[1] + 0.2, "t1", block=4).action == "joined"
    assert not list((tmp_path / "idx").glob("*.tmp"))  # atomic writes leave no temp files


def test_corrupted_or_inconsistent_state_raises_naming_the_file(tmp_path: Path) -> None:
    """A broken manifest, a count mismatch or a foreign version raise NeuronIndexError."""
    index, _ = _filled(5)
    folder = tmp_path / "idx"
    index.save(folder)
    manifest_path = folder / "manifest.json"
    good = manifest_path.read_text()
    manifest_path.write_text("{not json")
    with pytest.raises(NeuronIndexError, match=r"manifest\.json"):
        NeuronIndex.load(folder)
    data = json.loads(good)
    data["keys"] = data["keys"][:-1]
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(NeuronIndexError, match=r"keys\.npy"):
        NeuronIndex.load(folder)
    data = json.loads(good)
    data["version"] = 7
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(NeuronIndexError, match="unknown manifest version 7"):
        NeuronIndex.load(folder)
    manifest_path.write_text(good)
    NeuronIndex(DIM, radius=1.0).save(tmp_path / "empty")
    (folder / "centres.faiss").write_bytes((tmp_path / "empty" / "centres.faiss").read_bytes())
    with pytest.raises(NeuronIndexError, match=r"centres\.faiss"):
        NeuronIndex.load(folder)


def test_query_at_ten_thousand_keys_d192_sanity() -> None:
    """10,000 stored keys of dim 192: a batch of queries routes correctly (no timing)."""
    n, dim = 10_000, 192
    keys = _spread(n, seed=3, dim=dim, scale=1.0)
    index = NeuronIndex(dim, radius=1.0)
    for start in range(0, n, 2_000):
        ids = [f"e{i}" for i in range(start, start + 2_000)]
        index.add_batch(ids, keys[start : start + 2_000], ids, block=start // 2_000)
    assert index.key_count == n
    sample = np.arange(0, n, 97)
    routes = index.query(keys[sample] + 0.01)
    assert [r.cluster_id if r else None for r in routes] == sample.tolist()
    assert [r.block if r else None for r in routes] == (sample // 2_000).tolist()


# --- transactions ----------------------------------------------------------------------


def _state_bytes(index: NeuronIndex) -> dict[str, Any]:
    """``to_state()`` with every array as raw bytes, for byte-for-byte comparison."""
    state = index.to_state()
    return {
        "manifest": state["manifest"],
        **{
            k: (state[k].dtype.str, state[k].shape, state[k].tobytes())
            for k in state
            if k != "manifest"
        },
    }


def _seeded(exact_max: int = 100) -> NeuronIndex:
    """Clusters around (0, 0) ("Paris", two keys) and (5, 0) ("Oslo"), radius 1."""
    index = NeuronIndex(JOURNAL_DIM, radius=1.0, exact_max=exact_max, nlist=1)
    index.add("a", np.array([0.0, 0.0]), "Paris", block=0)
    index.add("b", np.array([0.5, 0.0]), "Paris", block=0)
    index.add("o", np.array([5.0, 0.0]), "Oslo", block=1)
    return index


def _mutate(index: NeuronIndex) -> None:
    """A join, a split that displaces a key (re-opened elsewhere) and a new cluster."""
    index.add("j", np.array([5.2, 0.0]), "Oslo", block=2)  # joins cluster 2
    index.add("c", np.array([0.0, 0.8]), "Rome", block=3)  # splits cluster 0, displaces b
    index.add("far", np.array([-9.0, 9.0]), "Lima", block=4)  # opens


@pytest.mark.parametrize("exact_max", [100, 4])
def test_rollback_restores_the_state_byte_for_byte(exact_max: int) -> None:
    """Joins, splits, displaced keys, new clusters (and a switch to IVF) are all undone."""
    index = _seeded(exact_max)
    before = _state_bytes(index)
    routes = index.query(np.array([[0.0, 0.0], [0.5, 0.0], [5.0, 0.0], [0.0, 0.8]]))
    index.begin()
    _mutate(index)
    assert index.key_count == 6 and index.is_approximate == (exact_max == 4)
    index.rollback()
    assert _state_bytes(index) == before
    assert index.query(np.array([[0.0, 0.0], [0.5, 0.0], [5.0, 0.0], [0.0, 0.8]])) == routes
    _mutate(index)  # the index works on as if the transaction never happened
    fresh = _seeded(exact_max)
    _mutate(fresh)
    assert _state_bytes(index) == _state_bytes(fresh)


def test_commit_keeps_the_inserts_and_ends_the_transaction() -> None:
    """After commit the keys stay; a second rollback or commit has nothing to act on."""
    index = _seeded()
    reference = _seeded()
    _mutate(reference)
    index.begin()
    _mutate(index)
    index.commit()
    assert _state_bytes(index) == _state_bytes(reference)
    with pytest.raises(NeuronIndexError, match="no insert transaction"):
        index.rollback()


def test_a_rejected_batch_inside_a_transaction_leaves_the_rest_undoable() -> None:
    """A conflicting batch changes nothing; what was added before it still rolls back."""
    index = _seeded()
    before = _state_bytes(index)
    index.begin()
    index.add("far", np.array([-9.0, 9.0]), "Lima", block=4)
    with pytest.raises(EditConflictError):
        index.add_batch(["x", "y"], np.array([[3.0, 3.0], [3.1, 3.0]]), ["A", "B"], block=5)
    index.rollback()
    assert _state_bytes(index) == before


def test_transactions_do_not_nest_and_forbid_removal() -> None:
    """One open transaction at a time; remove and reassign_blocks are refused inside one."""
    index = _seeded()
    index.begin()
    with pytest.raises(NeuronIndexError, match="already open"):
        index.begin()
    with pytest.raises(NeuronIndexError, match="remove is not allowed"):
        index.remove(["a"])
    with pytest.raises(NeuronIndexError, match="reassign_blocks is not allowed"):
        index.reassign_blocks([0])
    index.rollback()
    assert index.remove(["o"]) == [1]


def test_a_state_taken_earlier_does_not_change_with_the_index() -> None:
    """``to_state()`` copies the clusters' member lists: a later join leaves it alone."""
    index = _seeded()
    state = index.to_state()
    members = [c["edit_ids"] for c in state["manifest"]["clusters"]]
    index.add("j", np.array([5.2, 0.0]), "Oslo", block=2)
    assert [c["edit_ids"] for c in state["manifest"]["clusters"]] == members == [["a", "b"], ["o"]]


# --- copies, in-memory state, block reassignment -----------------------------------------


def _keys(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, STATE_DIM)) * 10.0).astype(np.float32)


@pytest.mark.parametrize("exact_max", [100, 2])
def test_state_and_copy_answer_like_the_original_and_are_independent(exact_max: int) -> None:
    """to_state/from_state and copy() give equal routes; changing a copy leaves the original."""
    index = NeuronIndex(STATE_DIM, radius=1.0, exact_max=exact_max, nlist=2)
    keys = _keys(6)
    for i, k in enumerate(keys):
        index.add(f"e{i}", k, f"t{i}", block=i)
    queries = np.concatenate([keys, keys + 0.3, _keys(4, seed=9)])
    restored = NeuronIndex.from_state(index.to_state())
    twin = index.copy()
    assert restored.query(queries) == index.query(queries) == twin.query(queries)
    assert restored.is_approximate == index.is_approximate == (exact_max == 2)
    twin.remove(["e0"])
    twin.add("new", keys[1] + 0.1, "t1", block=9)
    assert index.query(keys[:1])[0] is not None and twin.query(keys[:1])[0] is None
    assert index.key_count == 6 and twin.key_count == 6


def test_from_state_rejects_other_versions_and_mismatched_arrays() -> None:
    """A state whose version or array shapes do not fit raises NeuronIndexError."""
    index = NeuronIndex(STATE_DIM, radius=1.0)
    index.add("a", _keys(1)[0], "t", block=0)
    state = index.to_state()
    with pytest.raises(NeuronIndexError, match="version"):
        NeuronIndex.from_state({**state, "manifest": {**state["manifest"], "version": 9}})
    with pytest.raises(NeuronIndexError, match="do not fit"):
        NeuronIndex.from_state({**state, "keys": np.zeros((2, STATE_DIM), np.float32)})


def test_keys_can_be_added_after_every_key_was_removed() -> None:
    """Emptying the index and adding again works (the key buffer regrows from empty)."""
    index = NeuronIndex(STATE_DIM, radius=1.0)
    keys = _keys(2)
    index.add("a", keys[0], "t", block=0)
    index.remove(["a"])
    index.copy().add("b", keys[1], "t", block=1)
    index.add("b", keys[1], "t", block=1)
    assert index.query(keys[1:])[0] is not None


def test_reassign_blocks_points_a_freed_cluster_at_a_live_member_block() -> None:
    """A joined key keeps routing after its cluster's block is freed: to its own block."""
    index = NeuronIndex(STATE_DIM, radius=1.0)
    key = _keys(1)[0]
    index.add("owner", key, "Paris", block=3)
    joined = index.add("joiner", key + 0.2, "Paris", block=5)
    assert joined.action == "joined" and joined.block == 3
    index.remove(["owner"])
    assert index.reassign_blocks([3]) == [(joined.cluster_id, 3, 5)]
    route = index.query(key + 0.2)[0]
    assert route is not None and route.block == 5
    assert index.reassign_blocks([7]) == []
    with pytest.raises(NeuronIndexError, match="no member key"):
        index.reassign_blocks([5])


def test_a_key_with_its_own_radius_routes_only_what_lies_that_close() -> None:
    """``add(..., radius=r)`` opens a ball of radius r (never wider than the index's);
    a query just outside it runs the base model, one inside routes."""
    index = NeuronIndex(2, radius=1.0)
    index.add("narrow", np.array([0.0, 0.0]), "A", block=3, radius=0.1)
    index.add("wide", np.array([5.0, 0.0]), "B", block=4, radius=2.0)  # capped at 1.0
    radii = {c.edit_ids[0]: c.radius for c in index.clusters().values()}
    assert radii == {"narrow": pytest.approx(0.1), "wide": 1.0}
    routes = index.query(np.array([[0.05, 0.0], [0.2, 0.0], [5.9, 0.0]]))
    assert _route_table(routes) == [(3, 0), None, (4, 1)]
    with pytest.raises(ValueError, match="radius"):
        index.add("bad", np.array([9.0, 9.0]), "C", block=5, radius=0.0)


def test_a_narrow_key_inside_a_wide_ball_takes_only_its_own_radius_from_it() -> None:
    """The split rule with radii of their own: the new ball gets min(r, d/2), the old one
    shrinks to min(R, d - r), no further; the balls do not overlap. (A query routes by
    its nearest centre: one nearer the narrow centre but outside its ball runs the
    base model even inside the wide ball.)"""
    index = NeuronIndex(2, radius=1.0)
    index.add("wide", np.array([0.0, 0.0]), "A", block=0)
    result = index.add("narrow", np.array([0.6, 0.0]), "B", block=1, radius=0.1)
    assert result.action == "split"
    radii = {c.edit_ids[0]: c.radius for c in index.clusters().values()}
    assert radii == {"wide": pytest.approx(0.5), "narrow": pytest.approx(0.1)}
    routes = index.query(np.array([[0.25, 0.0], [0.0, 0.45], [0.65, 0.0], [0.4, 0.0]]))
    assert _route_table(routes) == [(0, 0), (0, 0), (1, 1), None]


def test_a_displaced_key_keeps_its_own_radius_and_so_does_a_saved_index(tmp_path: Path) -> None:
    """A key evicted by a split is re-inserted with its own radius; save/load and the
    in-memory state keep each key's radius, and a manifest written before keys had
    radii (four fields a key) still loads."""
    index = NeuronIndex(2, radius=1.0)
    index.add("a", np.array([0.0, 0.0]), "A", block=0, radius=0.5)
    index.add("a2", np.array([0.3, 0.0]), "A", block=0, radius=0.5)  # joins a's ball
    index.add("b", np.array([0.0, 0.4]), "B", block=1)  # splits: a2 is displaced
    reopened = next(c for c in index.clusters().values() if c.edit_ids == ["a2"])
    assert reopened.radius == pytest.approx(0.5)  # its own, not the index's 1.0
    index.save(tmp_path / "idx")
    again = NeuronIndex.load(tmp_path / "idx")
    probes = np.array([[0.3, 0.0], [0.75, 0.0], [0.0, 0.45], [0.85, 0.0]])
    assert _route_table(again.query(probes)) == _route_table(index.query(probes))
    state = NeuronIndex.from_state(index.to_state())
    assert [m.radius for m in state._meta] == [0.5, 0.5, None]
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    manifest["keys"] = [k[:4] for k in manifest["keys"]]
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    assert [m.radius for m in NeuronIndex.load(tmp_path / "idx")._meta] == [None] * 3
