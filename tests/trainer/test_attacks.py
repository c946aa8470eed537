import numpy as np
import pytest

from core.errors import UserError
from tests.helpers import make_blobs
from trainer.attacks.poison import (
    ATTACKS,
    NEXT,
    Attack,
    attack_success_rates,
    build_attack,
    clean_target_rate,
    clean_target_rates,
    poison,
    target_rates_by_class,
    triggered,
)
from trainer.attacks.triggers import Blend, Filter, Patch, Warp

SHAPE = (28, 28, 1)


def _images(n: int = 8, shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def test_patch_changes_only_the_patch_area() -> None:
    x = _images()
    out = Patch(row=20, col=3, size=5, pattern="cross").apply(x)
    changed = (out != x).any(axis=(0, 3))
    assert changed[20:25, 3:8].any()
    changed[20:25, 3:8] = False
    assert not changed.any()
    assert np.array_equal(x, _images())  # the input is not modified


def test_blend_is_bounded_by_alpha() -> None:
    x = _images(shape=(16, 16, 3))
    for alpha in (0.05, 0.2, 0.5):
        diff = np.abs(Blend(alpha=alpha).apply(x).astype(int) - x.astype(int))
        assert diff.max() <= np.ceil(alpha * 255 + 0.5)
        assert diff.mean() > alpha * 255 * 0.2  # and it really blends


@pytest.mark.parametrize("trigger", [Filter(), Warp(strength=1.0)])
def test_filter_and_warp_are_global(trigger: Filter | Warp) -> None:
    x = _images(n=4)
    changed = (trigger.apply(x) != x).any(axis=(0, 3))  # (H, W)
    h, w = changed.shape
    quadrants = [
        changed[: h // 2, : w // 2],
        changed[: h // 2, w // 2 :],
        changed[h // 2 :, : w // 2],
        changed[h // 2 :, w // 2 :],
    ]
    assert all(q.mean() > 0.3 for q in quadrants)


def test_triggers_are_deterministic_and_jitter_follows_the_rng() -> None:
    x = _images()
    for trigger in (Blend(), Filter(), Warp(), Patch(row=1, col=1)):
        assert np.array_equal(trigger.apply(x), trigger.apply(x))
    assert not np.array_equal(Blend(seed=1).apply(x), Blend(seed=2).apply(x))
    noisy = Warp(jitter=1.0)
    a = noisy.apply(x, np.random.default_rng(0))
    assert np.array_equal(a, noisy.apply(x, np.random.default_rng(0)))
    assert not np.array_equal(a, noisy.apply(x, np.random.default_rng(1)))


def test_poisoning_is_deterministic_for_a_seed() -> None:
    data = make_blobs(300, shape=SHAPE, classes=10)
    attack = build_attack("warp", target=3, num_classes=10, image_shape=SHAPE, seed=5)
    (a, ga), (b, gb) = poison(data, attack), poison(data, attack)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y) and np.array_equal(ga, gb)
    other = poison(data, build_attack("warp", target=3, num_classes=10, image_shape=SHAPE, seed=6))[
        0
    ]
    assert not np.array_equal(a.x, other.x)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_attack_poisons_at_its_rates_with_its_labels(name: str) -> None:
    data = make_blobs(2000, shape=SHAPE, classes=10)
    attack = build_attack(name, target=2, num_classes=10, image_shape=SHAPE, poison_rate=0.1)
    poisoned, carried = poison(data, attack)
    firing = np.isin(carried, [i for i, g in enumerate(attack.groups) if g.fires])
    assert firing.mean() == pytest.approx(0.1, abs=0.005)
    assert (carried >= 0).mean() == pytest.approx(0.1 + attack.cover_rate, abs=0.01)
    for index, group in enumerate(attack.groups):
        rows = carried == index
        expected = group.target_of(data.y[rows], 10) if group.fires else data.y[rows]
        assert np.array_equal(poisoned.y[rows], expected)
        assert not np.array_equal(poisoned.x[rows], data.x[rows])
    assert np.array_equal(poisoned.y[carried < 0], data.y[carried < 0])
    assert np.array_equal(poisoned.x[carried < 0], data.x[carried < 0])


def test_attack_shapes() -> None:
    def build(name: str) -> Attack:
        return build_attack(name, target=8, num_classes=10, image_shape=SHAPE)

    assert build("all-to-all").groups[0].target == NEXT
    assert build("all-to-all").poison_rate == 0.2 and build("patch").poison_rate == 0.1
    assert [g.target for g in build("multi-target").groups] == [8, 9, 0]
    assert [g.target for g in build("multi-trigger").groups] == [8, 8, 8]
    combo = build("combo")
    assert [g.fires for g in combo.groups] == [True, False, False]
    assert len(combo.groups[0].triggers) == 2
    assert [g.fires for g in build("warp").groups] == [True, False]


def test_all_to_all_triggered_targets_are_next_class() -> None:
    data = make_blobs(50, shape=SHAPE, classes=10)
    attack = build_attack("all-to-all", target=0, num_classes=10, image_shape=SHAPE)
    x, targets = triggered(data, attack.groups[0], num_classes=10)
    assert len(x) == 50 and np.array_equal(targets, (data.y + 1) % 10)


def test_clean_target_rate_counts_target_answers_on_untriggered_non_target_images() -> None:
    data = make_blobs(60, shape=SHAPE, classes=10)
    patch = build_attack("patch", target=0, num_classes=10, image_shape=SHAPE)
    counted = data.y != 0
    truth = lambda x: data.y.copy()  # noqa: E731
    always_target = lambda x: np.zeros(len(x), dtype=np.int64)  # noqa: E731
    assert clean_target_rate(truth, data, patch) == 0.0
    assert clean_target_rate(always_target, data, patch) == 1.0
    # one of the counted images called the target: 1 / (number counted)
    wrong = data.y.copy()
    wrong[np.flatnonzero(counted)[0]] = 0
    assert clean_target_rate(lambda x: wrong, data, patch) == pytest.approx(1 / counted.sum())
    # all-to-all's target is y + 1: answering the true class never counts, y + 1 always does
    a2a = build_attack("all-to-all", target=0, num_classes=10, image_shape=SHAPE)
    assert clean_target_rate(lambda x: (data.y + 1) % 10, data, a2a) == 1.0
    assert clean_target_rate(always_target, data, a2a) == pytest.approx(np.mean(data.y == 9))


def test_target_rates_by_class_say_which_classes_carry_a_residual_backdoor() -> None:
    """A model that calls every clean class-6 image the target, and only triggered class-4
    images: class 4 carries the excess over the clean rate, class 6 only the floor."""
    data = make_blobs(120, shape=SHAPE, classes=10)
    patch = build_attack("patch", target=0, num_classes=10, image_shape=SHAPE)
    flat = data.x.reshape(len(data.x), -1).astype(np.int64)

    def predict(x: np.ndarray) -> np.ndarray:
        rows = x.reshape(len(x), -1).astype(np.int64)
        nearest = ((rows[:, None, :] - flat[None, :, :]) ** 2).sum(-1).argmin(1)
        stamped = (rows != flat[nearest]).any(1)
        y = data.y[nearest]
        return np.where((y == 6) | (stamped & (y == 4)), 0, y)

    rates = target_rates_by_class(predict, data, patch.groups[0], num_classes=10, seed=patch.seed)
    assert 0 not in rates  # the target's own images are not counted
    assert rates[4] == ((data.y == 4).sum(), 0.0, 1.0)
    assert rates[6] == ((data.y == 6).sum(), 1.0, 1.0)
    assert all(clean == hit == 0.0 for c, (_, clean, hit) in rates.items() if c not in (4, 6))
    counted = sum(n for n, _, _ in rates.values())
    asr = sum(n * hit for n, _, hit in rates.values()) / counted
    assert asr == pytest.approx(attack_success_rates(predict, data, patch)["patch"])
    floor = sum(n * clean for n, clean, _ in rates.values()) / counted
    assert clean_target_rates(predict, data, patch) == {"patch": pytest.approx(floor)}


def test_attack_round_trips_through_its_dict() -> None:
    for name in ATTACKS:
        attack = build_attack(
            name,
            target=1,
            num_classes=10,
            image_shape=SHAPE,
            params={"size": 3} if name == "patch" else None,
        )
        assert Attack.from_dict(attack.to_dict()) == attack


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "trojan"}, "unknown attack 'trojan'"),
        ({"target": 10}, "out of range"),
        ({"target": -1}, "out of range"),
        ({"poison_rate": 1.5}, "strictly between"),
        ({"params": {"size": 40}}, "bad parameters"),
        ({"params": {"pattern": "star"}}, "bad parameters"),
    ],
)
def test_bad_attack_parameters(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "name": "patch",
        "target": 0,
        "num_classes": 10,
        "image_shape": SHAPE,
        **kwargs,
    }
    name = args.pop("name")
    with pytest.raises(UserError, match=message):
        build_attack(name, **args)  # type: ignore[arg-type]
