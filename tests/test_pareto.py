"""Pareto front, hypervolume, knee and curve layout: asserted on the plain objects."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from stagebudget.pareto import (
    StageCell,
    TrialPoint,
    compute_front,
    curve_series,
    default_ref_point,
    front_rows,
    hypervolume,
    knee_point,
    non_dominated,
)

MAX2 = ["maximize", "maximize"]


def brute_hv(points: np.ndarray, ref: np.ndarray) -> float:
    """Count dominated unit cells: exact for integer points (minimisation)."""
    ranges = [range(int(lo), int(hi)) for lo, hi in zip(points.min(axis=0), ref, strict=True)]
    total = 0
    for cell in itertools.product(*ranges):
        if np.any(np.all(points <= np.array(cell), axis=1)):
            total += 1
    return float(total)


def test_non_dominated_keeps_ties_and_respects_directions() -> None:
    pts = [(0.9, 0.2), (0.5, 0.5), (0.4, 0.4), (0.5, 0.5)]
    assert non_dominated(pts, MAX2) == [0, 1, 3]
    assert non_dominated(pts, ["minimize", "minimize"]) == [0, 2]
    assert non_dominated([], MAX2) == []


def test_non_dominated_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="direction"):
        non_dominated([(1, 2)], ["maximize", "up"])
    with pytest.raises(ValueError, match="one value per direction"):
        non_dominated([(1, 2, 3)], MAX2)


def test_hypervolume_by_hand_2d() -> None:
    # Front of the fake run: 0.92*0.40 + 0.85*0.10 + 0.70*0.05 + 0.60*0.07 = 0.53
    front = [(0.60, 0.62), (0.70, 0.55), (0.85, 0.50), (0.92, 0.40)]
    assert hypervolume(front, (0, 0), MAX2) == pytest.approx(0.53)
    # Dominated points and points beyond the reference add nothing.
    assert hypervolume([*front, (0.5, 0.5), (-1, 0.9)], (0, 0), MAX2) == pytest.approx(0.53)
    assert hypervolume([(0.5, 0.5)], (0.6, 0.0), MAX2) == 0.0
    assert hypervolume([], (0, 0), MAX2) == 0.0


@pytest.mark.parametrize("dims", [2, 3])
def test_hypervolume_matches_brute_force(dims: int) -> None:
    rng = np.random.default_rng(dims)
    for _ in range(15):
        pts = rng.integers(0, 7, size=(int(rng.integers(1, 9)), dims)).astype(float)
        ref = np.full(dims, 7.0)
        assert hypervolume(pts, ref, ["minimize"] * dims) == pytest.approx(brute_hv(pts, ref))
        # The same points maximised (negated) give the same volume.
        assert hypervolume(-pts, -ref, ["maximize"] * dims) == pytest.approx(brute_hv(pts, ref))


def test_hypervolume_mixed_directions_3d() -> None:
    # (ID, OOD) maximised, device-hours minimised: one box 0.5 x 0.4 x (2 - 1).
    assert hypervolume([(0.5, 0.4, 1.0)], (0, 0, 2.0),
                       ["maximize", "maximize", "minimize"]) == pytest.approx(0.2)


def test_hypervolume_matches_optuna_when_available() -> None:
    try:
        from optuna._hypervolume import compute_hypervolume
    except ImportError:  # private API: may move between Optuna versions
        pytest.skip("optuna._hypervolume.compute_hypervolume is not importable")
    rng = np.random.default_rng(7)
    for dims in (2, 3):
        pts = rng.random((30, dims))
        ref = np.full(dims, 1.1)
        ours = hypervolume(pts, ref, ["minimize"] * dims)
        assert ours == pytest.approx(compute_hypervolume(pts, ref))


def test_default_ref_point() -> None:
    values = [(0.5, 0.4, 0.01), (0.9, 0.2, 0.02)]
    ref = default_ref_point(values, ["maximize", "maximize", "minimize"])
    assert ref == pytest.approx((0.0, 0.0, 0.022))


def test_knee_farthest_from_extremes_line() -> None:
    front = [(0.0, 1.0), (0.8, 0.8), (1.0, 0.0)]
    assert knee_point(front, (0, 0), MAX2) == 1
    # Fake run's front: normalised by the best (0.92, 0.62); trial 3 (index 2) bulges most.
    fake = [(0.60, 0.62), (0.70, 0.55), (0.85, 0.50), (0.92, 0.40)]
    assert knee_point(fake, (0, 0), MAX2) == 2


def test_knee_small_or_straight_fronts_use_the_ideal_point() -> None:
    assert knee_point([], (0, 0), MAX2) is None
    assert knee_point([(0.3, 0.4)], (0, 0), MAX2) == 0
    # (1, 0.5) vs (0.56, 1) after normalising: the second is nearer (1, 1).
    assert knee_point([(0.9, 0.3), (0.5, 0.6)], (0, 0), MAX2) == 1
    # Collinear: no bulge, so the point nearest the ideal (the middle).
    assert knee_point([(0.2, 1.0), (0.6, 0.6), (1.0, 0.2)], (0, 0), MAX2) == 1


def test_compute_front_invariants() -> None:
    rng = np.random.default_rng(3)
    vals = rng.random((25, 2)).round(3)
    points = [TrialPoint(number=i, values=tuple(v), reference="heuristic" if i == 4 else None)
              for i, v in enumerate(vals)]
    info = compute_front(points, ["id_accuracy", "ood_accuracy"], MAX2)
    assert set(info.front) | set(info.dominated) == set(range(25))
    assert not set(info.front) & set(info.dominated)

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and a != b

    for n in info.front:
        assert not any(dominates(info.points[m].values, info.points[n].values) for m in range(25))
    for n in info.dominated:
        assert any(dominates(info.points[m].values, info.points[n].values) for m in info.front)
    assert [info.points[n].values[0] for n in info.front] == sorted(
        info.points[n].values[0] for n in info.front)
    hv = [v for _, v in info.hv_history]
    assert hv == sorted(hv) and info.hypervolume == hv[-1]
    assert info.hypervolume == pytest.approx(
        hypervolume([info.points[n].values for n in info.front], (0, 0), MAX2))
    assert info.references == {"heuristic": 4}
    assert info.knee in info.front


def test_a_schedule_trained_twice_is_one_point_of_the_front() -> None:
    """Twins (different params, one schedule: the RL rank at SFT share 1) are shown once: the
    first trial stays on the front, the later one is listed as its twin and adds no HV step."""
    sft = {"stages": [{"kind": "sft", "steps": 40, "lora_rank": 16}], "seed": 0}
    other = {"stages": [{"kind": "sft", "steps": 20, "lora_rank": 16}], "seed": 0}
    pts = [TrialPoint(0, (0.9, 0.2), schedule={**sft, "name": "t0"}),
           TrialPoint(1, (0.3, 0.8), schedule=other),
           TrialPoint(2, (0.9, 0.2), schedule={**sft, "name": "t2"}, reference="sft_only"),
           TrialPoint(3, (0.1, 0.1))]  # no schedule known: never a twin
    info = compute_front(pts, ["id", "ood"], MAX2)
    assert info.front == [1, 0] and info.dominated == [3] and info.twins == {2: 0}
    assert 2 in info.points and len(info.hv_history) == 3
    assert info.references == {"sft_only": 0}  # read off the trial that trained it


def test_compute_front_empty() -> None:
    info = compute_front([], ["id_accuracy", "ood_accuracy"], MAX2, counts={"RUNNING": 2})
    assert info.empty and info.front == [] and info.knee is None and info.hypervolume == 0.0
    assert info.counts == {"RUNNING": 2}


def test_curve_series_shifts_restarted_clocks_and_marks_boundaries() -> None:
    rows = [
        {"stage": "sft", "stage_index": 0, "step": 0, "global_step": 0, "device_seconds": 0.0,
         "id_accuracy": 0.1, "ood_accuracy": 0.1},
        {"stage": "sft", "stage_index": 0, "step": 10, "global_step": 10, "device_seconds": 5.0,
         "id_accuracy": 0.3, "ood_accuracy": 0.2},
        {"stage": "rl", "stage_index": 1, "step": 0, "global_step": 10, "device_seconds": 0.0,
         "id_accuracy": 0.3, "ood_accuracy": 0.2},
        {"stage": "rl", "stage_index": 1, "step": 10, "global_step": 20, "device_seconds": 8.0,
         "id_accuracy": 0.5, "ood_accuracy": None},
    ]
    c = curve_series(7, rows)
    assert c.x == [0.0, 5.0, 5.0, 13.0]
    assert c.x_label == "cumulative device-seconds"
    assert c.boundaries == [(5.0, "sft → rl")]
    assert c.ood_accuracy[-1] is None
    no_time = [{k: v for k, v in r.items() if k != "device_seconds"} for r in rows]
    c2 = curve_series(7, no_time)
    assert c2.x == [0.0, 10.0, 10.0, 20.0] and c2.x_label == "global step"
    assert curve_series(1, []).x == []


def test_front_rows_hold_what_every_front_table_shows() -> None:
    """One builder: objectives with their SEs, knee and reference tags, the stages' steps that
    ran (planned ones when unrecorded), rank, learning rate and share, the cost."""
    schedule = {"stages": [{"kind": "sft", "steps": 8, "lora_rank": 4, "learning_rate": 1e-4},
                           {"kind": "rl", "steps": 5, "lora_rank": None}]}
    points = [TrialPoint(0, (0.9, 0.2), reference="heuristic", label="sft 8@r4 -> rl 5",
                         schedule=schedule, stage_shares={"sft": 0.6},
                         errors={"id_accuracy": 0.01}, steps=(("sft", 6, 8),),
                         device_hours=0.5, planned_hours=0.4, params={"x": 0.5}),
              TrialPoint(1, (0.1, 0.1)), TrialPoint(2, (0.2, 0.9))]
    front = compute_front(points, ["id_accuracy", "ood_accuracy"], MAX2)
    rows = {r.number: r for r in front_rows(front)}
    assert [r.number for r in front_rows(front)] == front.front == [2, 0]
    row = rows[0]
    assert row.objectives == (("id_accuracy", 0.9, 0.01), ("ood_accuracy", 0.2, None))
    assert row.tags == ("heuristic",) and rows[2].tags == ("knee",) and front.knee == 2
    assert row.stages == (StageCell("sft", 6, 8, 4, 1e-4, 0.6), StageCell("rl", 5, 5, None, 0, None))
    assert (row.planned_hours, row.device_hours, row.params) == (0.4, 0.5, {"x": 0.5})
    assert rows[2].stages == () and rows[2].reference is None
